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

import networkx as nx

from p2pfed.config import ConfigError, TopologyConfig, peer_index
from p2pfed.topology import TopologyWarning, graph_at_round

log = logging.getLogger(__name__)


def derived_graph(members: Sequence, topology: TopologyConfig, seed: int, round_index: int) -> nx.Graph:
    """The graph of `round_index` over `members` (records with peer_id and name, any order), nodes named by the
    members' names. A spec that cannot be built for this many members (say, random_regular with n * d odd)
    falls back to a ring, with a warning: the swarm goes on rather than stop when a member leaves."""
    ordered = sorted(members, key=lambda m: m.peer_id)
    n = len(ordered)
    if n == 0:
        return nx.Graph()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TopologyWarning)  # a disconnected draw is the spec's business
            graph = graph_at_round(topology, n, seed, round_index)
    except ConfigError as error:
        log.warning("the topology cannot be built for %d members in round %d (%s): a ring this round", n,
                    round_index, error)
        graph = nx.cycle_graph(n)
    return nx.relabel_nodes(graph, {k: m.name for k, m in enumerate(ordered)})


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
                graph = derived_graph(members, self.topology, self.seed, round_index)
                self.by_round[round_index] = by_index(graph.neighbors(self.name))
            if self.on_round is not None:
                self.on_round(round_index, self.by_round[round_index])
        return self.by_round[round_index]
