"""`p2pfed sweep`: one experiment over the product of grids of config values, a run folder per point.

    p2pfed sweep examples/default.toml --grid 'topology=[ring,complete]' --grid 'schemes=[local,validation]'

    SWEEP_DIR/sweep.json      the grids and every point's config (what `p2pfed sweep --resume SWEEP_DIR` runs)
    SWEEP_DIR/NN-KEY=VALUE.../  each point's run folder (p2pfed.runfolder)
    SWEEP_DIR/summary.json    one row per point and scheme: the point's values, test perplexity (mean, std, per
                              seed), same-group trust, bytes sent, its run folder
    SWEEP_DIR/summary.csv     the same rows
    SWEEP_DIR/summary.png     test perplexity by point and scheme

Any config key takes a grid. A list key (schemes, seeds, data.groups, ...) given single values runs one value per
point (`schemes=[local,fedavg]` is two points); lists of lists give whole lists. A topology value is what `--set
topology=...` takes: a shipped topology's name (`ring`, `random_regular`: topologies/NAME.toml), a file or a table.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import tomllib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from p2pfed.config import ConfigError, ExperimentConfig
from p2pfed.experiment import Listener, check_engine, pool_for, run_experiment
from p2pfed.load import from_dict, load_experiment, to_dict
from p2pfed.plots import draw_sweep
from p2pfed.preflight import check_experiment
from p2pfed.report import load_results
from p2pfed.runfolder import RESULTS_FILE, RunFolder, differences

SWEEP_FILE = "sweep.json"
SUMMARY_FILES = ("summary.json", "summary.csv", "summary.png")


@dataclass(frozen=True)
class SweepPoint:
    name: str  # its run folder, inside the sweep folder
    values: dict[str, Any]  # grid key -> this point's value
    config: ExperimentConfig

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={_short(value)}" for key, value in self.values.items())


def parse_grid(text: str) -> tuple[str, list]:
    """`KEY=[v1,v2,...]` -> (KEY, values). Values are TOML; bare words are strings (`topology=[ring,star]`)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"--grid {text!r}: expected KEY=[v1,v2,...]")
    values = _value(raw)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"--grid {text!r}: the values must be a non-empty list, e.g. {key}=[a,b]")
    return key, values


def _value(raw: str):
    raw = raw.strip()
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if raw.startswith("[") and raw.endswith("]"):
        return [_value(item) for item in _split(raw[1:-1])]
    return raw


def _split(text: str) -> list[str]:
    """Split on the commas outside brackets, braces and quotes."""
    items, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        current += char
    return [item for item in [*items, current] if item.strip()]


def plan_sweep(experiment: str | Path, grids: Sequence[str], overrides: Sequence[str] = ()) -> list[SweepPoint]:
    """Every point of the product of `grids` (in order, the last grid varying fastest), each config loaded and
    checked the way `p2pfed run` loads one."""
    parsed = [parse_grid(g) for g in grids]
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid: {sorted({k for k in keys if keys.count(k) > 1})[0]} is given twice")
    points = []
    for i, combination in enumerate(itertools.product(*(values for _, values in parsed))):
        values = dict(zip(keys, combination))
        sets = [f"{key}={_toml(_point_value(key, value))}" for key, value in values.items()]
        config = load_experiment(experiment, [*overrides, *sets])
        label = "_".join(f"{key}={_short(value)}" for key, value in values.items())
        points.append(SweepPoint(f"{i:02d}-{re.sub(r'[^A-Za-z0-9._=+-]', '_', label)[:80]}", values, config))
    return points


def _point_value(key: str, value: Any) -> Any:
    # A topology value is written as --set would take it: a shipped topology's name ("ring"), a file's path
    # (from the working directory) or a table (load.resolve_topology).
    if _is_list_key(key) and not isinstance(value, list):
        return [value]
    return value


def _is_list_key(key: str) -> bool:
    kind: Any = ExperimentConfig
    for part in key.split("."):
        if not is_dataclass(kind):
            return False
        hints = typing.get_type_hints(kind)
        if part not in {f.name for f in fields(kind)}:
            return False
        kind = hints[part]
    return typing.get_origin(kind) is tuple


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_short(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{_short(v)}" for k, v in value.items())
    if isinstance(value, str) and value.endswith(".toml"):
        return Path(value).stem
    return str(value)


# -- the sweep folder ---------------------------------------------------------------------------

def saved_points(sweep_dir: str | Path) -> list[SweepPoint]:
    """The points of a sweep folder, as they were planned (for --resume)."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{sweep_dir}: no {SWEEP_FILE}, so not a sweep folder p2pfed can resume")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [SweepPoint(p["name"], p["values"], from_dict(ExperimentConfig, p["config"]).validate())
            for p in data["points"]]


def check_sweep(points: Sequence[SweepPoint], sweep_dir: str | Path, *, resume: bool = False, force: bool = False,
                log=print, engine: str = "process") -> dict[str, Any]:
    """Every point checked (p2pfed.preflight; the engine can run it) and the folder's use, before anything is
    written; each point's workspace, for run_sweep."""
    sweep_dir = Path(sweep_dir)
    for point in points:
        check_engine(engine, point.config)
    if resume and force:
        raise ConfigError("--resume and --force: choose one (finish the sweep in the folder, or start afresh)")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"--out {sweep_dir}: is a file, not a folder")
    in_use = sweep_dir.is_dir() and any(sweep_dir.iterdir())
    if in_use and not (resume or force):
        raise ConfigError(f"--out {sweep_dir}: the folder is not empty; --resume finishes the sweep in it, "
                          f"--force starts it afresh")
    if in_use and resume:
        _check_same_points(saved_points(sweep_dir), points, sweep_dir)
    workspaces: dict = {}
    checked = {}
    for point in points:
        RunFolder(sweep_dir / point.name).check(point.config, resume=resume, force=force)
        checked[point.name] = check_experiment(point.config, log=log, workspaces=workspaces)
    return checked


def run_sweep(points: Sequence[SweepPoint], sweep_dir: str | Path, *, resume: bool = False, force: bool = False,
              listener_for: Callable[[SweepPoint], Listener] | None = None, log=print,
              checked: dict[str, Any] | None = None, engine: str = "process") -> dict:
    """Run every point not finished yet into its run folder, then write the summary; returns summary.json's data.
    Checks everything first (check_sweep) unless `checked` holds what it returned. `engine`: where the jobs run,
    worker processes ("process") or Ray tasks ("ray"), one pool for every point."""
    sweep_dir = Path(sweep_dir)
    if checked is None:
        checked = check_sweep(points, sweep_dir, resume=resume, force=force, log=log, engine=engine)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if force:
        for name in SUMMARY_FILES:
            (sweep_dir / name).unlink(missing_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps({"points": [
        {"name": p.name, "values": p.values, "config": to_dict(p.config)} for p in points]}, indent=2),
        encoding="utf-8")
    results = {}
    with pool_for(engine, max(p.config.workers for p in points)) as pool:  # started once, for every point
        for point in points:
            folder = RunFolder(sweep_dir / point.name)
            listener = listener_for(point) if listener_for is not None else Listener()
            if resume and (folder.path / RESULTS_FILE).is_file():
                results[point.name] = load_results(folder.path)  # finished in an earlier run
                for seed in point.config.seeds:
                    for scheme in point.config.schemes:
                        listener.job_finished(_Done(scheme, seed), resumed=True)
                continue
            folder.make(point.config, force=force)
            log(f"[{point.name}] {point.label}")
            results[point.name] = run_experiment(point.config, folder, listener, log, workspace=checked[point.name],
                                                 pool=pool, engine=engine)
    return write_summary(sweep_dir, points, results)


@dataclass(frozen=True)
class _Done:
    """What a listener needs of a job found finished: its scheme and seed."""

    scheme: str
    seed: int


def _check_same_points(saved: list[SweepPoint], points: Sequence[SweepPoint], sweep_dir: Path) -> None:
    if [p.name for p in saved] != [p.name for p in points]:
        raise ConfigError(f"{sweep_dir} holds a sweep over other points ({', '.join(p.name for p in saved)}); resume "
                          f"it as it was (p2pfed sweep --resume {sweep_dir}) or start afresh with --force")
    for old, new in zip(saved, points):
        for key, was, now in differences(to_dict(old.config), to_dict(new.config)):
            if key not in ("workers", "output_dir"):
                raise ConfigError(f"{key}: point {old.name} of {sweep_dir} was started with {was!r}, not {now!r}")


def summary_rows(points: Sequence[SweepPoint], results: dict[str, dict]) -> list[dict]:
    """One row per point and scheme."""
    rows = []
    for point in points:
        varying = {k: v for k, v in point.values.items() if k != "schemes"}
        label = ", ".join(f"{k}={_short(v)}" for k, v in varying.items()) or "all"
        for scheme, row in results[point.name]["schemes"].items():
            rows.append({"point": point.name, "label": label, "values": point.values, "scheme": scheme,
                         "test_ppl_mean": row["test_ppl_mean"], "test_ppl_std": row["test_ppl_std"],
                         "per_seed": row["per_seed"], "same_group_trust": row.get("same_group_trust"),
                         "bytes_sent": row["bytes_sent"], "run_dir": point.name})
    return rows


def write_summary(sweep_dir: Path, points: Sequence[SweepPoint], results: dict[str, dict]) -> dict:
    rows = summary_rows(points, results)
    keys = list(points[0].values) if points else []
    seeds = sorted({int(s) for row in rows for s in row["per_seed"]})
    grid = {k: list({json.dumps(p.values[k]): p.values[k] for p in points}.values()) for k in keys}
    summary = {"grid": grid, "seeds": seeds, "points": [{"name": p.name, "values": p.values} for p in points],
               "rows": rows}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    with open(sweep_dir / "summary.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["point", *keys, "scheme", "test_ppl_mean", "test_ppl_std", *(f"seed_{s}" for s in seeds),
                         "same_group_trust", "bytes_sent", "run_dir"])
        for row in rows:
            values = [v if isinstance(v, (str, int, float)) else json.dumps(v) for v in row["values"].values()]
            writer.writerow([row["point"], *values, row["scheme"], row["test_ppl_mean"], row["test_ppl_std"],
                             *(row["per_seed"].get(str(s), "") for s in seeds),
                             "" if row["same_group_trust"] is None else row["same_group_trust"], row["bytes_sent"],
                             row["run_dir"]])
    if rows:
        draw_sweep(rows, sweep_dir / "summary.png")
    return summary
