"""The libp2p runtime of an experiment: each (scheme, seed) job as N `p2pfed peer` processes on loopback.

The launcher writes one PEER.toml per peer (identity, port, neighbours' peer IDs and addresses, the
experiment's sections), starts the processes, waits, and reads back each peer's result.json into the same
JobResult the in-process runtime returns, so results.json and the plots are the same. The processes are forked
from one fork server (p2pfed.forkserver) that loads torch, libp2p and the frozen base once for all of them;
each still runs exactly `p2pfed peer PEER.toml`. Without os.fork, each is a `python -m p2pfed peer` of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import tomli_w

from p2pfed.attacks import attack_of
from p2pfed.config import AttackConfig, ExperimentConfig, NeighbourConfig, PeerConfig, peer_name
from p2pfed.load import to_dict
from p2pfed.job import JobResult, Workspace, job_setup
from p2pfed.seeding import derive_seed
from p2pfed.topology import is_resampled, neighbours

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Ports free on loopback right now (held together while choosing, so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def loopback_addr(port: int) -> str:
    return f"/ip4/{LOOPBACK}/tcp/{port}"


def peer_configs(config: ExperimentConfig, graph, scheme: str, seed: int, job_dir: Path,
                 ports: list[int]) -> list[PeerConfig]:
    """The experiment's job as one PeerConfig per peer. Identities come from seeds: loopback experiments only."""
    from p2pfed.net.identity import identity_from_seed, peer_id_of

    identity_seeds = [derive_seed(seed, "identity", peer_name(i)) for i in range(config.num_peers)]
    peer_ids = [peer_id_of(identity_from_seed(s)) for s in identity_seeds]
    return swarm_configs(config, graph, scheme, seed, peer_ids, [loopback_addr(port) for port in ports],
                         lambda i: {"identity_seed": identity_seeds[i], "state_dir": str(job_dir / peer_name(i))})


def swarm_configs(config: ExperimentConfig, graph, scheme: str, seed: int, peer_ids: list[str], addrs: list[str],
                  own: Callable[[int], dict]) -> list[PeerConfig]:
    """One PeerConfig per peer, listening on addrs[i], with `own(i)`'s keys (identity, state_dir).

    Each lists its neighbours in `graph` (for a resampled topology, job_setup's union over the rounds) with
    their peer IDs and addresses; a resampled topology travels in the file too, so that every peer computes
    its own neighbours of each round from it and the seed, as the in-process swarm does.
    """
    topology = config.topology if is_resampled(config.topology) else None
    return [PeerConfig(
        name=peer_name(i), scheme=scheme, seed=seed, num_peers=config.num_peers, profile=config.profile_of(i),
        listen=(addrs[i],), topology=topology,
        neighbours=tuple(NeighbourConfig(peer_name(j), peer_ids[j], (addrs[j],)) for j in neighbours(graph, i)),
        attack=_attack_of(config, peer_name(i)), plugins=config.plugins, **own(i), **config.sections(),
    ) for i in range(config.num_peers)]


def _attack_of(config: ExperimentConfig, name: str) -> AttackConfig | None:
    attack = attack_of(config.attack, name)
    return dataclasses.replace(attack, peers=(name,)) if attack is not None else None


def write_peer_toml(config: PeerConfig, path: Path) -> None:
    data = _without_none(to_dict(config))
    path.write_text(tomli_w.dumps(data), encoding="utf-8")


def _without_none(value):
    # TOML has no null: an absent key takes the dataclass default, which is None for these fields.
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def run_job_libp2p(config: ExperimentConfig, workspace: Workspace, scheme: str, seed: int, run_dir: Path,
                   on_peer_done=None) -> JobResult:
    """Run one job as N peer processes; raise RuntimeError (with the failing peer's log) if one fails."""
    from p2pfed.peer import RESULT_FILE
    from p2pfed.records import PeerResult

    graph, data = job_setup(config, workspace, seed)
    job_dir = run_dir / "libp2p" / f"{scheme.replace(':', '_')}-seed{seed}"
    job_dir.mkdir(parents=True, exist_ok=True)
    configs = peer_configs(config, graph, scheme, seed, job_dir, free_ports(config.num_peers))
    files = []
    for peer in configs:
        path = job_dir / f"{peer.name}.toml"
        write_peer_toml(peer, path)
        files.append((peer.name, path, job_dir / f"{peer.name}.log"))
    # Generous: every round may wait out its deadline, and the processes import torch and libp2p first.
    limit = 120 + config.training.rounds * (config.network.round_timeout_s + 30)
    with (ForkedPeers if hasattr(os, "fork") else SeparatePeers)(files) as running:
        for name, code in running.exits(limit):
            if code != 0:
                tail = (job_dir / f"{name}.log").read_text(encoding="utf-8")[-2000:]
                raise RuntimeError(f"peer process {name} of {scheme} seed {seed} exited with {code}:\n{tail}")
            if on_peer_done is not None:
                on_peer_done(name)
    peers = {}
    for peer in configs:
        result = json.loads((Path(peer.state_dir) / RESULT_FILE).read_text(encoding="utf-8"))
        peers[peer.name] = PeerResult.from_json(result)
    return JobResult.of(config, scheme, seed, graph, data, peers)


PeerFiles = list[tuple[str, Path, Path]]  # (name, PEER.toml, its log) per peer


class ForkedPeers:
    """A job's peers as the children of one fork server (p2pfed.forkserver): torch, transformers, peft, libp2p
    and the frozen base loaded once and shared. Use with `with`: leaving kills whatever still runs."""

    def __init__(self, files: PeerFiles):
        self.files = files
        self.pids: dict[str, int] = {}  # each child's, as the server reports it
        self.server: subprocess.Popen | None = None
        self._exited: set[str] = set()

    def __enter__(self) -> "ForkedPeers":
        args = [str(part) for _, path, log in self.files for part in (path, log)]
        log = self.files[0][1].parent / "forkserver.log"
        with open(log, "w", encoding="utf-8") as errors:  # the child keeps its own copy of the descriptor
            self.server = subprocess.Popen([sys.executable, "-m", "p2pfed.forkserver", *args],
                                           stdout=subprocess.PIPE, stderr=errors, text=True)
        return self

    def exits(self, limit: float) -> Iterator[tuple[str, int]]:
        """(name, exit status) of each peer as it ends; TimeoutExpired after `limit` seconds."""
        deadline = time.monotonic() + limit
        while len(self._exited) < len(self.files):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.server.stdout], [], [], remaining)[0]:
                raise subprocess.TimeoutExpired(self.server.args, limit)
            line = self.server.stdout.readline()
            if not line:
                self.server.wait()
                raise RuntimeError(f"the peers' fork server exited with {self.server.returncode} before every "
                                   f"peer ended; see {self.files[0][1].parent / 'forkserver.log'}")
            event, name, number = line.split()
            if event == "started":
                self.pids[name] = int(number)
            elif event == "exited":
                self._exited.add(name)
                yield name, int(number)

    def __exit__(self, *exc_info) -> None:
        for name, pid in self.pids.items():
            if name not in self._exited:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.server.poll() is None:
            self.server.kill()
        self.server.wait()
        self.server.stdout.close()


class SeparatePeers:
    """A job's peers as one `python -m p2pfed peer` process each (where there is no fork; and to compare)."""

    def __init__(self, files: PeerFiles):
        self.files = files
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs = []

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def __enter__(self) -> "SeparatePeers":
        for name, path, log in self.files:
            self._logs.append(open(log, "w", encoding="utf-8"))
            command = [sys.executable, "-m", "p2pfed", "peer", str(path), "--quiet"]
            self.processes[name] = subprocess.Popen(command, stdout=self._logs[-1], stderr=subprocess.STDOUT)
        return self

    def exits(self, limit: float) -> Iterator[tuple[str, int]]:
        started = time.monotonic()
        for name, process in self.processes.items():
            yield name, process.wait(timeout=max(1.0, limit - (time.monotonic() - started)))

    def __exit__(self, *exc_info) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()


__all__ = ["ForkedPeers", "SeparatePeers", "free_ports", "peer_configs", "swarm_configs", "write_peer_toml",
           "run_job_libp2p"]
