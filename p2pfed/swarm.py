"""Run a job's N peers in one process: one shared frozen base model, per-peer adapters, an in-memory network."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from p2pfed.config import ExperimentConfig
from p2pfed.errors import first_error
from p2pfed.data import PeerData
from p2pfed.job import GraphSource, JobResult, Workspace, job_setup, peer_loops, peer_specs
from p2pfed.loop import PeerHooks
from p2pfed.memory import HeapTrimmer
from p2pfed.net import wire
from p2pfed.net.memory import InMemoryNetwork
from p2pfed.records import PeerResult, RoundRecord
from p2pfed.seeding import derive_seed
from p2pfed.swarm_workers import run_peers, run_spread

RoundCallback = Callable[[str, RoundRecord], None]
UpdateCallback = Callable[[str, wire.UpdateMessage], None]


def run_job(config: ExperimentConfig, workspace: Workspace, scheme: str, seed: int,
            on_round: RoundCallback | None = None, state_root: Path | None = None, *,
            graph: GraphSource | None = None, data: list[PeerData] | None = None,
            on_update: UpdateCallback | None = None) -> JobResult:
    """One job's peers on a virtual clock. `graph` and `data` replace the config's (job.job_setup);
    `on_round` and `on_update` are the peers' hooks (loop.PeerHooks). With `job_workers` > 1 the peers run in
    that many processes (p2pfed.swarm_workers)."""
    source = graph  # a function round -> graph: each peer follows it round by round
    graph, data = job_setup(config, workspace, seed, source, data)
    specs = peer_specs(config, graph, data, scheme, seed, state_root, source)
    if config.job_workers > 1 and len(specs) > 1:  # the same records, the peers on several cores
        results = run_spread(config, seed, specs, data, on_round, on_update, compute=HeapTrimmer())
        return JobResult.of(config, scheme, seed, graph, data, results)
    host = workspace.host_for(specs[0].scheme)
    network = InMemoryNetwork(config.network, derive_seed(seed, "net"))
    # Now and then, after a peer's model work, freed heap pages go back: else glibc keeps them (p2pfed.memory).
    hooks = PeerHooks(on_round=on_round, on_update=on_update, compute=HeapTrimmer())
    peers = peer_loops(config, host, specs, data, network.endpoint, hooks)
    results: dict[str, PeerResult] = {}

    async def main() -> None:
        async with network.running():
            await run_peers(peers, results)

    # A virtual clock that jumps whenever every peer waits: deadlines cost no wall time in simulation.
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    except BaseExceptionGroup as group:
        raise first_error(group) from group
    return JobResult.of(config, scheme, seed, graph, data, results)
