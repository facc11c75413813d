"""One job on every core: a 64-peer in-process job in one process against the same job in 2 worker processes.

The default experiment with 64 peers (8 training, 2 validation, 2 test blocks each: the built-in text cut 64 ways)
on a random 6-regular graph, FedAvg, 3 rounds of 2 local steps: the
peer-steps per second of the whole job (set-up, round-0 and last-round evaluation, the worker processes'
start included; the fork server is started by a small job first, as it is once per process) with
`job_workers = 1` and `= 2`, timed alternately, and whether both give the same records. The load average
before and after is printed: other processes on a 2-core machine take from the second worker first.

    flock /tmp/p2pfed-cpu.lock .venv/bin/python benchmarks/job_workers.py

Target: 2 workers / 1 >= 1.7 on 2 cores, same records.
"""

from __future__ import annotations

import dataclasses
import os
import time

from common import default_config, interleaved, median, quiet, setup
from p2pfed.job import open_workspace
from p2pfed.swarm import run_job

PEERS, ROUNDS, STEPS = 64, 3, 2


def main(repeats: int = 1) -> dict:
    setup()
    config = default_config(f"num_peers={PEERS}", f"training.rounds={ROUNDS}", f"training.local_steps={STEPS}",
                            'topology={generator="random_regular", params={d=6}}', 'schemes=["fedavg"]',
                            "data.train_blocks=8", "data.val_blocks=2", "data.test_blocks=2")  # the built-in text, 64 ways
    workspace = open_workspace(config, log=quiet)
    jobs = {workers: dataclasses.replace(config, job_workers=workers) for workers in (1, 2)}
    small = dataclasses.replace(config, num_peers=4, job_workers=2, training=dataclasses.replace(
        config.training, rounds=1, local_steps=1), topology=dataclasses.replace(config.topology, params={"d": 2}))
    run_job(small, workspace, "fedavg", seed=0)  # starts the fork server (once per process)
    records: dict[int, dict] = {}

    def side(workers: int):
        def run() -> None:
            job = run_job(jobs[workers], workspace, "fedavg", seed=0)
            records[workers] = {name: peer.to_json() for name, peer in job.peers.items()}
        return run

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    times = interleaved({"1": side(1), "2": side(2)}, repeats=repeats, warmup=0)
    load_after = os.getloadavg()[0]
    steps = PEERS * ROUNDS * STEPS
    rate = {w: steps / median(times[w]) for w in times}
    result = {
        "peer_steps_per_s_1": round(rate["1"], 1), "peer_steps_per_s_2": round(rate["2"], 1),
        "ratio_2_over_1": round(rate["2"] / rate["1"], 3), "same_records": int(records[1] == records[2]),
        "load_before": round(load_before, 2), "load_after": round(load_after, 2), "cores": os.cpu_count(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"{PEERS} peers, {ROUNDS} rounds x {STEPS} steps: {rate['1']:.1f} peer-steps/s in 1 process, "
          f"{rate['2']:.1f} in 2 ({result['ratio_2_over_1']:.2f}x; target >= 1.7 on 2 cores); "
          f"same records: {'yes' if result['same_records'] else 'NO'}; load average {load_before:.2f} before, "
          f"{load_after:.2f} after, {os.cpu_count()} cores")
    return result


if __name__ == "__main__":
    main()
