"""Membership over libp2p without a server: who is in a swarm, learnt from any running member.

    membership = Membership(settings, key_pair, endpoint, current_round=lambda: 3)
    membership.open()                  # serve /p2pfed/members/1, admit would-be members
    await membership.join()            # bootstrap, learn the members, tell each of them about us
    nursery.start_soon(membership.run) # keep the view fresh: anti-entropy, liveness, the endpoint's peers

Protocol `/p2pfed/members/1`: the dialler sends one message (its records, its own among them) and the listener
answers with one message of its own records (`p2pfed.net.member_records`), each a 4-byte length and at most
message_bytes_cap(num_peers) (`p2pfed.net.member_streams`); then the stream closes. The answering side is
`p2pfed.net.member_serving`. Push-pull of the whole record set, since a swarm has at most
num_peers members (<= 1024) of ~200 bytes each. A member re-signs its record (seq + 1) every refresh period and
exchanges with FANOUT random members every GOSSIP_EVERY_S; one not refreshed for member_timeout_s is dropped.

Strangers: libp2p hands over a dialler only after Noise has authenticated its peer ID. Members (whose records
we hold) are admitted; anyone else only within a small budget (p2pfed.net.member_gate: a few exchanges, slots
of its own, its connection closed after a grace period), gets an answer only if its message carries a valid
record of its own, of this swarm, and introduces only itself (relayed records are taken from members only).
A closed swarm (MemberSettings.members, the peer file's table) hangs up on a dialler whose peer ID it does not
list before it costs a token of that budget, answers none of its streams, and takes only the listed records.
Update streams stay for members (the endpoint's neighbours), which is what every member of the swarm becomes.
"""

from __future__ import annotations

import functools
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.peer.peerinfo import PeerInfo

from p2pfed.net.dialling import quiet_dials
from p2pfed.net.framing import reset_stream
from p2pfed.net.identity import dial_addrs, parse_peer_id, peer_id_of
from p2pfed.net.member_gate import RETRY_FIRST_S, RETRY_MAX_S, StrangerGate
from p2pfed.net.member_records import (MemberRecord, MembershipError, decode_message, encode_message,
                                       message_bytes_cap, sign_record)
from p2pfed.net.member_streams import (EXCHANGE_TIMEOUT_S, MEMBERS_PROTOCOL, exchanging, read_message, reason,
                                       write_message)
from p2pfed.net.member_serving import close_overstayed, serve_stream
from p2pfed.net.member_view import MemberView

log = logging.getLogger(__name__)

GOSSIP_EVERY_S = 1.0
FANOUT = 2  # members exchanged with per gossip period
MAX_DIALLING = 8  # exchanges a member starts at once: one member that never answers costs one slot, not a turn
STATUS_EVERY_S = 5.0
DIAL_WAIT_S = 3.0  # of two members not connected yet, the one with the larger peer ID waits this long to dial


class JoinError(Exception):
    """No member of the swarm could be reached at start."""


@dataclass(frozen=True)
class MemberSettings:
    """What the membership needs from a peer file."""

    swarm: str
    name: str
    num_peers: int
    bootstrap: tuple[str, ...]  # multiaddrs ending in /p2p/ID
    member_timeout_s: float
    startup_timeout_s: float
    join_round: int = 1  # planned (network.membership); a newcomer to a running swarm joins later
    leave_round: int | None = None
    expected: int = 1  # members (this one included) of round 1 to wait for at start
    last_round: int = 1 << 30  # a newcomer never joins after the swarm's last round
    members: tuple[tuple[str, str], ...] = ()  # a closed swarm's (name, peer ID) pairs; empty: an open swarm


class Membership:
    """One member's side of the protocol; the constructor only stores references (open() starts nothing
    either: it registers a handler)."""

    def __init__(self, settings: MemberSettings, key_pair: KeyPair, endpoint, current_round: Callable[[], int]):
        self.settings = settings
        self.key_pair = key_pair
        self.endpoint = endpoint  # a Libp2pEndpoint
        self.current_round = current_round  # the last round this peer finished (0 before round 1)
        self.own_id = peer_id_of(key_pair)
        self.view = MemberView(settings.swarm, self.own_id, settings.num_peers, settings.member_timeout_s,
                               allowed=dict(settings.members))
        self.ids: dict[str, str] = {}  # member name -> peer ID, kept current (the peer's NamedEndpoint reads it)
        self.synced: set[str] = set()  # members that hold our newest record (a direct exchange succeeded)
        self.errors: dict[str, str] = {}  # peer ID -> why the last exchange with it failed
        self.rounds_heard: dict[str, int] = {}  # peer ID -> the round it said it was in
        self.leaving: set[str] = set()  # members whose leave round was logged
        self.known_since: dict[str, float] = {}  # peer ID -> when its first record came
        self.retry_at: dict[str, tuple[float, float]] = {}  # peer ID -> (when to redial, the wait before that)
        self.gate = StrangerGate()
        self._seq = 0
        self._dialling = trio.CapacityLimiter(MAX_DIALLING)
        self._in_flight: set[str] = set()  # members an exchange of ours is under way with
        self._random = random.Random(self.own_id)  # whom to gossip with: not the process-wide random state

    @property
    def own(self) -> MemberRecord:
        return self.view.records[self.own_id].record

    def bootstraps(self) -> list[tuple[str, str]]:
        """(peer ID, address) of each bootstrap that is not this peer."""
        pairs = [(addr.partition("/p2p/")[2], addr) for addr in self.settings.bootstrap]
        return [(pid, addr) for pid, addr in pairs if pid != self.own_id]

    def open(self) -> None:
        for pid, _ in self.bootstraps():
            parse_peer_id(pid)
        self._sign(self.settings.join_round, self.settings.leave_round)
        # A closed swarm's stranger is hung up on after Noise before it spends a token of the strangers' budget.
        self.endpoint.admit_others = lambda peer_id: (self.view.listed(peer_id)
                                                      and self.gate.admit(peer_id, trio.current_time()))
        self.endpoint.host.set_stream_handler(MEMBERS_PROTOCOL, functools.partial(serve_stream, self))

    # -- joining -------------------------------------------------------------------------

    async def join(self) -> None:
        """Learn the swarm from a bootstrap, choose the join round, then exchange directly with every member
        until the round-1 members expected are all known and synced (or startup_timeout_s). Raises JoinError
        when no bootstrap answered and no member is known at the end."""
        settings = self.settings
        started = trio.current_time()
        next_status = started + STATUS_EVERY_S
        # A founder (its own address among the bootstraps, or none given) may be the first member; it still asks
        # the other bootstraps, and a swarm that turns out to be running already makes it a newcomer.
        founder = len(self.bootstraps()) < len(settings.bootstrap) or not settings.bootstrap
        chose = False
        with trio.move_on_after(settings.startup_timeout_s):
            while True:
                if not chose:
                    chose = await self._ask_bootstraps()
                if chose or founder:
                    await self._sync_unsynced()
                    if not chose and max(self.rounds_heard.values(), default=0) >= 1:
                        self._choose_join_round()
                        chose = True
                    if self._ready():
                        break
                if trio.current_time() >= next_status:
                    log.info("%s", self.waiting_line(trio.current_time() - started))
                    next_status += STATUS_EVERY_S
                await trio.sleep(0.25)
        waited = trio.current_time() - started
        if not chose and not founder and not self.view.others():
            raise JoinError(f"bootstrap: no member of swarm {settings.swarm!r} answered in {waited:.0f} s: "
                            + "; ".join(f"{addr} ({self.errors.get(pid, 'no answer')})"
                                        for pid, addr in self.bootstraps()))
        known = len(self.view.members(self.own.join_round))
        level = logging.INFO if self._ready() else logging.WARNING
        log.log(level, "%s: %s swarm %s with %d member(s) in %.0f s; takes part from round %d", settings.name,
                "joined" if self._ready() else "starting without everyone in", settings.swarm, known, waited,
                self.own.join_round)

    async def _ask_bootstraps(self) -> bool:
        """One "join" exchange with a bootstrap: the members and the swarm's round, then our record's join
        round. False while no bootstrap answered."""
        for pid, addr in self.bootstraps():
            try:
                await self.exchange(pid, [addr], "join")
            except Exception as error:
                self.errors[pid] = reason(error)
                continue
            # Peers of a running swarm can be rounds apart: ask every member where it is, then choose.
            async with trio.open_nursery() as nursery:
                for record in self.view.others():
                    if record.peer_id != pid:
                        nursery.start_soon(self._try, record.peer_id, record.addrs, "join")
            self._choose_join_round()
            return True
        return False

    def _choose_join_round(self) -> None:
        """Take part from the planned round, or, in a swarm already running (members past round 0), two rounds
        after the furthest member's last finished round (members can be rounds apart), so that this record
        reaches everyone before they get there; but at most four after the median, so that one member's claim
        cannot hold a newcomer back for long. A restarted member rejoins the same way: its checkpoint is behind
        the swarm, and it waits for the swarm's updates of its first round."""
        settings, before = self.settings, self.view.own_seen
        rounds = list(self.rounds_heard.values())
        swarm_round = min(max(rounds), statistics.median_low(rounds) + 2) if rounds else 0
        join = max(settings.join_round, swarm_round + 2) if swarm_round >= 1 else settings.join_round
        join = min(join, settings.last_round + 1)
        leave = settings.leave_round if settings.leave_round is None or settings.leave_round > join else None
        if (join, leave) != (self.own.join_round, self.own.leave_round) or before is not None:
            self._sign(join, leave)

    def _ready(self) -> bool:
        others = self.view.others()
        if any(r.peer_id not in self.synced for r in others):
            return False
        if self.own.join_round > 1:
            return bool(others)  # a newcomer needs the members it knows, not a count
        return len([r for r in self.view.members() if r.join_round <= 1]) >= self.settings.expected

    def waiting_line(self, waited: float) -> str:
        """The status line while joining: how many members are known, and why the rest are not reached."""
        settings, others = self.settings, self.view.others()
        pending = [f"{addr} ({self.errors.get(pid, 'dialling')})" for pid, addr in self.bootstraps()
                   if pid not in self.rounds_heard]
        pending += [f"{r.name} ({self.errors.get(r.peer_id, 'dialling')})" for r in others
                    if r.peer_id not in self.synced]
        missing = settings.expected - len(others) - 1
        if missing > 0 and self.own.join_round <= 1 and not any(pid not in self.rounds_heard
                                                                 for pid, _ in self.bootstraps()):
            pending.append(f"{missing} more member(s) to start (not started yet, or their bootstrap is another)")
        left = max(0.0, settings.startup_timeout_s - waited)
        reached = others or not self.bootstraps()
        return (f"{settings.name}: joining swarm {settings.swarm}: {len(others) + 1} of {settings.expected} "
                f"member(s) known, {waited:.0f} s so far; waiting for " + ("; ".join(pending) or "more members")
                + (f"; round 1 starts without them in {left:.0f} s" if reached else f"; gives up in {left:.0f} s"))

    # -- staying current -----------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: re-sign our record every refresh period, exchange with a few members, drop the ones
        gone quiet, and keep the endpoint's peers (whom it admits and can send to) equal to the members."""
        refresh_every = self.settings.member_timeout_s / 4
        refreshed = trio.current_time()
        while True:
            await trio.sleep(GOSSIP_EVERY_S)
            if trio.current_time() - refreshed >= refresh_every:
                self._sign(self.own.join_round, self.own.leave_round)
                refreshed = trio.current_time()
            await self._sync_unsynced()
            others = self.view.others()
            for record in self._random.sample(others, min(FANOUT, len(others))):
                if self._may_dial(record.peer_id):
                    await self._try(record.peer_id, record.addrs, "sync")
            self.expire(trio.current_time())
            self._apply()
            await close_overstayed(self)

    async def announce_leave(self, leave_round: int, timeout: float = 2.0) -> None:
        """Re-sign our record to leave from `leave_round` and tell the members we can reach within `timeout`."""
        if self.own.leave_round is not None and self.own.leave_round <= leave_round:
            return
        self._sign(self.own.join_round, max(leave_round, self.own.join_round + 1))
        async def tell(record: MemberRecord) -> None:
            try:  # even to a member an exchange is under way with: that one carries the record before this
                async with self._dialling:
                    await self.exchange(record.peer_id, record.addrs, "sync")
            except Exception:  # noqa: BLE001 - best effort: the record spreads by gossip too
                pass

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for record in self.view.others():
                    nursery.start_soon(tell, record)

    async def _sync_unsynced(self) -> None:
        # At once (at most MAX_DIALLING): a member whose addresses never answer costs one exchange's timeout, not
        # one per such member in turn.
        async with trio.open_nursery() as nursery:
            for record in self.view.others():
                if record.peer_id not in self.synced and self._may_dial(record.peer_id):
                    nursery.start_soon(self._try, record.peer_id, record.addrs, "sync")
        self._apply()

    def expire(self, now: float) -> None:
        """Drop the members not refreshed for member_timeout_s, and everything kept about them."""
        for record in self.view.expire(now):
            self._forget(record.peer_id)
            log.warning("%s: %s (%s) left the swarm: no fresh record for %.0f s", self.settings.name,
                        record.name, record.peer_id, self.settings.member_timeout_s)

    def _forget(self, peer_id: str) -> None:
        """A member that left: nothing of it is kept (per-peer state stays bounded by the members)."""
        for table in (self.known_since, self.rounds_heard, self.errors, self.retry_at):
            table.pop(peer_id, None)
        self.leaving.discard(peer_id)
        self.synced.discard(peer_id)

    def _may_dial(self, peer_id: str) -> bool:
        """Two members that learn of each other at once would dial each other at once, and py-libp2p then keeps
        two connections that it trims apart, losing streams opened on them meanwhile: of two members not yet
        connected, the one with the smaller peer ID dials, the other only after DIAL_WAIT_S. One whose exchange
        failed is redialled after a wait that doubles up to RETRY_MAX_S: members' addresses are the members' word,
        and one listing another host's address must not make every member dial it every second."""
        if trio.current_time() < self.retry_at.get(peer_id, (0.0, 0.0))[0]:
            return False
        if peer_id > self.own_id or self.endpoint.connected(peer_id):
            return True
        return trio.current_time() - self.known_since.get(peer_id, 0.0) >= DIAL_WAIT_S

    async def _try(self, peer_id: str, addrs, kind: str) -> None:
        if peer_id in self._in_flight:
            return  # joining and staying current both sync: one exchange with a member at a time
        self._in_flight.add(peer_id)
        try:
            async with self._dialling:
                await self.exchange(peer_id, addrs, kind)
        except Exception as error:  # not up yet, gone, or misbehaving: the view's timeout decides
            self.errors[peer_id] = reason(error)
            if peer_id in self.view.records:
                wait = min(RETRY_MAX_S, 2 * self.retry_at.get(peer_id, (0.0, RETRY_FIRST_S / 2))[1])
                self.retry_at[peer_id] = (trio.current_time() + wait, wait)
        else:
            self.retry_at.pop(peer_id, None)
        finally:
            self._in_flight.discard(peer_id)

    def _sign(self, join_round: int, leave_round: int | None) -> None:
        seen = self.view.own_seen.seq if self.view.own_seen is not None else 0
        self._seq = max(self._seq + 1, time.time_ns() // 1000, seen + 1)  # above any record of a run before
        record = MemberRecord(self.settings.swarm, self.own_id, self.settings.name,
                              tuple(self.endpoint.listen_addrs), join_round, leave_round, self._seq)
        self.view.set_own(sign_record(self.key_pair, record), trio.current_time())
        self.synced.clear()  # everyone should get the new record: unsynced members are synced first

    def _apply(self) -> None:
        """The endpoint's peers and the name map follow the live members."""
        live = {r.peer_id: r for r in self.view.others()}
        for pid in [p for p in self.endpoint.neighbours if p not in live]:
            self.endpoint.remove_neighbour(pid)
        for pid, record in live.items():
            state = self.endpoint.neighbours.get(pid)
            if state is None or [str(a) for a in state.addrs] != list(record.addrs):
                try:
                    self.endpoint.add_neighbour(pid, record.addrs)
                except ValueError as error:  # member_records.check_addrs refuses these first: never expected
                    log.warning("%s: %s's addresses are not dialable: %s", self.settings.name, pid, error)
        self.ids.clear()
        self.ids.update({r.name: r.peer_id for r in live.values()})

    # -- the protocol --------------------------------------------------------------------

    async def exchange(self, peer_id: str, addrs, kind: str) -> None:
        """Send our records to `peer_id` ("sync": it keeps them; "join": it only answers) and take its answer."""
        pid, host = parse_peer_id(peer_id), self.endpoint.host
        payload = encode_message(self.settings.swarm, kind, self.current_round(), self._outgoing(kind))
        token = exchanging.set(True)
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT_S), quiet_dials():
                if not host.get_network().get_connections(pid):
                    host.get_peerstore().clear_addrs(pid)  # libp2p dials one address per transport: only these
                    host.get_network().unblock_peer(pid)
                    await host.connect(PeerInfo(pid, dial_addrs(peer_id, addrs)))
                answer = await self._ask(host, pid, payload)
        finally:
            exchanging.reset(token)
        if answer.swarm != self.settings.swarm:
            raise MembershipError(f"{peer_id} is a member of swarm {answer.swarm!r}")
        self.take(peer_id, answer.records)
        if peer_id not in self.view.records:
            raise MembershipError(f"{peer_id} answered without a record of its own")
        self.rounds_heard[peer_id] = answer.round  # a member's word only
        self.errors.pop(peer_id, None)
        self.view.touch(peer_id, trio.current_time())
        if kind == "sync":
            self.synced.add(peer_id)

    async def _ask(self, host, pid, payload: bytes):
        stream = await host.new_stream(pid, [MEMBERS_PROTOCOL])
        try:
            await write_message(stream, payload)
            answer = decode_message(await read_message(stream, message_bytes_cap(self.settings.num_peers)))
        except BaseException:
            await reset_stream(stream)
            raise
        await stream.close()
        return answer

    def _outgoing(self, kind: str) -> list:
        return [self.view.records[self.own_id]] if kind == "join" else self.view.signed()

    def take(self, sender: str, records) -> None:
        if len(records) > 2 * self.settings.num_peers:
            raise MembershipError(f"{len(records)} records is over twice the swarm's {self.settings.num_peers}")
        changed, refused = False, []
        for raw in records:
            try:
                record = self.view.offer(raw, trio.current_time())
            except MembershipError as error:
                refused.append(str(error))
                continue
            changed = changed or record is not None
            if record is not None and record.leave_round is not None and record.peer_id not in self.leaving:
                self.leaving.add(record.peer_id)
                log.info("%s: %s (%s) leaves the swarm from round %d", self.settings.name, record.name,
                         record.peer_id, record.leave_round)
            if record is not None and record.peer_id not in self.known_since:
                self.known_since[record.peer_id] = trio.current_time()
            if record is not None:
                self.retry_at.pop(record.peer_id, None)  # new addresses, say: worth dialling at once
            if record is not None and record.peer_id != sender:
                self.synced.discard(record.peer_id)  # a member we never talked to: tell it about us
        if refused and self.view.note_refused(sender, refused[0][:80]):  # one line a message, whatever it holds
            log.warning("%s: refused %d membership record(s) from %s: %s", self.settings.name, len(refused), sender,
                        refused[0])
        if changed:
            self._apply()
