"""Which graph works best? Run the default experiment on several topologies and compare test perplexity.

    .venv/bin/python examples/sweep_topologies.py                       # ring, torus, random regular, complete
    .venv/bin/python examples/sweep_topologies.py ring star --set training.rounds=5

Each topology gets its own run folder under runs/sweep-*/; the table compares the schemes across graphs.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2pfed.load import load_experiment
from p2pfed.experiment import quiet_transformers, run_experiment

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topologies", nargs="*", default=["ring", "torus", "random_regular", "complete"],
                        help="names of topologies/*.toml files")
    parser.add_argument("--experiment", default=str(HERE / "default.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    quiet_transformers()
    console = Console()
    sweep_dir = Path("runs") / f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    rows: dict[str, dict] = {}
    for name in args.topologies:
        topology = str(HERE.parent / "topologies" / f"{name}.toml")
        config = load_experiment(args.experiment, [*args.overrides, f'topology="{topology}"'])
        run_dir = sweep_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        console.print(f"[bold]{name}[/] -> {run_dir}")
        rows[name] = run_experiment(config, run_dir, log=console.print)["schemes"]
    table = Table(title="Test perplexity (mean over peers and seeds) by topology and scheme")
    schemes = list(next(iter(rows.values())))
    table.add_column("topology")
    for scheme in schemes:
        table.add_column(scheme, justify="right")
    for name, result in rows.items():
        best = min(schemes, key=lambda s: result[s]["test_ppl_mean"])
        table.add_row(name, *[f"[bold green]{result[s]['test_ppl_mean']:.3f}[/]" if s == best
                              else f"{result[s]['test_ppl_mean']:.3f}" for s in schemes])
    console.print(table)


if __name__ == "__main__":
    main()
