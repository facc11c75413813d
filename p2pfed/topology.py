"""Who talks to whom: topology spec -> networkx graph -> each peer's neighbours and mixing weights.

Peers are the graph's nodes 0..n-1. Every random graph is drawn from its own seeded generator,
so peers in separate processes build the same graph from the same spec without sharing state,
and the process-wide `random` state is never touched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import networkx as nx

from p2pfed.config import (TOPOLOGY_PARAMS, ConfigError, NetworkConfig, PeerConfig, TopologyConfig, peer_index,
                           peer_name)
from p2pfed.seeding import derive_seed

MixingKind = Literal["uniform", "metropolis_hastings"]

GENERATORS = tuple(TOPOLOGY_PARAMS)

GraphAt = Callable[[int], nx.Graph]  # the graph in force at a round (1, 2, ...)


class TopologyWarning(UserWarning):
    """The graph is usable but likely not what was meant (for example, it is disconnected)."""


# ---------------------------------------------------------------------------
# Building graphs.

def build_graph(config: TopologyConfig, num_peers: int, seed: int) -> nx.Graph:
    """The static graph; `resample_every` is checked here but only `graph_at_round` uses it."""
    params, _ = config.checked_params()
    return _build(config, params, num_peers, _base_seed(config, seed))


def graph_at_round(config: TopologyConfig, num_peers: int, seed: int, round_index: int) -> nx.Graph:
    """The graph in force at `round_index`: redrawn every `resample_every` rounds, else static."""
    params, resample_every = config.checked_params()
    base = _base_seed(config, seed)
    if resample_every is None:
        return _build(config, params, num_peers, base)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be a non-negative integer, got {round_index!r}")
    # A hash rather than seed + period, so that neighbouring experiment seeds share no graphs.
    return _build(config, params, num_peers, derive_seed(base, "topology", round_index // resample_every))


def is_resampled(config: TopologyConfig) -> bool:
    return config.checked_params()[1] is not None


def rounds_graph(config: TopologyConfig, num_peers: int, seed: int) -> GraphAt | None:
    """`graph_at_round` as a function of the round when the graph is resampled; None when it is static."""
    if not is_resampled(config):
        return None
    return lambda round_index: graph_at_round(config, num_peers, seed, round_index)


def _base_seed(config: TopologyConfig, seed: int) -> int:
    return config.seed if config.seed is not None else seed


def _build(config: TopologyConfig, params: dict[str, Any], num_peers: int, seed: int) -> nx.Graph:
    if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < 1:
        raise ConfigError(f"num_peers: must be an integer >= 1, got {num_peers!r}")
    raw = _BUILDERS[config.generator](config, params, num_peers, seed)
    # A fresh simple graph with sorted nodes and edges: the same spec gives the same
    # iteration order everywhere, whatever the generator did internally.
    graph = nx.Graph()
    graph.add_nodes_from(range(num_peers))
    graph.add_edges_from(sorted((min(u, v), max(u, v)) for u, v in raw.edges() if u != v))
    components = nx.number_connected_components(graph)
    if components > 1:
        warnings.warn(
            f"topology {config.generator!r} on {num_peers} peers has {components} connected components; "
            "peers cut off from the others will train alone",
            TopologyWarning,
            stacklevel=3,
        )
    return graph


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"topology.params.{key}: {message}")


def _check_probability(params: dict[str, Any], key: str = "p") -> float:
    p = params[key]
    _check(0.0 <= p <= 1.0, key, f"must be in [0, 1], got {p}")
    return p


# Each builder gets checked types; it checks ranges, which may depend on the number of peers.
Builder = Callable[[TopologyConfig, dict[str, Any], int, int], nx.Graph]


def _ring(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    return nx.cycle_graph(n)


def _complete(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    return nx.complete_graph(n)


def _star(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    return nx.star_graph(n - 1)  # hub 0, leaves 1..n-1


def _random_regular(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    d = params["d"]
    _check(0 <= d < n, "d", f"must be in [0, num_peers) = [0, {n}), got {d}")
    _check(n * d % 2 == 0, "d", f"num_peers * d must be even, got {n} * {d}")
    return nx.random_regular_graph(d, n, seed=seed)


def _erdos_renyi(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    return nx.gnp_random_graph(n, _check_probability(params), seed=seed)


def _watts_strogatz(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    k = params["k"]
    # networkx silently rounds an odd k down; refuse it instead so the degree is what was asked.
    _check(2 <= k < n and k % 2 == 0, "k", f"must be even and in [2, num_peers) = [2, {n}), got {k}")
    return nx.watts_strogatz_graph(n, k, _check_probability(params), seed=seed)


def _barabasi_albert(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    m = params["m"]
    _check(1 <= m < n, "m", f"must be in [1, num_peers) = [1, {n}), got {m}")
    return nx.barabasi_albert_graph(n, m, seed=seed)


def _torus(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    rows, cols = params.get("rows"), params.get("cols")
    for key, value in (("rows", rows), ("cols", cols)):
        _check(value is None or value >= 1, key, f"must be at least 1, got {value}")
    if rows is None and cols is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)  # the most square grid
    if rows is None:
        _check(n % cols == 0, "cols", f"must divide num_peers = {n}, got {cols}")
        rows = n // cols
    if cols is None:
        _check(n % rows == 0, "rows", f"must divide num_peers = {n}, got {rows}")
        cols = n // rows
    _check(rows * cols == n, "rows", f"rows * cols = {rows} * {cols} must equal num_peers = {n}")
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid})


def _edge_list(config: TopologyConfig, params: dict[str, Any], n: int, seed: int) -> nx.Graph:
    path = Path(config.path)
    if not path.is_file():
        raise ConfigError(f"topology.path: no such file {config.path!r}")
    graph = nx.Graph()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{number}"
        fields = text.split()
        if len(fields) != 2:
            raise ConfigError(f"{where}: expected one edge 'u v', got {text!r}")
        try:
            u, v = int(fields[0]), int(fields[1])
        except ValueError:
            raise ConfigError(f"{where}: node ids must be integers, got {text!r}") from None
        for node in (u, v):
            if not 0 <= node < n:
                raise ConfigError(f"{where}: node {node} is out of range 0..{n - 1} for {n} peers")
        if u == v:
            raise ConfigError(f"{where}: self loop on node {u}")
        graph.add_edge(u, v)
    return graph


_BUILDERS: dict[str, Builder] = {
    "ring": _ring,
    "complete": _complete,
    "star": _star,
    "random_regular": _random_regular,
    "erdos_renyi": _erdos_renyi,
    "watts_strogatz": _watts_strogatz,
    "barabasi_albert": _barabasi_albert,
    "torus": _torus,
    "edge_list": _edge_list,
}


# ---------------------------------------------------------------------------
# What one peer needs from the graph.

def neighbours(graph: nx.Graph, node: int) -> list[int]:
    return sorted(graph.neighbors(node))


def mixing_weights(graph: nx.Graph, node: int, kind: MixingKind) -> dict[int, float]:
    """Weights over `node` and its neighbours (self included), summing to 1, sorted by node: the
    rows trust.uniform_weights and trust.metropolis_hastings_weights give a peer, for the whole graph."""
    from p2pfed import trust  # torch-heavy, and only graph analyses need it

    if node not in graph:
        raise ValueError(f"node {node!r} is not in the graph")
    others = neighbours(graph, node)
    if kind == "uniform":
        weights = trust.uniform_weights(node, others)
    elif kind == "metropolis_hastings":
        weights = trust.metropolis_hastings_weights(node, graph.degree(node), {j: graph.degree(j) for j in others})
    else:
        raise ConfigError(f"mixing weights: unknown kind {kind!r} (known: uniform, metropolis_hastings)")
    return dict(sorted(weights.items()))


# ---------------------------------------------------------------------------
# Who one peer talks to in each round: a time-varying graph, joins and leaves.

@dataclass(frozen=True)
class NeighbourSchedule:
    """One peer's neighbours in rounds 1..len(by_round); None for a round it sits out (not joined yet, or
    left). Built from what every peer can compute alike (the topology, the seed, the membership plan), so
    no peer needs a global authority; the round loop only asks for the current round."""

    by_round: tuple[tuple[str, ...] | None, ...]

    def takes_part(self, round_index: int) -> bool:
        return self._at(round_index) is not None

    def neighbours_at(self, round_index: int) -> tuple[str, ...]:
        return self._at(round_index) or ()

    def everyone(self) -> tuple[str, ...]:
        """Every peer it is a neighbour of in some round (whom it may hear from), in node order."""
        names = {n for names in self.by_round if names for n in names}
        return tuple(sorted(names, key=lambda n: (len(n), n)))

    def _at(self, round_index: int) -> tuple[str, ...] | None:
        if not 1 <= round_index <= len(self.by_round):
            raise ValueError(f"round {round_index} is outside the schedule's rounds 1..{len(self.by_round)}")
        return self.by_round[round_index - 1]


def neighbour_schedule(name: str, rounds: int, neighbours_at: Callable[[int], Iterable[str]],
                       network: NetworkConfig) -> NeighbourSchedule:
    """Peer `name`'s schedule: `neighbours_at(r)` (names) less the peers outside the swarm in round r."""
    by_round = []
    for r in range(1, rounds + 1):
        present = network.takes_part(name, r)
        by_round.append(tuple(n for n in neighbours_at(r) if network.takes_part(n, r)) if present else None)
    return NeighbourSchedule(tuple(by_round))


def graphs_by_round(graph_at: GraphAt, num_peers: int, rounds: int) -> dict[int, nx.Graph]:
    """The graph of each round 1..rounds, each built once; nodes must be 0..num_peers-1."""
    graphs = {r: graph_at(r) for r in range(1, rounds + 1)}
    for r, graph in graphs.items():
        if set(graph.nodes) != set(range(num_peers)):
            raise ConfigError(f"topology: the graph of round {r} must have the nodes 0..{num_peers - 1}, "
                              f"got {sorted(graph.nodes, key=str)[:10]}")
    return graphs


def graph_schedules(graphs: dict[int, nx.Graph], num_peers: int, network: NetworkConfig) -> list[NeighbourSchedule]:
    """Every peer's schedule from `graphs_by_round`."""
    def names(i: int, r: int) -> list[str]:
        return [peer_name(j) for j in neighbours(graphs[r], i)]
    return [neighbour_schedule(peer_name(i), len(graphs), lambda r, i=i: names(i, r), network)
            for i in range(num_peers)]


def union_graph(graphs: Iterable[nx.Graph], num_peers: int) -> nx.Graph:
    """Every edge in force in some round: who may ever talk to whom (sorted, like every built graph)."""
    edges = {(min(u, v), max(u, v)) for graph in graphs for u, v in graph.edges()}
    union = nx.Graph()
    union.add_nodes_from(range(num_peers))
    union.add_edges_from(sorted(edges))
    return union


def peer_schedule(config: PeerConfig) -> NeighbourSchedule | None:
    """A networked peer's schedule, computed from its own file alone: its neighbours in each round of the
    topology (when the file names one, with the seed) or the listed neighbours, less the peers outside the
    swarm that round. Every neighbour it has must be listed, with its peer ID. None: the listed ones, always."""
    listed = [n.name for n in config.neighbours]
    if config.topology is None and not config.network.membership:
        return None
    if config.topology is None:
        names: Callable[[int], Iterable[str]] = lambda r: listed
    else:
        index, topology = peer_index(config.name), config.topology
        names = lambda r: [peer_name(j) for j in neighbours(graph_at_round(topology, config.num_peers, config.seed, r),
                                                            index)]
    schedule = neighbour_schedule(config.name, config.training.rounds, names, config.network)
    for r in range(1, config.training.rounds + 1):
        unlisted = [n for n in schedule.neighbours_at(r) if n not in listed]
        if unlisted:
            raise ConfigError(f"neighbours: the topology makes {unlisted[0]} a neighbour of {config.name} in round "
                              f"{r}, but [[neighbours]] does not list it (name, peer_id, addrs)")
    return schedule
