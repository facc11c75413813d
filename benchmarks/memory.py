"""Resident memory of in-process peers: a whole job's peak RSS, with and without trimming the heap between peers.

Each job runs in a fresh process (this script with `--child`), so that no earlier measurement's allocations
linger; it runs `swarm.run_job` (one round of `validation` trust on a ring, 2 local steps, so every peer
trains, sends, scores its two neighbours, aggregates and evaluates) and reports its peak RSS (ru_maxrss), its
RSS once the workspace was open (the base model and the corpus) and the wall time. The job is one process,
so its peak is the peak summed over its processes. "off" is the swarm without p2pfed.memory's trim (the
trim patched to do nothing): glibc keeping the heap pages that activations freed. "on" is the swarm as it is: a
HeapTrimmer per job, trimming whenever resident memory has grown by 64 MB since the last trim.

The built-in corpus has text for a few dozen peers' disjoint splits, not 1,000: the script writes a synthetic
corpus (seeded pseudo-words, two groups, just enough blocks for every peer) into a temporary folder and points
data.source at it; each peer holds 4 train, 2 validation and 2 test blocks of 128 tokens (the default length).

The speed cost: a 64-peer job of 2 rounds x 5 local steps, with and without the trim, interleaved in one
process (median of 3), as the ratio of wall times.

    flock /tmp/p2pfed-cpu.lock .venv/bin/python benchmarks/memory.py            # 1,000 peers: a few minutes
    .venv/bin/python benchmarks/memory.py --quick                               # 64 and 256 peers

Targets: a 1,000-peer job under 2 GiB peak RSS; the trim costs under 5% (ratio trimmed / untrimmed < 1.05).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import default_config, interleaved, median, quiet, setup
from p2pfed import memory
from p2pfed.config import ExperimentConfig
from p2pfed.job import open_workspace
from p2pfed.swarm import run_job

GROUPS = ("alpha", "beta")
BLOCK_LEN, TRAIN, VAL, TEST = 128, 4, 2, 2
TARGET_MB = 2048.0
TARGET_COST = 1.05
MB = 1024 * 1024


def write_corpus(folder: Path, peers: int, seed: int = 0) -> None:
    """Two groups of seeded pseudo-words, each with a little more text than its peers' blocks need."""
    rng = random.Random(seed)
    per_group = (peers + len(GROUPS) - 1) // len(GROUPS) * (TRAIN + VAL + TEST) * BLOCK_LEN * 11 // 10
    for group in GROUPS:
        letters = "aeioulnrst" if group == "alpha" else "aeioumpkdg"  # two "languages" that differ
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(400)]
        parts, size = [], 0
        while size < per_group:
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".\n"
            parts.append(sentence)
            size += len(sentence)
        (folder / f"{group}.txt").write_text("".join(parts), encoding="utf-8")


def job_config(source: Path, peers: int, rounds: int, steps: int) -> ExperimentConfig:
    return default_config(
        f"num_peers={peers}", 'schemes=["validation"]', 'topology="ring"', f"training.rounds={rounds}",
        f"training.local_steps={steps}", f'data.source="{source}"', f"data.groups={json.dumps(list(GROUPS))}",
        f"data.block_len={BLOCK_LEN}", f"data.train_blocks={TRAIN}", f"data.val_blocks={VAL}",
        f"data.test_blocks={TEST}",
    )


def without_trim() -> None:
    memory.trim_heap = lambda: False  # what the swarm did before: freed pages stay with glibc


def child(peers: int, trim: bool) -> dict:
    setup()
    if not trim:
        without_trim()
    with tempfile.TemporaryDirectory() as folder:
        write_corpus(Path(folder), peers)
        config = job_config(Path(folder), peers, rounds=1, steps=2)
        workspace = open_workspace(config, log=quiet)
        base = psutil.Process().memory_info().rss / MB
        start = time.perf_counter()
        result = run_job(config, workspace, "validation", 0)
        wall = time.perf_counter() - start
    ppl = [p.rounds[-1].test_ppl for p in result.peers.values()]
    return {"peers": peers, "trim": trim, "base_mb": base, "wall_s": wall,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "finite": all(x is not None and x < float("inf") for x in ppl)}


def speed_child() -> dict:
    """Wall time of a 64-peer job with and without the trim, interleaved in this one process."""
    setup()
    original = memory.trim_heap
    with tempfile.TemporaryDirectory() as folder:
        write_corpus(Path(folder), 64)
        config = job_config(Path(folder), 64, rounds=2, steps=5)
        workspace = open_workspace(config, log=quiet)

        def run(trim: bool):
            memory.trim_heap = original if trim else (lambda: False)
            return lambda: run_job(config, workspace, "validation", 0)

        times = interleaved({"trimmed": run(True), "untrimmed": run(False)}, repeats=3)
    return {name: median(values) for name, values in times.items()}


def run_child(*args: str) -> dict:
    output = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(counts: tuple[int, ...] = (64, 1000)) -> dict:
    rows = [run_child("--child", str(n), "--trim", trim) for n in counts for trim in ("off", "on")]
    print(f"memory: one job in one process, peak RSS (ru_maxrss); each peer {TRAIN}+{VAL}+{TEST} blocks of "
          f"{BLOCK_LEN} tokens, 1 round of 2 steps, validation trust on a ring")
    print(f"  {'peers':>5}  {'trim':>4}  {'base RSS':>9}  {'peak RSS':>9}  {'per peer':>9}  {'wall':>7}")
    for row in rows:
        row["per_peer_mb"] = (row["peak_mb"] - row["base_mb"]) / row["peers"]
        print(f"  {row['peers']:5d}  {'on' if row['trim'] else 'off':>4}  {row['base_mb']:7.0f}MB  "
              f"{row['peak_mb']:7.0f}MB  {row['per_peer_mb']:7.3f}MB  {row['wall_s']:6.1f}s"
              + ("" if row["finite"] else "  (a test perplexity is not finite)"))
    largest = max((r for r in rows if r["trim"]), key=lambda r: r["peers"])
    untrimmed = next(r for r in rows if r["peers"] == largest["peers"] and not r["trim"])
    print(f"  {largest['peers']} peers with the trim: peak {largest['peak_mb']:.0f} MB "
          f"(target < {TARGET_MB:.0f} MB), {untrimmed['peak_mb'] / largest['peak_mb']:.2f}x less than without; "
          f"wall time trimmed / untrimmed {largest['wall_s'] / untrimmed['wall_s']:.3f} (one run each)")
    speed = run_child("--speed")
    cost = speed["trimmed"] / speed["untrimmed"]
    print(f"  speed: 64 peers x 2 rounds x 5 steps, trimmed / untrimmed wall time {cost:.3f} "
          f"(target < {TARGET_COST}; median of 3 interleaved)")
    return {"rows": rows, "largest_peak_mb": largest["peak_mb"], "target_mb": TARGET_MB,
            "trim_time_ratio": cost, "target_cost": TARGET_COST}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 and 256 peers instead of 64 and 1,000")
    parser.add_argument("--child", type=int, help="internal: run one job of this many peers, print JSON")
    parser.add_argument("--trim", choices=("on", "off"), default="on", help="internal, with --child")
    parser.add_argument("--speed", action="store_true", help="internal: the speed comparison, print JSON")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.trim == "on")))
    elif args.speed:
        print(json.dumps(speed_child()))
    else:
        main((64, 256) if args.quick else (64, 1000))
