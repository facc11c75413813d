"""Run a job's N peers in one process: one shared frozen base model, per-peer adapters, an in-memory network."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from p2pfed.attacks import attack_of
from p2pfed.config import ExperimentConfig
from p2pfed.errors import first_error
from p2pfed.data import PeerData
from p2pfed.job import GraphSource, JobResult, Workspace, attacked, initial_adapter, job_setup, peer_specs
from p2pfed.loop import PeerHooks, PeerLoop
from p2pfed.memory import HeapTrimmer
from p2pfed.net import wire
from p2pfed.net.memory import InMemoryNetwork
from p2pfed.records import PeerResult, RoundRecord
from p2pfed.seeding import derive_seed
from p2pfed.swarm_workers import run_spread

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
        results = run_spread(config, seed, specs, data, on_round, on_update)
        return JobResult.of(config, scheme, seed, graph, data, results)
    host = workspace.host_for(specs[0].scheme)
    network = InMemoryNetwork(config.network, derive_seed(seed, "net"))
    peers, trimmer = [], HeapTrimmer()
    for spec, d in zip(specs, data):
        initial = initial_adapter(host, spec)
        endpoint = attacked(network.endpoint(spec.name), attack_of(config.attack, spec.name), spec, initial)
        # Now and then, after a peer's model work, freed heap pages go back: else glibc keeps them (p2pfed.memory).
        hooks = PeerHooks(on_round=on_round, on_update=on_update, compute=trimmer)
        peers.append(PeerLoop(spec, host, d, endpoint, initial, hooks))
    results: dict[str, PeerResult] = {}

    async def main() -> None:
        async with network.running():
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(_run_into, peer, results)

    # A virtual clock that jumps whenever every peer waits: deadlines cost no wall time in simulation.
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    except BaseExceptionGroup as group:
        raise first_error(group) from group
    return JobResult.of(config, scheme, seed, graph, data, results)


async def _run_into(peer: PeerLoop, results: dict[str, PeerResult]) -> None:
    results[peer.spec.name] = await peer.run()
