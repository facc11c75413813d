"""Resident memory per simulated peer: 8, 32 and 64 peers sharing one frozen base model.

Each N runs in a fresh process (this script with `--peers N`), so that no earlier measurement's
allocations linger. The child builds the workspace, trains one throw-away adapter for a few steps
(so the activation buffers and malloc arenas of a training step exist before the baseline), then
creates N peers - adapter (trainable_copy), AdamW, two training steps each through the host, as a
swarm peer trains - and reports how much its RSS grew.

Theory per peer: LoRA parameters x 4 bytes x 4 - the weights, AdamW's exp_avg and exp_avg_sq, and
the gradients, which a peer keeps between steps (zero_grad comes before backward).

RSS counts heap pages glibc keeps after the training steps free their activations: the peers' small
long-lived tensors land between them and pin the heap. The child also reports RSS after
malloc_trim(0), which returns those free pages, to show the live memory apart from that retention.

    .venv/bin/python benchmarks/memory.py

Target: total RSS under 2 GiB with 64 peers.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys

import psutil
import torch

from common import default_config, quiet, setup
from p2pfed.data import batches
from p2pfed.model import AdapterHost, trainable_copy, train_steps
from p2pfed.seeding import generator
from p2pfed.job import job_setup, open_workspace

PEER_COUNTS = (8, 32, 64)
STEPS_PER_PEER = 2
TARGET_TOTAL_MB = 2048.0
MB = 1024 * 1024


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / MB


def trimmed_rss_mb() -> float | None:
    """RSS after glibc hands its free heap pages back; None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return None
    return rss_mb()


def new_peer(host: AdapterHost, initial, stream, lr: float) -> tuple[dict, torch.optim.Optimizer]:
    """A peer's own state after a few steps: its adapter, its AdamW (state now allocated), its grads."""
    adapter = trainable_copy(initial)
    optimizer = torch.optim.AdamW(adapter.values(), lr=lr)
    train_steps(host, adapter, optimizer, stream, STEPS_PER_PEER)
    return adapter, optimizer


def measure(num_peers: int) -> dict:
    """Run in the child process: RSS before and after creating `num_peers` trained peers."""
    setup()
    config = default_config()
    workspace = open_workspace(config, log=quiet)
    _, data = job_setup(config, workspace, 0)
    # The data split fits 8 peers; peers share its batches, which is fine: data is not what is measured.
    stream = batches(torch.cat([d.train for d in data]), config.training.batch_size, generator(0, "memory"))
    initial = workspace.host.initial_adapter(0)
    new_peer(workspace.host, initial, stream, config.training.lr)  # warm-up, dropped
    # Trim before the baseline too, so that free pages left by loading cannot absorb (hide) the growth.
    before = trimmed_rss_mb() or rss_mb()
    peers = [new_peer(workspace.host, initial, stream, config.training.lr) for _ in range(num_peers)]
    after = rss_mb()
    live = trimmed_rss_mb()
    params = sum(t.numel() for t in initial.values())
    del peers
    return {"peers": num_peers, "before_mb": before, "after_mb": after, "trimmed_mb": live, "lora_params": params}


def run_child(num_peers: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--peers", str(num_peers)], check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> dict:
    setup()
    rows = [run_child(n) for n in PEER_COUNTS]
    params = rows[0]["lora_params"]
    theory_mb = params * 4 * 4 / MB
    print(f"memory: {params} LoRA parameters per peer; theory {theory_mb:.3f} MB per peer "
          f"(weights + grads + AdamW exp_avg, exp_avg_sq, fp32)")
    print(f"  {'peers':>5}  {'base RSS':>9}  {'total RSS':>9}  {'growth':>8}  {'per peer':>9}  "
          f"{'per peer after malloc_trim':>26}")
    for row in rows:
        growth = row["after_mb"] - row["before_mb"]
        row["per_peer_mb"] = growth / row["peers"]
        row["live_per_peer_mb"] = None if row["trimmed_mb"] is None else (
            (row["trimmed_mb"] - row["before_mb"]) / row["peers"])
        live = "n/a" if row["live_per_peer_mb"] is None else f"{row['live_per_peer_mb']:.3f}MB"
        print(f"  {row['peers']:5d}  {row['before_mb']:7.0f}MB  {row['after_mb']:7.0f}MB  {growth:6.1f}MB  "
              f"{row['per_peer_mb']:7.3f}MB  {live:>26}")
    # The slope between the smallest and largest N drops whatever fixed cost each child paid once.
    first, last = rows[0], rows[-1]
    slope = ((last["after_mb"] - last["before_mb"]) - (first["after_mb"] - first["before_mb"])) / (
        last["peers"] - first["peers"])
    total = last["after_mb"]
    live = last["live_per_peer_mb"]
    print(f"  RSS: marginal {slope:.3f} MB per peer = {slope / theory_mb:.1f} x theory; "
          f"total with {last['peers']} peers {total:.0f} MB (target < {TARGET_TOTAL_MB:.0f} MB)")
    if live is not None:
        print(f"  live (after malloc_trim): {live:.3f} MB per peer = {live / theory_mb:.1f} x theory; the rest is "
              f"free heap glibc keeps between peers")
    return {"rows": rows, "theory_mb_per_peer": theory_mb, "marginal_mb_per_peer": slope,
            "ratio_marginal_over_theory": slope / theory_mb, "live_mb_per_peer": live,
            "ratio_live_over_theory": None if live is None else live / theory_mb,
            "total_mb_64": total, "target_total_mb": TARGET_TOTAL_MB}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, help="internal: measure this many peers and print JSON")
    args = parser.parse_args()
    if args.peers:
        print(json.dumps(measure(args.peers)))
    else:
        main()
