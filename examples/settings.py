"""Trust against its baselines in seven data settings: the README's settings table.

    python examples/settings.py [--setting NAME ...] [--scheme NAME ...] [--seeds 0 1] [--rounds 10]
                                [--workers 2] [--out runs/settings] [--set KEY=VALUE ...] [--table-only]

Each (setting, scheme) is its own run folder, OUT/<setting>/<scheme>; one that holds results.json is read, not
run again, so the table grows a setting or a scheme at a time and a stopped run resumes (a half-done folder is
resumed job by job). Writes OUT/settings_table.md: per setting, test perplexity mean ± std over peers and seeds
of the model each peer keeps (its best-validation round) and of its last round, every scheme side by side,
and how the default trust rule ("spread") stands against the best of local, FedAvg and the oracle.

Settings: six on the built-in corpus (SETTINGS below) and `python`, on text of our own that needs no download:
the local Python's standard library, its code without docstrings and comments against those docstrings and
comments (examples/python_text.py), written to OUT/python-text/ on first use; the same text on every run with
the same Python version. The README's table: `python examples/settings.py` (every setting, the schemes of
SCHEMES; under `python` it ran local, fedavg, oracle, validation and spread).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import python_text
from p2pfed import Swarm
from p2pfed.experiment import quiet_transformers
from p2pfed.load import load_experiment

HERE = Path(__file__).resolve().parent
SETTINGS: dict[str, dict] = {
    "distant": {},  # english / italian, 4 peers each
    # Portuguese has 237 blocks of 128 tokens: 4 peers get 58 each (train 32, val 12, test 14) instead of 88.
    "close": {"data.groups": ["spanish", "portuguese"], "data.train_blocks": 32, "data.val_blocks": 12,
              "data.test_blocks": 14},
    "scarce": {"data.train_blocks": 8},
    "four-groups": {"data.groups": ["english", "italian", "spanish", "portuguese"]},
    "dirichlet": {"data.split": "dirichlet", "data.dirichlet_alpha": 0.5},
    "mixed": {"data.split": "mixed"},
    # Text of our own, not in p2pfed/corpus: the local Python's standard library as code and as English prose
    # (examples/python_text.py), written to OUT/python-text/ before the first run of this setting.
    "python": {"data.groups": list(python_text.GROUPS)},
}
BASELINES = ("local", "fedavg", "oracle")
SCHEMES = (*BASELINES, "weights", "validation", "predictions", "adaptive", "spread")
DEFAULT = "spread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", choices=list(SETTINGS), help="default: all")
    parser.add_argument("--scheme", action="append", help=f"default: {', '.join(SCHEMES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--table-only", action="store_true", help="run nothing: the table of what is done")
    args = parser.parse_args()
    quiet_transformers()
    base = load_experiment(HERE / "default.toml", args.overrides)
    out = Path(args.out)
    for setting in [] if args.table_only else args.setting or SETTINGS:
        for scheme in args.scheme or SCHEMES:
            _run(base, setting, scheme, args, out / setting / scheme)
    table = _table(out)
    (out / "settings_table.md").write_text(table, encoding="utf-8")
    print(table)


def _run(base, setting: str, scheme: str, args, run_dir: Path) -> None:
    if (run_dir / "results.json").is_file():
        print(f"-> {run_dir} (done before)", flush=True)
        return
    print(f"-> {run_dir}", flush=True)
    keys = {**SETTINGS[setting], **_text_source(setting, run_dir.parent.parent), "schemes": [scheme], "seeds": args.seeds, "workers": args.workers,
            "training.rounds": args.rounds, "name": f"{setting}-{scheme}"}
    swarm = Swarm(base, **keys)
    swarm.run(out=run_dir, resume=run_dir.is_dir(), log=lambda *_: None)


def _text_source(setting: str, out: Path) -> dict:
    if setting != "python":
        return {}
    return {"data.source": str(python_text.write_python_text(out / "python-text").resolve())}


def _table(out: Path) -> str:
    """Every finished run folder under `out`, a row per setting and the schemes as columns."""
    done: dict[str, dict[str, dict]] = {}
    for setting in SETTINGS:
        for scheme in SCHEMES:
            path = out / setting / scheme / "results.json"
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                done.setdefault(setting, {})[scheme] = {"row": data["schemes"][scheme], "config": data["config"]}
    schemes = [s for s in SCHEMES if any(s in row for row in done.values())]
    lines = ["| setting | seeds x rounds | | " + " | ".join(schemes) + f" | {DEFAULT} vs best baseline |",
             "|---|---|---|" + "---|" * (len(schemes) + 1)]
    for setting, cells in done.items():
        config = next(iter(cells.values()))["config"]
        shape = f"{len(config['seeds'])} x {config['training']['rounds']}"
        for label, pick in (("kept", _kept), ("last", _last)):
            texts = [_cell(pick(cells[s]["row"])) if s in cells else "-" for s in schemes]
            lines.append(f"| {setting} | {shape} | {label} | " + " | ".join(texts) + f" | {_versus(cells, pick)} |")
    lines.append("")
    lines.append("Test perplexity, mean ± std over peers and seeds (lower is better). kept: the adapter of each "
                 "peer's best-validation round (training.select_best); last: its last round. The last column: "
                 f"{DEFAULT} against the best of {', '.join(BASELINES)} in that row (negative: {DEFAULT} is better).")
    return "\n".join(lines) + "\n"


def _kept(row: dict) -> tuple[float, float]:
    chosen = row.get("selected") or row
    return chosen["test_ppl_mean"], chosen["test_ppl_std"]


def _last(row: dict) -> tuple[float, float]:
    return row["test_ppl_mean"], row["test_ppl_std"]


def _cell(value: tuple[float, float]) -> str:
    return f"{value[0]:.3f} ± {value[1]:.3f}"


def _versus(cells: dict, pick) -> str:
    baselines = {s: pick(cells[s]["row"])[0] for s in BASELINES if s in cells}
    if DEFAULT not in cells or not baselines:
        return "-"
    best = min(baselines, key=baselines.get)
    return f"{100 * (pick(cells[DEFAULT]['row'])[0] / baselines[best] - 1):+.2f}% ({best})"


if __name__ == "__main__":
    main()
