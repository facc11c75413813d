"""The topology of a swarm in membership mode, derived by every member alike from the members it knows.

Round r's graph: the members taking part in r (join_round <= r < leave_round), sorted by peer ID, are the nodes
0..n-1 of the topology spec's graph for n peers at round r (`topology.graph_at_round`, seeded by the swarm's
seed: resampled every `resample_every` rounds if asked); node k is then named by the k-th member's name.
Members that agree on the record set agree on every edge, so nobody holds the list of edges as authority.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import networkx as nx

from p2pfed.config import ConfigError, TopologyConfig, peer_index
from p2pfed.topology import TopologyWarning, graph_at_round

log = logging.getLogger(__name__)


def derived_graph(members: Sequence, topology: TopologyConfig, seed: int, round_index: int,
                  on_fallback: Callable[[int, ConfigError], None] | None = None) -> nx.Graph:
    """The graph of `round_index` over `members` (records with peer_id and name, any order), nodes named by the
    members' names. A spec that cannot be built for this many members (say, random_regular with n * d odd)
    falls back to a ring: the swarm goes on rather than stop when a member leaves. `on_fallback(n, error)` is
    told (default: a warning each time; a SwarmSchedule warns once per change)."""
    ordered = sorted(members, key=lambda m: m.peer_id)
    n = len(ordered)
    if n == 0:
        return nx.Graph()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TopologyWarning)  # a disconnected draw is the spec's business
            graph = graph_at_round(topology, n, seed, round_index)
    except ConfigError as error:
        (on_fallback or partial(warn_fallback, topology))(n, error)
        graph = nx.cycle_graph(n)
    return nx.relabel_nodes(graph, {k: m.name for k, m in enumerate(ordered)})


def describe(topology: TopologyConfig) -> str:
    """The spec in a few words: random_regular(d=3), edge_list(graph.txt)."""
    if topology.generator == "edge_list":
        return f"edge_list({topology.path})"
    return f"{topology.generator}({', '.join(f'{k}={v}' for k, v in sorted(topology.params.items()))})"


def warn_fallback(topology: TopologyConfig, n: int, error: ConfigError) -> None:
    log.warning("the topology %s cannot be built for %d members (%s): using a ring of %d instead",
                describe(topology), n, error, n)


def by_index(names) -> tuple[str, ...]:
    """Names in node order (peer2 before peer10), as the in-process swarm lists neighbours."""
    return tuple(sorted(names, key=peer_index))


@dataclass
class SwarmSchedule:
    """A member's neighbours per round (the loop's `Schedule`), computed when the round starts from the members
    it knows then, and kept: a round's neighbours do not change half-way. `on_round(r, neighbours)` is told."""

    name: str
    members_at: Callable[[int], list]  # round -> the member records taking part in it
    topology: TopologyConfig
    seed: int
    on_round: Callable[[int, tuple[str, ...]], None] | None = None
    by_round: dict[int, tuple[str, ...] | None] = field(default_factory=dict)
    # The member count the spec last could not be built for (warned once), None while it can be built.
    fallback_n: int | None = None

    def takes_part(self, round_index: int) -> bool:
        return self._at(round_index) is not None

    def neighbours_at(self, round_index: int) -> tuple[str, ...]:
        return self._at(round_index) or ()

    def _at(self, round_index: int) -> tuple[str, ...] | None:
        if round_index not in self.by_round:
            members = self.members_at(round_index)
            if self.name not in {m.name for m in members}:
                self.by_round[round_index] = None
            else:
                fell_back: list[int] = []
                graph = derived_graph(members, self.topology, self.seed, round_index,
                                      lambda n, error: self._fell_back(n, error, fell_back))
                if not fell_back:
                    self.fallback_n = None  # buildable again: a later fallback is news
                self.by_round[round_index] = by_index(graph.neighbors(self.name))
            if self.on_round is not None:
                self.on_round(round_index, self.by_round[round_index])
        return self.by_round[round_index]

    def _fell_back(self, n: int, error: ConfigError, fell_back: list[int]) -> None:
        fell_back.append(n)
        if n != self.fallback_n:  # once per change of the member count, not every round
            self.fallback_n = n
            warn_fallback(self.topology, n, error)
