"""The membership-derived topology's fallback: a spec that cannot be built for n members becomes a ring, with
one warning naming the spec, n and the ring, once per change of n (not every round)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from p2pfed.config import TopologyConfig
from p2pfed.swarm_topology import SwarmSchedule, derived_graph

LOGGER = "p2pfed.swarm_topology"
ODD = TopologyConfig("random_regular", {"d": 3})  # n * d must be even


@dataclass(frozen=True)
class Member:
    name: str
    peer_id: str


def members(n: int) -> list[Member]:
    return [Member(f"peer{i}", f"id{i:02d}") for i in range(n)]


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_a_spec_that_cannot_be_built_is_a_ring_with_one_warning_per_change_of_the_member_count(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    live = {"n": 5}
    schedule = SwarmSchedule("peer0", lambda r: members(live["n"]), ODD, 0)
    for round_index in (1, 2, 3):  # 5 members every round: one warning, not three
        assert len(schedule.neighbours_at(round_index)) == 2  # a ring
    [message] = warnings_logged(caplog)
    assert "random_regular(d=3)" in message and "5 members" in message and "ring" in message
    live["n"] = 6  # buildable: 3-regular, no warning
    assert len(schedule.neighbours_at(4)) == 3
    live["n"] = 7  # a new member count it cannot be built for: news
    assert len(schedule.neighbours_at(5)) == 2 and len(schedule.neighbours_at(6)) == 2
    live["n"] = 5  # back to 5 after a buildable 6 and an unbuildable 7: news again
    schedule.neighbours_at(7)
    assert [("7 members" in m, "5 members" in m) for m in warnings_logged(caplog)[1:]] == [(True, False),
                                                                                          (False, True)]


def test_derived_graph_on_its_own_warns_each_time_it_falls_back(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    graph = derived_graph(members(5), ODD, 0, 1)
    assert sorted(d for _, d in graph.degree()) == [2] * 5
    assert len(warnings_logged(caplog)) == 1
    derived_graph(members(6), ODD, 0, 1)
    assert len(warnings_logged(caplog)) == 1
