"""Who talks to whom: topology spec -> networkx graph -> each peer's neighbours and mixing weights.

Peers are the graph's nodes 0..n-1. Every random graph is drawn from its own seeded generator,
so peers in separate processes build the same graph from the same spec without sharing state,
and the process-wide `random` state is never touched.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import networkx as nx

from p2pfed.config import TOPOLOGY_PARAMS, ConfigError, TopologyConfig
from p2pfed.seeding import derive_seed

MixingKind = Literal["uniform", "metropolis_hastings"]

GENERATORS = tuple(TOPOLOGY_PARAMS)


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
