"""Run N peers in one process: one shared frozen base model, per-peer adapters, an in-memory network.

A job is one (scheme, seed) pair of an experiment. Every job of a seed sees the same data split, the same
graph and the same shared adapter init, so schemes differ only in how peers trust and aggregate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import trio
import trio.testing

from p2pfed.config import ExperimentConfig, Scheme
from p2pfed.data import PeerData, load_group_texts, make_peer_data, tokenize_groups
from p2pfed.model import AdapterHost, BaseModel, attach_lora, load_base_model
from p2pfed.peer import Peer, PeerResult, PeerSpec, RoundRecord
from p2pfed.seeding import derive_seed
from p2pfed.topology import build_graph, neighbours, peer_name
from p2pfed.transport import InMemoryNetwork

RoundCallback = Callable[[str, RoundRecord], None]


@dataclass
class Workspace:
    """What all jobs of an experiment in one process share: the frozen model and the tokenized corpus."""

    base: BaseModel
    host: AdapterHost
    tokens: dict


def open_workspace(config: ExperimentConfig, log=print) -> Workspace:
    base = load_base_model(config.model, log=log)
    host = attach_lora(base, config.lora)
    texts = load_group_texts(config.data.source, config.data.groups)
    return Workspace(base=base, host=host, tokens=tokenize_groups(texts, base.tokenizer.encode))


@dataclass(frozen=True)
class JobResult:
    scheme: Scheme
    seed: int
    peers: dict[str, PeerResult]
    graph_edges: list[tuple[str, str]]
    groups: dict[str, str]  # each peer's dominant data group, for plots and the oracle row


def job_setup(config: ExperimentConfig, workspace: Workspace, seed: int) -> tuple[nx.Graph, list[PeerData]]:
    graph = build_graph(config.topology, config.num_peers, seed)
    data = make_peer_data(workspace.tokens, config.num_peers, config.data, seed)
    return graph, data


def peer_specs(config: ExperimentConfig, graph: nx.Graph, data: list[PeerData], scheme: Scheme,
               seed: int) -> list[PeerSpec]:
    mixtures = {d.name: d.mixture for d in data} if scheme == "oracle" else None
    return [
        PeerSpec(
            name=peer_name(i), neighbours=tuple(peer_name(j) for j in neighbours(graph, i)), scheme=scheme,
            seed=seed, training=config.training, trust=config.trust, encoding=config.network.encoding,
            round_timeout_s=config.network.round_timeout_s, max_message_bytes=config.network.max_message_bytes,
            oracle_mixtures=mixtures,
        )
        for i in range(config.num_peers)
    ]


def run_job(config: ExperimentConfig, workspace: Workspace, scheme: Scheme, seed: int,
            on_round: RoundCallback | None = None) -> JobResult:
    graph, data = job_setup(config, workspace, seed)
    specs = peer_specs(config, graph, data, scheme, seed)
    # Every peer starts from the same seeded adapter; the seed does not depend on the scheme.
    initial = workspace.host.initial_adapter(derive_seed(seed, "shared-init"))
    network = InMemoryNetwork(config.network, derive_seed(seed, "net"))
    peers = [Peer(spec, workspace.host, d, network.endpoint(spec.name), initial, on_round)
             for spec, d in zip(specs, data)]
    results: dict[str, PeerResult] = {}

    async def main() -> None:
        async with network.running():
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(_run_into, peer, results)

    # A virtual clock that jumps whenever every peer waits: deadlines cost no wall time in simulation.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return JobResult(
        scheme=scheme, seed=seed, peers={name: results[name] for name in sorted(results, key=_peer_order)},
        graph_edges=[(peer_name(u), peer_name(v)) for u, v in graph.edges()],
        groups={d.name: d.group for d in data},
    )


async def _run_into(peer: Peer, results: dict[str, PeerResult]) -> None:
    results[peer.spec.name] = await peer.run()


def _peer_order(name: str) -> int:
    return int(name.removeprefix("peer"))
