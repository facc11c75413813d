"""What one member knows of its swarm: the signed records it accepted, which of them are alive, who holds a name.

No I/O and no clock of its own (the caller passes `now`), so the rules are tested directly:
- a record must verify (p2pfed.net.member_records), name this swarm and a name below num_peers;
- a higher seq replaces a lower one; an equal or lower one changes nothing (nor does a copy of this peer's own);
- a name is held first-come: while a live member holds peerK, another peer ID claiming peerK is refused;
- in a closed swarm (`allowed`, the peer file's members table) only the table's (name, peer ID) pairs are taken,
  so a stranger gets no name, and nobody another member's name, online or not;
- a member whose record was not refreshed (a higher seq, seen directly or relayed) for `timeout_s` is dropped,
  and only a record fresher than the one it was dropped with brings it back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from p2pfed.config import peer_index
from p2pfed.net.member_records import MemberRecord, MembershipError, SignedRecord, peek, verify

log = logging.getLogger(__name__)


@dataclass
class MemberView:
    swarm: str
    own_id: str
    num_peers: int
    timeout_s: float
    records: dict[str, SignedRecord] = field(default_factory=dict)  # peer ID -> its newest accepted record
    fresh_at: dict[str, float] = field(default_factory=dict)  # peer ID -> when its seq last rose
    holders: dict[str, str] = field(default_factory=dict)  # name -> the peer ID that holds it (one lookup)
    dropped: dict[str, int] = field(default_factory=dict)  # peer ID -> the seq it was dropped with
    own_seen: MemberRecord | None = None  # the newest record of this peer's own ID met (from a run before)
    refused: set[tuple[str, str]] = field(default_factory=set)  # (peer ID, reason) already logged
    allowed: dict[str, str] = field(default_factory=dict)  # a closed swarm's name -> peer ID; empty: open

    def set_own(self, signed: SignedRecord, now: float) -> None:
        self._put(signed)
        self.fresh_at[self.own_id] = now

    def offer(self, raw: object, now: float) -> MemberRecord | None:
        """Take a record from the network if it is new and valid; the record if it changed the view. Raises
        MembershipError (the caller logs it) for a record that is refused."""
        seen = peek(raw)
        if seen.peer_id == self.own_id:
            if self.own_seen is None or seen.seq > self.own_seen.seq:
                self.own_seen = verify(raw).record  # only a record this key signed counts
            return None
        known = self.records.get(seen.peer_id)
        if (known is not None and known.record.seq >= seen.seq) or seen.seq <= self.dropped.get(seen.peer_id, -1):
            return None  # nothing new: no signature check
        self._check_fits(seen, known is not None)  # before the signature: a refused record costs no check
        record = verify(raw).record
        self._put(SignedRecord(record, *raw[1:]))
        self.fresh_at[record.peer_id] = now
        self.dropped.pop(record.peer_id, None)
        return record

    def _check_fits(self, record: MemberRecord, known: bool) -> None:
        if record.swarm != self.swarm:
            raise MembershipError(f"{record.peer_id}'s record is for swarm {record.swarm!r}, not {self.swarm!r}")
        if peer_index(record.name) >= self.num_peers:
            raise MembershipError(f"{record.peer_id} claims {record.name}; this swarm's names are "
                                  f"peer0..peer{self.num_peers - 1}")
        if self.allowed and self.allowed.get(record.name) != record.peer_id:
            raise MembershipError(f"{record.peer_id} claims {record.name}, which this closed swarm's members "
                                  f"table gives to {self.allowed.get(record.name, 'nobody')}")
        holder = self.holder(record.name)
        if holder is not None and holder != record.peer_id:
            raise MembershipError(f"{record.peer_id} claims {record.name}, which {holder} holds")
        if not known and len(self.records) >= self.num_peers:
            raise MembershipError(f"{record.peer_id}'s record is one more than the {self.num_peers} members kept")

    def listed(self, peer_id: str) -> bool:
        """Whether `peer_id` may be a member at all: anyone in an open swarm, the table's IDs in a closed one."""
        return not self.allowed or peer_id in self.allowed.values()  # at most MAX_SWARM_PEERS: no index needed

    def touch(self, peer_id: str, now: float) -> None:
        """A member answered us directly: it is alive, whatever its record's age."""
        if peer_id in self.fresh_at:
            self.fresh_at[peer_id] = now

    def holder(self, name: str) -> str | None:
        return self.holders.get(name)

    def _put(self, signed: SignedRecord) -> None:
        known = self.records.get(signed.record.peer_id)
        if known is not None:
            self.holders.pop(known.record.name, None)  # a newer record may name another name: the old one is free
        self.records[signed.record.peer_id] = signed
        self.holders[signed.record.name] = signed.record.peer_id

    def expire(self, now: float) -> list[MemberRecord]:
        """Drop the members not refreshed for timeout_s (never this peer); the dropped records."""
        gone = [s.record for pid, s in self.records.items()
                if pid != self.own_id and now - self.fresh_at[pid] > self.timeout_s]
        for record in gone:
            del self.records[record.peer_id], self.fresh_at[record.peer_id], self.holders[record.name]
            self.dropped[record.peer_id] = record.seq
        while len(self.dropped) > 4 * self.num_peers:  # bounded: the oldest drops are forgotten first
            del self.dropped[next(iter(self.dropped))]
        return gone

    def members(self, round_index: int | None = None) -> list[MemberRecord]:
        """The live members (this peer included) sorted by peer ID; with a round, those taking part in it."""
        records = sorted((s.record for s in self.records.values()), key=lambda r: r.peer_id)
        return [r for r in records if round_index is None or r.takes_part(round_index)]

    def others(self) -> list[MemberRecord]:
        return [r for r in self.members() if r.peer_id != self.own_id]

    def signed(self) -> list[SignedRecord]:
        return [self.records[pid] for pid in sorted(self.records)]

    def note_refused(self, peer_id: str, reason: str) -> bool:
        """Whether this refusal is new (log it once per peer and reason); bounded like the records. A full set
        starts over rather than staying full: a flood of distinct refusals must not silence later ones."""
        key = (peer_id, reason)
        if key in self.refused:
            return False
        if len(self.refused) >= 4 * self.num_peers:
            self.refused.clear()
        self.refused.add(key)
        return True
