"""A networked peer in membership mode (`swarm = "NAME"`, `bootstrap = [...]`): the glue between its peer file,
the membership protocol (p2pfed.net.membership) and the round loop's schedule (p2pfed.swarm_topology).

    member = SwarmMember(config)
    spec's schedule = member.schedule()          # before the loop is built
    member.open(key_pair, endpoint)              # once the libp2p endpoint runs
    await member.join(nursery)                   # before round 1; keeps the view fresh in `nursery`
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2pfed import peerlog
from p2pfed.config import NeighbourConfig, PeerConfig, TopologyConfig, peer_name
from p2pfed.swarm_topology import SwarmSchedule

log = logging.getLogger(__name__)

MEMBERS_FILE = "members.json"  # in state_dir at the end: the members this peer knew, with their rounds


def member_settings(config: PeerConfig):
    """The membership's settings from a peer file: its planned rounds ([[network.membership]] for this peer)
    and how many members to wait for at start (every peer name not planned to join later)."""
    from p2pfed.net.membership import MemberSettings

    plan = {m.peer: m for m in config.network.membership}
    own = plan.get(config.name)
    late = {m.peer for m in config.network.membership if not m.takes_part(1)}
    return MemberSettings(
        swarm=config.swarm, name=config.name, num_peers=config.num_peers, bootstrap=tuple(config.bootstrap),
        member_timeout_s=config.member_timeout_s, startup_timeout_s=config.startup_timeout_s,
        join_round=own.join if own else 1, leave_round=own.leave if own else None,
        expected=sum(peer_name(i) not in late for i in range(config.num_peers)), last_round=config.training.rounds,
        members=tuple(sorted(config.members.items())))


@dataclass
class SwarmMember:
    config: PeerConfig
    membership: object | None = None  # the Membership, once open
    finished_round: int = 0  # the last round this peer finished: what it tells newcomers
    own_id: str = ""
    neighbours_by_round: dict[int, tuple[str, ...] | None] = field(default_factory=dict)

    def schedule(self) -> SwarmSchedule:
        config = self.config
        return SwarmSchedule(config.name, self._members_at, config.topology or TopologyConfig(), config.seed,
                             on_round=self._on_round)

    @property
    def ids(self) -> dict[str, str]:
        """Member name -> peer ID, kept current: the peer's NamedEndpoint reads it."""
        return self.membership.ids

    def open(self, key_pair, endpoint) -> None:
        from p2pfed.net.membership import Membership

        from p2pfed.config import ConfigError
        from p2pfed.net.identity import peer_id_of

        listed, own_id = self.config.members.get(self.config.name), peer_id_of(key_pair)
        if self.config.members and listed != own_id:  # the members would refuse every record of this peer
            raise ConfigError(f"members.{self.config.name}: {listed} is not this peer's key's ID ({own_id})")
        self.membership = Membership(member_settings(self.config), key_pair, endpoint, lambda: self.finished_round)
        self.own_id = self.membership.own_id
        self.membership.open()

    async def join(self, nursery: trio.Nursery) -> None:
        """Join the swarm (raises ConfigError when no bootstrap answered), then keep the view fresh."""
        from p2pfed.config import ConfigError
        from p2pfed.net.membership import JoinError

        nursery.start_soon(self.membership.run)  # refreshing our record already while we wait for the others
        try:
            await self.membership.join()
        except JoinError as error:
            raise ConfigError(str(error)) from None

    async def leave(self) -> None:
        """Stopped before the last round (Ctrl-C, SIGTERM): tell the members it leaves from the next round, so
        they re-derive the graph without it instead of waiting for it. Bounded to 2 s; never raises."""
        if self.membership is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.membership.announce_leave(self.finished_round + 1)
            except Exception as error:
                log.debug("%s: announcing the leave failed: %s", self.config.name, error)

    def neighbour_configs(self) -> list[NeighbourConfig]:
        """The members as neighbours (name, peer ID, addresses), for status lines and the end summary."""
        if self.membership is None:
            return []
        return [NeighbourConfig(r.name, r.peer_id, r.addrs) for r in self.membership.view.others()]

    def write_members(self, state_dir: str) -> None:
        """state_dir/members.json: each member this peer knows at the end, its peer ID, rounds and addresses."""
        if not state_dir or self.membership is None:
            return
        members = [{"name": r.name, "peer_id": r.peer_id, "join_round": r.join_round, "leave_round": r.leave_round,
                    "addrs": list(r.addrs)} for r in self.membership.view.members()]
        (Path(state_dir) / MEMBERS_FILE).write_text(json.dumps({"swarm": self.config.swarm, "members": members},
                                                               indent=1), encoding="utf-8")

    def _members_at(self, round_index: int) -> list:
        return self.membership.view.members(round_index) if self.membership is not None else []

    def _on_round(self, round_index: int, neighbours: tuple[str, ...] | None) -> None:
        before = next((self.neighbours_by_round[r] for r in sorted(self.neighbours_by_round, reverse=True)
                       if self.neighbours_by_round[r] is not None), None)
        self.neighbours_by_round[round_index] = neighbours
        if self.membership is not None:
            peerlog.add_names(self.own_id, self.membership.ids)
        if neighbours is None or neighbours == before:
            return
        added = [n for n in neighbours if n not in (before or ())]
        dropped = [n for n in (before or ()) if n not in neighbours]
        log.info("%s: round %d: neighbours %s%s%s (from %d members)", self.config.name, round_index,
                 ", ".join(neighbours) or "(none)", f"; new {', '.join(added)}" if before and added else "",
                 f"; dropped {', '.join(dropped)}" if dropped else "", len(self._members_at(round_index)))
