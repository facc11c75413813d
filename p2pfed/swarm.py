"""Run N peers in one process: one shared frozen base model, per-peer adapters, an in-memory network.

A job is one (scheme, seed) pair of an experiment. Every job of a seed sees the same data split, the same
graph and the same shared adapter init, so schemes differ only in how peers trust and aggregate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import trio
import trio.testing

from p2pfed.config import ExperimentConfig, Method, PeerProfile, parse_method
from p2pfed.data import PeerData, load_group_texts, make_peer_data, tokenize_groups
from p2pfed.model import AdapterHost, AdapterLayout, BaseModel, attach_adapters, load_base_model
from p2pfed.peer import PeerHooks, PeerLoop, PeerResult, PeerSpec, RoundRecord
from p2pfed.seeding import derive_seed
from p2pfed.topology import build_graph, neighbours, peer_index, peer_name
from p2pfed.net.memory import InMemoryNetwork

RoundCallback = Callable[[str, RoundRecord], None]


@dataclass
class Workspace:
    """What all jobs of an experiment in one process share: the frozen model and the tokenized corpus.

    Hosts (the base with plain LoRA, or with expert layers) are built on first use; they share the
    base model's frozen weights.
    """

    config: ExperimentConfig
    base: BaseModel
    tokens: dict
    _hosts: dict[bool, AdapterHost] = field(default_factory=dict)

    @property
    def host(self) -> AdapterHost:
        """The plain-LoRA host."""
        return self.host_for(experts=False)

    def host_for(self, experts: bool) -> AdapterHost:
        if experts not in self._hosts:
            self._hosts[experts] = attach_adapters(self.base, self.config.lora,
                                                   self.config.experts if experts else None)
        return self._hosts[experts]


def open_workspace(config: ExperimentConfig, log=print) -> Workspace:
    base = load_base_model(config.model, log=log)
    texts = load_group_texts(config.data.source, config.data.groups)
    return Workspace(config=config, base=base, tokens=tokenize_groups(texts, base.tokenizer.encode))


@dataclass(frozen=True)
class JobResult:
    scheme: str
    seed: int
    peers: dict[str, PeerResult]
    graph_edges: list[tuple[str, str]]
    groups: dict[str, str]  # each peer's dominant data group, for plots and the oracle row
    profiles: dict[str, str]  # each peer's profile name


def job_setup(config: ExperimentConfig, workspace: Workspace, seed: int) -> tuple[nx.Graph, list[PeerData]]:
    graph = build_graph(config.topology, config.num_peers, seed)
    data = make_peer_data(workspace.tokens, config.num_peers, config.data, seed)
    return graph, data


def layout_for(method: Method, profile: PeerProfile, default_rank: int) -> AdapterLayout:
    """A peer's adapter under `method`: its profile's rank and, for comigs methods, its specialists."""
    specialists = method.specialists
    if specialists and profile.specialists is not None:
        specialists = profile.specialists
    return AdapterLayout(profile.rank or default_rank, method.generalists, specialists)


def peer_specs(config: ExperimentConfig, graph: nx.Graph, data: list[PeerData], scheme: str,
               seed: int, state_root: Path | None = None) -> list[PeerSpec]:
    """Each peer's spec; with `state_root`, peer i checkpoints to (and resumes from) state_root/peer<i>."""
    method = parse_method(scheme)
    mixtures = {d.name: d.mixture for d in data} if method.trust == "oracle" else None
    return [
        PeerSpec(
            name=peer_name(i), neighbours=tuple(peer_name(j) for j in neighbours(graph, i)), method=method,
            layout=layout_for(method, config.profile_of(i), config.lora.rank), experts=config.experts,
            seed=seed, training=config.training, trust=config.trust, network=config.network,
            oracle_mixtures=mixtures,
            state_dir=str(state_root / peer_name(i)) if state_root is not None else None,
        )
        for i in range(config.num_peers)
    ]


def run_job(config: ExperimentConfig, workspace: Workspace, scheme: str, seed: int,
            on_round: RoundCallback | None = None, state_root: Path | None = None) -> JobResult:
    graph, data = job_setup(config, workspace, seed)
    specs = peer_specs(config, graph, data, scheme, seed, state_root)
    host = workspace.host_for(experts=specs[0].method.has_experts)
    network = InMemoryNetwork(config.network, derive_seed(seed, "net"))
    # Peers of one layout start from the same seeded adapter; the seed does not depend on the scheme.
    peers = [PeerLoop(spec, host, d, network.endpoint(spec.name),
                  host.initial_adapter(derive_seed(seed, "shared-init"), spec.layout), PeerHooks(on_round=on_round))
             for spec, d in zip(specs, data)]
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
    return JobResult(
        scheme=scheme, seed=seed, peers={name: results[name] for name in sorted(results, key=peer_index)},
        graph_edges=[(peer_name(u), peer_name(v)) for u, v in graph.edges()],
        groups={d.name: d.group for d in data},
        profiles={peer_name(i): config.profile_of(i).name for i in range(config.num_peers)},
    )


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of trio's nested exception groups: a peer's own error, not the nurseries around it."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _run_into(peer: PeerLoop, results: dict[str, PeerResult]) -> None:
    results[peer.spec.name] = await peer.run()

