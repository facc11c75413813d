"""Which graph works best? The default experiment on several topologies: a call of `p2pfed sweep`.

    .venv/bin/python examples/sweep_topologies.py                         # ring, torus, random regular, complete
    .venv/bin/python examples/sweep_topologies.py ring star --set training.rounds=5 --out runs/graphs

is `p2pfed sweep examples/default.toml --grid 'topology=[ring,torus,random_regular,complete]' ...`: a run
folder per topology, summary.json, summary.csv and summary.png in the sweep folder.
"""

import sys
from pathlib import Path

from p2pfed.cli import main

TOPOLOGIES = ["ring", "torus", "random_regular", "complete"]  # topologies/*.toml


def sweep(argv: list[str]) -> int:
    names = []
    while argv and not argv[0].startswith("-"):
        names.append(argv.pop(0))
    grid = f"topology=[{','.join(names or TOPOLOGIES)}]"
    return main(["sweep", str(Path(__file__).resolve().parent / "default.toml"), "--grid", grid, *argv])


if __name__ == "__main__":
    sys.exit(sweep(sys.argv[1:]))
