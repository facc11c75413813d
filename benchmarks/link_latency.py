"""Round time of a small swarm in network namespaces against link latency (0, 20, 100 ms) and 1% loss.

4 `p2pfed peer` processes on a ring, each in its own namespace (p2pfed.netlab), validation trust, 2 local steps
per round (short rounds, so the network's share shows), 6 rounds. Every link but the first row's passes the
relay in the hub (latency one way, a lost segment held by a 200 ms retransmission timeout plus a round trip).
A row's round time is the wall time from round 1's line to the last round's, per round, averaged over peers
(start-up, imports and waiting for neighbours fall before round 1 ends); each row is run `repeats` times,
interleaved with the others, and the median kept. Ratios are to the relay's 0 ms row. Needs root.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from p2pfed.netlab import can_create_namespaces, remove_stale_namespaces
from p2pfed.netlab.harness import run_swarm
from p2pfed.netlab.relay import Link

PEERS = 4
OVERRIDES = ('topology="ring"', "training.rounds=6", "training.local_steps=2", 'schemes=["validation"]')
# (label, link: None = no relay, straight across the bridge)
ROWS: list[tuple[str, Link | None]] = [
    ("no relay", None),
    ("0 ms", Link(0.0)),
    ("20 ms", Link(0.02)),
    ("100 ms", Link(0.1)),
    ("20 ms, 1% loss", Link(0.02, loss=0.01, seed=0)),
]
BASE = "0 ms"


def main(repeats: int = 2) -> dict:
    reason = can_create_namespaces()
    if reason:
        print(f"skipped: {reason}")
        return {}
    remove_stale_namespaces()
    rounds: dict[str, list[float]] = {label: [] for label, _ in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        for repetition in range(repeats):
            for i, (label, link) in enumerate(ROWS):
                run = run_swarm(PEERS, Path(tmp) / f"{repetition}-{i}", link=link, overrides=OVERRIDES, timeout_s=300)
                rounds[label].append(run.mean_round_s())
    medians = {label: statistics.median(times) for label, times in rounds.items()}
    print(f"{'link':16s} {'round s':>8s} {'ratio':>6s}   (median of {repeats}; {PEERS} peers, ring, 2 local steps)")
    for label, seconds in medians.items():
        print(f"{label:16s} {seconds:8.3f} {seconds / medians[BASE]:6.2f}")
    return {
        "round_s": medians,
        "ratio_20ms": medians["20 ms"] / medians[BASE],
        "ratio_100ms": medians["100 ms"] / medians[BASE],
        "ratio_loss": medians["20 ms, 1% loss"] / medians[BASE],
        "ratio_relay": medians[BASE] / medians["no relay"],
    }


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
