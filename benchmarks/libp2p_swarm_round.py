"""Round time of a 4-process libp2p swarm on loopback against the same swarm in one process.

Both runtimes run the same job (4 peers, validation trust, the default model). Each job is run with R1
and R2 rounds, and the round time is (time(R2) - time(R1)) / (R2 - R1): process start-up, imports and
the round-0 evaluation cancel out. The in-process swarm runs on a virtual clock (no waiting); the
libp2p swarm pays for real messages, four processes sharing the machine's cores, and each process
training only its own peer. Ratio > 1: a networked round is slower.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import default_config, quiet, setup

from p2pfed.launch import run_job_libp2p
from p2pfed.job import open_workspace
from p2pfed.swarm import run_job

SCHEME = "validation"
ROUNDS = (2, 6)


def main(repeats: int = 2) -> dict:
    setup()
    overrides = ("num_peers=4", 'schemes=["validation"]', "training.local_steps=10")
    configs = {r: default_config(*overrides, f"training.rounds={r}") for r in ROUNDS}
    workspace = open_workspace(configs[ROUNDS[0]], log=quiet)
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repetition in range(repeats):
            for rounds, config in configs.items():
                for runtime in ("inprocess", "libp2p"):
                    start = time.perf_counter()
                    if runtime == "inprocess":
                        run_job(config, workspace, SCHEME, seed=0)
                    else:
                        run_job_libp2p(config, workspace, SCHEME, seed=0, run_dir=Path(tmp) / f"{repetition}-{rounds}")
                    times.setdefault((runtime, rounds), []).append(time.perf_counter() - start)
    per_round = {runtime: (min(times[(runtime, ROUNDS[1])]) - min(times[(runtime, ROUNDS[0])]))
                 / (ROUNDS[1] - ROUNDS[0]) for runtime in ("inprocess", "libp2p")}
    result = {
        "inprocess_round_s": per_round["inprocess"],
        "libp2p_round_s": per_round["libp2p"],
        "ratio_libp2p_over_inprocess": per_round["libp2p"] / per_round["inprocess"],
        "libp2p_startup_s": min(times[("libp2p", ROUNDS[0])]) - ROUNDS[0] * per_round["libp2p"],
    }
    print(f"round time, 4 peers: in-process {result['inprocess_round_s']:.2f} s, 4 libp2p processes "
          f"{result['libp2p_round_s']:.2f} s (ratio {result['ratio_libp2p_over_inprocess']:.2f}); "
          f"libp2p start-up {result['libp2p_startup_s']:.1f} s")
    return result


if __name__ == "__main__":
    main()
