"""Memory of neighbours' updates on a complete graph: one in-process job's peak RSS, against what holding
every received update as its own copy would take.

In one round of an in-process job every peer decodes all its N-1 neighbours' updates before any peer
aggregates (trio interleaves the peers' collect loops), so copies would peak at N(N-1) updates: 4.2 GB at
256 peers of 64 KB. Received float32 tensors now view the payload they came in (p2pfed.net.tensor_codec),
and the in-process network hands one payload object to all of a sender's neighbours: N updates.

Each job runs in a fresh process (this script with `--child N`): `swarm.run_job`, `fedavg` on a complete
graph (weights from degrees: no model runs per neighbour), 1 round of 1 local step, the default rank and
model, the synthetic corpus of benchmarks/memory.py. It reports the peak RSS (ru_maxrss), the RSS once the
workspace was open, and the size of one update (the peer's shared tensors as fp32).

To measure the code before a change, run the child against another checkout:

    git worktree add /tmp/base 5207caf
    PYTHONPATH=/tmp/base .venv/bin/python benchmarks/neighbour_updates.py --child 256
    git worktree remove /tmp/base

    flock /tmp/p2pfed-cpu.lock .venv/bin/python benchmarks/neighbour_updates.py        # 128 and 256 peers

What it shows: the peak above the workspace far below N(N-1) updates (at 5207caf it was above them: each
received update a copy); what grows with N(N-1) now is each receiver's tensor objects, not the data.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import default_config, quiet, setup
from memory import BLOCK_LEN, GROUPS, TEST, TRAIN, VAL, write_corpus

MB = 1024 * 1024


def child(peers: int) -> dict:
    setup()
    import p2pfed
    from p2pfed.experts import is_shared
    from p2pfed.job import open_workspace
    from p2pfed.net import wire
    from p2pfed.swarm import run_job

    with tempfile.TemporaryDirectory() as folder:
        write_corpus(Path(folder), peers)
        config = default_config(
            f"num_peers={peers}", 'schemes=["fedavg"]', 'topology="complete"', "training.rounds=1",
            "training.local_steps=1", "training.select_best=false", f'data.source="{folder}"',
            f"data.groups={json.dumps(list(GROUPS))}", f"data.block_len={BLOCK_LEN}",
            f"data.train_blocks={TRAIN}", f"data.val_blocks={VAL}", f"data.test_blocks={TEST}")
        workspace = open_workspace(config, log=quiet)
        shared = {n: t for n, t in workspace.host.initial_adapter(0).items() if is_shared(n)}
        base = psutil.Process().memory_info().rss / MB
        start = time.perf_counter()
        result = run_job(config, workspace, "fedavg", 0)
        wall = time.perf_counter() - start
    return {"peers": peers, "code": str(Path(p2pfed.__file__).parent.parent), "base_mb": base, "wall_s": wall,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "update_bytes": wire.tensor_bytes(shared),
            "missing": sum(len(r.missing) for p in result.peers.values() for r in p.rounds)}


def run_child(peers: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", str(peers)], check=True, capture_output=True,
                            text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(row: dict) -> str:
    n, update_mb = row["peers"], row["update_bytes"] / MB
    held = row["peak_mb"] - row["base_mb"]
    return (f"  {n:5d}  {row['base_mb']:7.0f}MB  {row['peak_mb']:7.0f}MB  {held:7.0f}MB  "
            f"{n * (n - 1) * update_mb:8.0f}MB  {n * update_mb:6.0f}MB  {row['wall_s']:6.1f}s"
            + (f"  ({row['missing']} updates missing)" if row["missing"] else ""))


def main(counts: tuple[int, ...] = (128, 256)) -> dict:
    rows = [run_child(n) for n in counts]
    print(f"neighbour_updates: fedavg on a complete graph, 1 round of 1 step, one process; an update is "
          f"{rows[0]['update_bytes'] / 1024:.0f} KB (fp32)")
    print(f"  {'peers':>5}  {'base RSS':>9}  {'peak RSS':>9}  {'peak-base':>9}  {'N(N-1) upd':>10}  "
          f"{'N upd':>8}  {'wall':>7}")
    for row in rows:
        print(report(row))
    return {"rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help="internal: run one job of this many peers, print JSON")
    parser.add_argument("--peers", type=int, nargs="+", default=[128, 256], help="job sizes (default 128 256)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
    else:
        main(tuple(args.peers))
