"""What a peer that is not a member can cost a member, and how often a member redials one that did not answer.

A stranger (Noise-authenticated, but no record of it is held) is admitted after Noise only from a token budget
(STRANGER_BURST, then one per STRANGER_EVERY_S); each admission buys STRANGER_EXCHANGES answered exchanges
(a newcomer needs about two per member: a "join", then a "sync" that makes it a member; each answer holds every
member's record, so this bounds what a stranger can download per token) and STRANGER_GRACE_S of
connection, after which the member closes it unless it became a member. Strangers' exchanges have slots of
their own (STRANGER_SLOTS, one per stranger), so they never take the members' (MAX_SERVING, two per member).
Without the grace period an admitted stranger could keep its connection forever: at one a second it would
fill py-libp2p's 250 inbound connection slots in minutes and lock newcomers and restarted members out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STRANGER_BURST, STRANGER_EVERY_S = 16, 1.0  # non-members admitted after Noise: a burst, then one a second
STRANGER_GRACE_S = 30.0  # a non-member's connection is closed this long after its admission
STRANGER_EXCHANGES = 4  # exchanges answered per admission
MAX_STRANGERS = 64  # admissions tracked at once (the budget admits at most STRANGER_BURST + 30 per grace period)
MAX_SERVING, PER_MEMBER = 4, 2  # members' exchanges served at once, in all and per member
STRANGER_SLOTS = 2  # non-members' exchanges served at once (one per stranger), beside the members' slots
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 8.0  # a member whose exchange failed is redialled after 1, 2, 4, 8, 8... s


@dataclass
class Admission:
    since: float
    exchanges_left: int


@dataclass
class StrangerGate:
    """The budget, the admissions and the exchanges being served. No I/O; the caller passes `now`."""

    tokens: float = float(STRANGER_BURST)
    counted_at: float | None = None
    admitted: dict[str, Admission] = field(default_factory=dict)  # peer ID -> its admission
    members_serving: dict[str, int] = field(default_factory=dict)  # peer ID -> its exchanges being served now
    strangers_serving: dict[str, int] = field(default_factory=dict)

    def admit(self, peer_id: str, now: float) -> bool:
        """Whether a dialler that is not a member may keep its connection: one token of the budget."""
        if self.counted_at is not None:
            self.tokens = min(float(STRANGER_BURST), self.tokens + (now - self.counted_at) / STRANGER_EVERY_S)
        self.counted_at = now
        if self.tokens < 1.0 or (peer_id not in self.admitted and len(self.admitted) >= MAX_STRANGERS):
            return False
        self.tokens -= 1.0
        self.admitted[peer_id] = Admission(now, STRANGER_EXCHANGES)
        return True

    def start(self, peer_id: str, member: bool, now: float) -> str | None:
        """Take a slot for one exchange from `peer_id` (give it back with `finish`); why not, if none is free."""
        serving = self.members_serving if member else self.strangers_serving
        busy = serving.get(peer_id, 0)
        if member:
            if busy >= PER_MEMBER or sum(serving.values()) >= MAX_SERVING:
                return "no free exchange slot for members"
        else:
            # A stranger on a connection this member dialled was never admitted: it gets an admission's worth.
            admission = self.admitted.get(peer_id)
            if admission is None and len(self.admitted) < MAX_STRANGERS:
                admission = self.admitted[peer_id] = Admission(now, STRANGER_EXCHANGES)
            if admission is None or admission.exchanges_left <= 0:
                return "its exchanges as a non-member are used up"
            if busy or sum(serving.values()) >= STRANGER_SLOTS:
                return "no free exchange slot for non-members"
            admission.exchanges_left -= 1
        serving[peer_id] = busy + 1
        return None

    def finish(self, peer_id: str, member: bool) -> None:
        serving = self.members_serving if member else self.strangers_serving
        left = serving.pop(peer_id, 1) - 1
        if left > 0:
            serving[peer_id] = left

    def overstayed(self, now: float) -> list[str]:
        """The admissions older than STRANGER_GRACE_S, forgotten; the caller closes those not members now."""
        old = [pid for pid, admission in self.admitted.items() if now - admission.since > STRANGER_GRACE_S]
        for pid in old:
            del self.admitted[pid]
        return old
