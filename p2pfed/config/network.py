"""The network section (faults, joins and leaves), neighbours of a networked peer, and attacks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from p2pfed.config.checks import PEER_NAME, check, peer_index


@dataclass(frozen=True)
class MembershipConfig:
    """When a peer is in the swarm: rounds `join` <= r < `leave` (`[[network.membership]]`).

    Every peer computes the same plan from its config: nobody waits for a peer outside its rounds.
    """

    peer: str = ""
    join: int = 1  # the first round it takes part in; before it, it sits rounds out (a newcomer)
    leave: int | None = None  # the first round it no longer takes part in; None: it never leaves

    def takes_part(self, round_index: int) -> bool:
        return self.join <= round_index and (self.leave is None or round_index < self.leave)


@dataclass(frozen=True)
class NetworkConfig:
    """Faults of the in-memory transport as plain knobs, and who is in the swarm in which rounds."""

    drop_prob: float = 0.0
    delay_prob: float = 0.0  # chance a message arrives delay_s seconds late
    delay_s: float = 0.0
    churn_prob: float = 0.0  # chance a peer sits a round out (no training, no messages)
    # How long a peer waits for its neighbours' updates each round. The in-process runtime
    # runs on a virtual clock, so waiting there costs no wall time.
    round_timeout_s: float = 30.0
    encoding: Literal["fp32", "fp16", "bf16"] = "fp32"
    max_message_bytes: int = 256 * 1024 * 1024
    # Joins and leaves, in every runtime: peers not listed take part in every round.
    membership: tuple[MembershipConfig, ...] = ()

    def takes_part(self, peer: str, round_index: int) -> bool:
        return all(m.takes_part(round_index) for m in self.membership if m.peer == peer)

    def validate(self, num_peers: int) -> None:
        for name in ("drop_prob", "delay_prob", "churn_prob"):
            check(0.0 <= getattr(self, name) < 1.0, f"network.{name}", "must be in [0, 1)")
        check(self.delay_s >= 0, "network.delay_s", "must not be negative")
        check(self.round_timeout_s > 0, "network.round_timeout_s", "must be positive")
        check(self.max_message_bytes > 0, "network.max_message_bytes", "must be positive")
        for i, m in enumerate(self.membership):
            where = f"network.membership[{i}]"
            check(PEER_NAME.fullmatch(m.peer) is not None and peer_index(m.peer) < num_peers,
                  f"{where}.peer", f"{m.peer!r} is not one of peer0..peer{num_peers - 1}")
            check(m.join >= 1, f"{where}.join", "must be at least 1")
            check(m.leave is None or m.leave > m.join, f"{where}.leave", f"must be after join ({m.join})")
        listed = [m.peer for m in self.membership]
        check(len(set(listed)) == len(listed), "network.membership", "lists a peer twice")


ATTACK_KINDS = ("noise", "sign_flip", "scale", "huge", "other_group", "free_rider", "stale", "metadata", "garbage")


@dataclass(frozen=True)
class AttackConfig:
    """Peers that attack their neighbours (p2pfed.attacks): `[[attack]]` tables of an experiment."""

    peers: tuple[str, ...] = ()
    kind: Literal["noise", "sign_flip", "scale", "huge", "other_group", "free_rider", "stale", "metadata",
                  "garbage"] = "scale"
    factor: float = 100.0  # scale: the multiplier; noise: the noise's length over the honest update's
    from_round: int = 1

    def validate(self, num_peers: int, where: str) -> None:
        check(len(self.peers) >= 1, f"{where}.peers", "names no peer")
        for name in self.peers:
            check(peer_index(name) < num_peers, f"{where}.peers", f"{name} is not one of peer0..peer{num_peers - 1}")
        check(math.isfinite(self.factor) and self.factor > 0, f"{where}.factor", "must be a positive number")
        check(self.from_round >= 1, f"{where}.from_round", "must be at least 1")


@dataclass(frozen=True)
class NeighbourConfig:
    name: str  # its peer name (peer0, peer1, ...), as in the swarm's results
    peer_id: str  # its libp2p peer ID: Noise authenticates the connection against it
    addrs: tuple[str, ...] = ()  # multiaddrs to dial it at; empty for a neighbour that dials this peer

