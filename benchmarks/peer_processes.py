"""Light libp2p peer processes: 16 peers as separate `python -m p2pfed peer` processes against the same 16
forked from one fork server (what `runtime = "libp2p"` does now).

One job of the default experiment (16 peers on a complete graph, FedAvg, 2 rounds of 2 local steps, 16 training,
4 validation and 4 test blocks each) is run both ways through p2pfed.launch (SeparatePeers, ForkedPeers).
While it runs, every 0.3 s, the proportional set size of all its processes (the fork server included) is
summed from /proc/PID/smaps_rollup: PSS splits each shared page among the processes sharing it, so the sum
is what the job really takes. Each peer's start-up CPU is its user + system CPU time when its log first says
it listens (a forked child's count starts at the fork); the fork server's own CPU (imports, loading the base)
is reported beside it, paid once per job. Linux only (/proc).

    flock /tmp/p2pfed-cpu.lock .venv/bin/python benchmarks/peer_processes.py

Targets: total PSS of 16 forked peers < 4 GB; start-up CPU per forked peer <= 1 s.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from common import default_config, quiet, setup
from p2pfed.job import job_setup, open_workspace
from p2pfed.launch import ForkedPeers, SeparatePeers, free_ports, peer_configs, write_peer_toml

PEERS = 16
TICKS = os.sysconf("SC_CLK_TCK")


def pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0  # ended meanwhile
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")), 0)


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def measure(kind, files) -> dict:
    peak, startup, server_cpu = 0, {}, None
    done = threading.Event()
    started = time.perf_counter()
    all_listening = None

    def sample() -> None:
        nonlocal peak, server_cpu, all_listening
        while not done.is_set():
            pids = dict(running.pids)
            server = getattr(running, "server", None)
            total = sum(pss_kb(pid) for pid in pids.values()) + (pss_kb(server.pid) if server else 0)
            peak = max(peak, total)
            for name, pid in pids.items():
                if name not in startup and "listening on" in (Path(files_of[name]).read_text(errors="replace")):
                    startup[name] = cpu_s(pid)
                    if server is not None and server_cpu is None:
                        server_cpu = cpu_s(server.pid)
            if all_listening is None and len(startup) == len(files):
                all_listening = time.perf_counter() - started
            time.sleep(0.3)

    files_of = {name: log for name, _, log in files}
    with kind(files) as running:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        codes = dict(running.exits(limit=900))
        done.set()
        sampler.join()
    assert set(codes.values()) == {0}, codes
    per_peer = sorted(startup.values())
    return {"pss_mb": round(peak / 1024), "startup_cpu_s_mean": round(sum(per_peer) / len(per_peer), 2),
            "startup_cpu_s_max": round(per_peer[-1], 2),
            "server_cpu_s": round(server_cpu, 2) if server_cpu is not None else None,
            "all_listening_s": round(all_listening or float("nan"), 1),
            "job_s": round(time.perf_counter() - started, 1)}


def main() -> dict:
    setup()
    config = default_config(f"num_peers={PEERS}", "training.rounds=2", "training.local_steps=2",
                            "data.train_blocks=16", "data.val_blocks=4", "data.test_blocks=4",
                            "network.round_timeout_s=120")
    workspace = open_workspace(config, log=quiet)
    graph, _ = job_setup(config, workspace, seed=0)
    result, load_before = {}, os.getloadavg()[0]
    for label, kind in (("separate", SeparatePeers), ("forked", ForkedPeers)):
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for peer in peer_configs(config, graph, "fedavg", 0, Path(tmp), free_ports(PEERS)):
                path = Path(tmp) / f"{peer.name}.toml"
                write_peer_toml(peer, path)
                files.append((peer.name, path, Path(tmp) / f"{peer.name}.log"))
            result[label] = measure(kind, files)
    separate, forked = result["separate"], result["forked"]
    result["pss_ratio_separate_over_forked"] = round(separate["pss_mb"] / forked["pss_mb"], 2)
    result["load_before"], result["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    print(f"{PEERS} peers: total PSS {separate['pss_mb']} MB as separate processes, {forked['pss_mb']} MB forked "
          f"(target < 4096); start-up CPU per peer {separate['startup_cpu_s_mean']} s separate, "
          f"{forked['startup_cpu_s_mean']} s forked (max {forked['startup_cpu_s_max']}; target <= 1) plus "
          f"{forked['server_cpu_s']} s once in the fork server; all listening after {separate['all_listening_s']} s "
          f"/ {forked['all_listening_s']} s; load average {result['load_before']} before, {result['load_after']} after")
    return result


if __name__ == "__main__":
    main()
