"""A job's set-up, shared by every runtime: the workspace, the graph and data split, each peer's spec.

A job is one (scheme, seed) pair of an experiment. Every job of a seed sees the same data split, the same
graph and the same shared adapter init, so schemes differ only in how peers trust and aggregate. The
in-process swarm, the networked peer and the process launcher all build their peers here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch

from p2pfed.attacks import AttackEndpoint, attack_of
from p2pfed.config import AttackConfig, ConfigError, ExperimentConfig, PeerProfile, peer_index, peer_name
from p2pfed.data import PeerData, load_group_texts, make_peer_data, tokenize_groups
from p2pfed.experts import is_shared
from p2pfed.loop import PeerHooks, PeerLoop, PeerSpec
from p2pfed.net.transport import Endpoint
from p2pfed.model import AdapterHost, AdapterLayout, BaseModel, attach_adapters, load_base_model
from p2pfed.records import PeerResult
from p2pfed.seeding import derive_seed
from p2pfed.strategies import Scheme, parse_scheme
from p2pfed.topology import (GraphAt, NeighbourSchedule, build_graph, graph_schedules, graphs_by_round, neighbours,
                             rounds_graph, union_graph)


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
        return self._host(expert_layers=False)

    def host_for(self, scheme: Scheme) -> AdapterHost:
        """The host a scheme's peers run on: expert layers for the comigs schemes, plain LoRA otherwise."""
        return self._host(scheme.has_experts)

    def _host(self, expert_layers: bool) -> AdapterHost:
        if expert_layers not in self._hosts:
            experts = self.config.experts if expert_layers else None
            self._hosts[expert_layers] = attach_adapters(self.base, self.config.lora, experts)
        return self._hosts[expert_layers]


# A workspace loaded before this process was forked from a fork server (p2pfed.forkserver): its pages are
# shared with the server's other children until written. A context variable, so it reaches only the code
# run inside `preloaded(...)` (trio passes it on to its tasks and worker threads).
_preloaded: ContextVar[Workspace | None] = ContextVar("p2pfed_preloaded_workspace", default=None)


@contextlib.contextmanager
def preloaded(workspace: Workspace) -> Iterator[None]:
    """Inside this block, open_workspace returns `workspace` for every config it serves (same_workspace)."""
    token = _preloaded.set(workspace)
    try:
        yield
    finally:
        _preloaded.reset(token)


def same_workspace(a: ExperimentConfig, b: ExperimentConfig) -> bool:
    """Whether one workspace serves both: the same model, data, LoRA and expert settings."""
    return (a.model, a.data.source, tuple(a.data.groups), a.lora, a.experts) == \
        (b.model, b.data.source, tuple(b.data.groups), b.lora, b.experts)


def open_workspace(config: ExperimentConfig, log=print) -> Workspace:
    ready = _preloaded.get()
    if ready is not None and same_workspace(ready.config, config):
        return ready
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

    @classmethod
    def of(cls, config: ExperimentConfig, scheme: str, seed: int, graph: nx.Graph, data: list[PeerData],
           peers: Mapping[str, PeerResult]) -> "JobResult":
        return cls(
            scheme=scheme, seed=seed, peers={peer_name(i): peers[peer_name(i)] for i in range(config.num_peers)},
            graph_edges=[(peer_name(u), peer_name(v)) for u, v in graph.edges()],
            groups={d.name: d.group for d in data},
            profiles={peer_name(i): config.profile_of(i).name for i in range(config.num_peers)},
        )


# What a script may hand a job instead of the config's topology: a graph, or a function round -> graph.
GraphSource = nx.Graph | Callable[[int], nx.Graph]


def job_setup(config: ExperimentConfig, workspace: Workspace, seed: int, graph: GraphSource | None = None,
              data: list[PeerData] | None = None) -> tuple[nx.Graph, list[PeerData]]:
    """The job's graph and every peer's split; `graph` and `data` (each peer's split, in peer order) replace
    the ones the config names (p2pfed.api passes them from a script). When the graph varies by round (`graph`
    is a function round -> graph, or the topology is resampled), the job's graph is every edge of some round."""
    graphs = round_graphs(config, seed, graph)
    if graphs is not None:
        graph = union_graph(graphs.values(), config.num_peers)  # a graph per round: every edge of some round
    elif graph is None:
        graph = build_graph(config.topology, config.num_peers, seed)
    return graph, (data if data is not None else peer_data(config, workspace.tokens, seed))


def graph_per_round(config: ExperimentConfig, seed: int, source: GraphSource | None) -> GraphAt | None:
    """The function round -> graph a job's peers follow: `source` when it is one; with no `source`, the
    topology's `graph_at_round` when `params.resample_every` is set; None for a static graph."""
    if source is None:
        return rounds_graph(config.topology, config.num_peers, seed)
    return None if isinstance(source, nx.Graph) else source


def round_graphs(config: ExperimentConfig, seed: int, source: GraphSource | None = None) -> dict[int, nx.Graph] | None:
    """Each round's graph (built once) when the graph varies; None when it is static."""
    graph_at = graph_per_round(config, seed, source)
    return None if graph_at is None else graphs_by_round(graph_at, config.num_peers, config.training.rounds)


def neighbour_schedules(config: ExperimentConfig, graph: nx.Graph, seed: int,
                        source: GraphSource | None = None) -> list[NeighbourSchedule] | None:
    """Each peer's neighbours round by round: the graph of each round less the peers that have not joined
    or have left (network.membership); None when every peer has the same neighbours in every round."""
    graphs = round_graphs(config, seed, source)
    if graphs is None:
        if not config.network.membership:
            return None
        graphs = {r: graph for r in range(1, config.training.rounds + 1)}
    return graph_schedules(graphs, config.num_peers, config.network)


def peer_data(config: ExperimentConfig, tokens: Mapping[str, torch.Tensor], seed: int) -> list[PeerData]:
    """Each peer's split. An `other_group` attacker trains on the training split of the first peer of
    another group (it keeps its own validation and test splits, and its claimed mixture)."""
    data = make_peer_data(tokens, config.num_peers, config.data, seed)
    for attack in config.attack:
        if attack.kind != "other_group":
            continue
        for name in attack.peers:
            mine = data[peer_index(name)]
            other = next((d for d in data if d.group != mine.group), None)
            if other is None:
                raise ConfigError(f"attack: other_group needs a second data group, but {name} has no peer of "
                                  f"another group to copy")
            data[peer_index(name)] = dataclasses.replace(mine, train=other.train)
    return data


def attacked(endpoint: Endpoint, attack: AttackConfig | None, spec: PeerSpec,
             initial: Mapping[str, torch.Tensor]) -> Endpoint:
    """`endpoint`, or an AttackEndpoint around it when this peer attacks its neighbours."""
    if attack is None:
        return endpoint
    shared = {n: t.cpu() for n, t in initial.items() if is_shared(n)}  # attacks rewrite payloads decoded on the CPU
    return AttackEndpoint(endpoint, attack, shared, spec.seed)


def layout_for(scheme: Scheme, profile: PeerProfile, default_rank: int) -> AdapterLayout:
    """A peer's adapter under `scheme`: its profile's rank and, for comigs schemes, its specialists."""
    specialists = scheme.specialists
    if specialists and profile.specialists is not None:
        specialists = profile.specialists
    return AdapterLayout(profile.rank or default_rank, scheme.generalists, specialists)


def peer_spec(config: ExperimentConfig, index: int, neighbour_names: tuple[str, ...], scheme: str, seed: int,
              state_dir: str | None = None, checkpoint_every: int = 1,
              oracle_mixtures: Mapping[str, Mapping[str, float]] | None = None,
              schedule: NeighbourSchedule | None = None) -> PeerSpec:
    """The spec of peer `index` of a job: the one place a peer's settings are put together."""
    parsed = parse_scheme(scheme)
    return PeerSpec(
        name=peer_name(index), neighbours=neighbour_names, scheme=parsed,
        layout=layout_for(parsed, config.profile_of(index), config.lora.rank), experts=config.experts,
        seed=seed, training=config.training, trust=config.trust, network=config.network,
        oracle_mixtures=oracle_mixtures if parsed.trust == "oracle" else None,
        state_dir=state_dir, checkpoint_every=checkpoint_every, schedule=schedule,
    )


def peer_specs(config: ExperimentConfig, graph: nx.Graph, data: list[PeerData], scheme: str,
               seed: int, state_root: Path | None = None, source: GraphSource | None = None) -> list[PeerSpec]:
    """Each peer's spec; with `state_root`, peer i checkpoints to (and resumes from) state_root/peer<i>.
    `source` is what job_setup was given. A graph per round (a function `source`, or the topology's
    resample_every) or joins and leaves give each peer a schedule of its neighbours per round; its
    `neighbours` are then everyone it is ever a neighbour of (`graph`, from job_setup, is their union)."""
    mixtures = {d.name: d.mixture for d in data}
    schedules = neighbour_schedules(config, graph, seed, source)
    return [peer_spec(config, i, tuple(peer_name(j) for j in neighbours(graph, i)) if schedules is None
                      else schedules[i].everyone(), scheme, seed,
                      state_dir=str(state_root / peer_name(i)) if state_root is not None else None,
                      oracle_mixtures=mixtures, schedule=None if schedules is None else schedules[i])
            for i in range(config.num_peers)]


def initial_adapter(host: AdapterHost, spec: PeerSpec) -> dict[str, torch.Tensor]:
    """The adapter a peer starts from. Peers of one layout start from the same seeded adapter, and the
    seed does not depend on the scheme."""
    return host.initial_adapter(derive_seed(spec.seed, "shared-init"), spec.layout)


def peer_loops(config: ExperimentConfig, host: AdapterHost, specs: list[PeerSpec], data: list[PeerData],
               endpoint_of: Callable[[str], Endpoint], hooks: PeerHooks) -> list[PeerLoop]:
    """The PeerLoops of a simulated job (or of the part of it one process hosts): each peer on its endpoint,
    an attacker's wrapped, starting from the seeded initial adapter."""
    loops = []
    for spec, d in zip(specs, data):
        initial = initial_adapter(host, spec)
        endpoint = attacked(endpoint_of(spec.name), attack_of(config.attack, spec.name), spec, initial)
        loops.append(PeerLoop(spec, host, d, endpoint, initial, hooks))
    return loops
