"""One attacker of each kind against the trust rules, FedAvg and the robust baselines: the README's table.

    python examples/attack_table.py [--out runs/attack-table] [--set KEY=VALUE ...]

Runs examples/attacks.toml once without the attacker, then once per attack kind (run folders that are
done already are read, not run again), and writes
attack_table.md (honest peers' test perplexity change against the clean run, and the mean weight the
honest peers put on the attacker in the last round) beside the run folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from p2pfed.config import ATTACK_KINDS
from p2pfed.experiment import quiet_transformers, run_experiment
from p2pfed.load import load_experiment
from p2pfed.strategies import AGGREGATORS, parse_scheme

HERE = Path(__file__).resolve().parent
FACTORS = {"noise": 10.0, "scale": 100.0}  # other kinds ignore the factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/attack-table")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    quiet_transformers()
    base = load_experiment(HERE / "attacks.toml", args.overrides)
    out = Path(args.out)
    clean = _run(dataclasses.replace(base, attack=(), compare_clean=False), out / "clean")
    rows = {}
    for kind in ATTACK_KINDS:
        attack = dataclasses.replace(base.attack[0], kind=kind, factor=FACTORS.get(kind, base.attack[0].factor))
        rows[kind] = _run(dataclasses.replace(base, attack=(attack,), compare_clean=False), out / kind)
    table = _table(base.schemes, clean, rows)
    (out / "attack_table.md").write_text(table, encoding="utf-8")
    print(table)


def _run(config, run_dir: Path) -> dict:
    """One run; a run folder that already holds results.json is read instead (a stopped table resumes)."""
    results = run_dir / "results.json"
    if results.is_file():
        print(f"-> {run_dir} (done before)", flush=True)
        return json.loads(results.read_text(encoding="utf-8"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"-> {run_dir}", flush=True)
    return run_experiment(config, run_dir, log=lambda *_: None)


def _table(schemes, clean: dict, rows: dict[str, dict]) -> str:
    lines = ["| attack | " + " | ".join(schemes) + " |", "|---|" + "---|" * len(schemes)]
    clean_cells = [f"{clean['schemes'][s]['test_ppl_mean']:.2f}" for s in schemes]
    lines.append("| none (test ppl, all peers) | " + " | ".join(clean_cells) + " |")
    for kind, summary in rows.items():
        cells = []
        for scheme in schemes:
            attack = summary["schemes"][scheme]["attack"]
            honest_clean = _honest_mean(clean, scheme, attack["attackers"])
            change = 100 * (attack["honest_test_ppl_mean"] / honest_clean - 1)
            uses_trust = AGGREGATORS[parse_scheme(scheme).aggregator].uses_trust  # robust rows ignore trust
            trust = f"{attack['attacker_trust']['mean'][-1]:.2f}" if uses_trust else "-"
            cells.append(f"{change:+.1f}% / {trust}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: change of the honest peers' test perplexity against the same run without the attacker "
                 "/ weight the honest peers put on the attacker in the last round.")
    return "\n".join(lines) + "\n"


def _honest_mean(summary: dict, scheme: str, attackers: list[str]) -> float:
    per_peer = summary["schemes"][scheme]["per_peer"]
    values = [v for name, v in per_peer.items() if name not in attackers]
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
