"""The libp2p endpoint: one host per peer, updates sent over direct streams to topology neighbours.

    key = identity_from_file("peer.key")  # peer_id_of(key) is this peer's name; neighbours need it
    async with open_libp2p_endpoint(key, "/ip4/127.0.0.1/tcp/4001", {neighbour_id: [neighbour_addr]}) as endpoint:
        await endpoint.send(neighbour_id, payload)
        sender, payload = await endpoint.receive()

A peer's name on the network is its peer ID, which Noise authenticates: `receive()` names the sender by
the ID of the connection the bytes came on, never by anything in the payload. A peer accepts streams only
from its neighbours' IDs. The transport moves bytes; the peer decodes them (p2pfed.net.wire), so nothing here
unpickles or parses what arrives beyond the frame header.

Updates to a neighbour go out one after another on one long-lived stream on PROTOCOL_ID (opening a
stream costs 8-16 ms; a kept one also keeps the Yamux window it has grown), one frame each
(`p2pfed.net.framing`), and the receiver (`p2pfed.net.inbound`) answers each with a 1-byte ack once the body
is in its inbox; what one neighbour may have buffered there is bounded in bytes. Any failure on a stream
(a timeout, a reset, a bad frame) resets it, so a stream never carries on half-way through a frame; the
next send opens a new one. A kept stream found dead before a frame went out whole (the neighbour
restarted, or reset it) is replaced and the frame sent again: the receiver delivers whole frames only,
so this cannot duplicate one. A send that fails (the neighbour is gone, refuses, or is
too slow) is logged and counted, never raised into the peer's loop.

Hosts offer Noise only and Yamux only, through `p2pfed.net.fastpath`, which also moves bulk data
several times faster than stock py-libp2p with the same protocols on the wire (see its docstring).
py-libp2p's default hosts also accept /plaintext/2.0.0, in which a dialler can claim any peer ID whose
public key it knows: offering Noise alone is what makes the peer ID an authenticated name. A dialler that
is not a neighbour is hung up on right after Noise, before any buffer of its own exists, and libp2p's
inbound connection slots are given back when connections close (`p2pfed.net.inbound_slots`): strangers
can neither lock neighbours out nor cost more than a handshake each.

Facts about py-libp2p 0.8.1 that shape this module (docs/libp2p.md has the measurements):
- A write cut off half-way (after Noise has sealed a message, before the socket took it) can wedge or
  tear down the connection. So nothing that writes on a shared connection is cancelled: opening a stream
  and each 1 MiB chunk of the body run shielded, the deadline is checked between chunks, and where a
  hard stop had to cut something off anyway the connection is dropped and the next send redials.
- `stream.read(n)` returns what is buffered and ends with StreamEOF; `read_exactly` fails from ~7 MB.
- A refused dial makes libp2p refuse that peer for 60 s, and it dials one address per transport:
  before each dial the neighbour is unblocked and its peerstore addresses replaced by ours.
- A listen address libp2p cannot bind is logged at debug level and skipped, and listeners use SO_REUSEPORT
  (a second host binds a port in use without an error): `open_libp2p_endpoint` checks both (ListenError).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import trio
from libp2p import new_host
from libp2p.abc import INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from p2pfed.config import NetworkConfig
from p2pfed.net.dialling import dial_failure, quiet_dials
from p2pfed.net.fastpath import security_options, use_fast_stream
from p2pfed.net.framing import ACK, PROTOCOL_ID, STREAM_ERRORS, frame_pieces, read_upto, reset_stream
from p2pfed.net.identity import dial_addrs, parse_peer_id
from p2pfed.net.inbound import InboundStreams
from p2pfed.net.inbound_slots import InboundSlots
from p2pfed.net.listening import ListenError, check_bindable, check_listening

__all__ = ["Libp2pEndpoint", "ListenError", "NeighbourState", "TransportLimits", "open_libp2p_endpoint"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TransportLimits:
    max_message_bytes: int = NetworkConfig.max_message_bytes  # frames declaring a longer body are refused unread
    send_timeout_s: float = 60.0  # one send: dial, open the stream, write, wait for the ack
    receive_timeout_s: float = 60.0  # one inbound frame: header, body and a place in the inbox
    write_stall_s: float = 10.0  # the most one ~1 MiB chunk may take; past it the connection is dropped
    max_concurrent_sends: int = 2  # more streams at once only adds latency and memory
    max_inbound_per_neighbour: int = 2  # streams a neighbour may have open to us at once (it keeps one)
    inbox_size: int = 32  # received updates waiting for receive(); a full inbox holds back the acks
    # Bytes of one neighbour's updates being read or waiting for receive(); past it, its next update waits
    # unacknowledged (p2pfed.net.inbound). A peer sets about two expected updates; one update bigger than
    # this still gets through once nothing else of that neighbour's is buffered.
    max_buffered_bytes_per_neighbour: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_concurrent_sends", "max_inbound_per_neighbour", "inbox_size",
                     "max_buffered_bytes_per_neighbour"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("send_timeout_s", "receive_timeout_s", "write_stall_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class NeighbourState:
    addrs: list[Multiaddr]
    failures: int = 0  # failed sends in total
    consecutive_failures: int = 0  # failed sends since the last success
    last_error: str = ""
    # The stream updates go out on, kept from one send to the next (opening one costs 8-16 ms, and a
    # kept stream keeps the Yamux window it has grown); None before the first send and after a failure.
    stream: INetStream | None = field(default=None, repr=False)
    stream_lock: trio.Lock = field(default_factory=trio.Lock, repr=False)  # one frame at a time on it
    # (peer that answered, address) pairs already reported for answering this neighbour's dials: once each.
    wrong_peers: set[tuple[str, str]] = field(default_factory=set, repr=False)


class _SendFailed(Exception):
    """A send to a neighbour did not complete; the message says why."""


# ---------------------------------------------------------------------------------------------
# The endpoint


class Libp2pEndpoint:
    """A peer's view of a libp2p network (the `Endpoint` protocol). Open it with `open_libp2p_endpoint`."""

    def __init__(self, key_pair: KeyPair, limits: TransportLimits):
        self.bytes_sent = 0  # body bytes written to streams (headers excluded, unacknowledged ones included)
        self.strangers_refused = 0  # diallers hung up on after Noise: not neighbours
        self.limits = limits
        self.admit_others: Callable[[str], bool] | None = None  # who else may stay after Noise (membership)
        self._neighbours: dict[str, NeighbourState] = {}
        # One connection per peer: with more allowed, every connect() waits for happy eyeballs (250 ms).
        # Noise alone (no plaintext, which proves no identity) and Yamux alone (Mplex manages 7-11 MB/s).
        self._host = new_host(key_pair=key_pair, connection_config=ConnectionConfig(max_connections_per_peer=1),
                              sec_opt=security_options(key_pair, self.admits, self.wrong_peer),
                              muxer_opt={YAMUX_PROTOCOL_ID: Yamux})
        InboundSlots.install(self._host.get_network())
        self.name = self._host.get_id().to_base58()
        self._send_slots = trio.Semaphore(limits.max_concurrent_sends)
        self._inbound = InboundStreams(self.name, limits, self._neighbours.__contains__, self._drop_connection)
        self._host.set_stream_handler(PROTOCOL_ID, self._inbound.handle_stream)

    # -- the Endpoint protocol --------------------------------------------------------------

    async def send(self, to: str, payload: bytes) -> None:
        """Deliver `payload` to neighbour `to`, or log and count why not; never raises (but for cancellation).

        Returns within `send_timeout_s`, or up to `write_stall_s` later when the deadline falls inside a
        write that cannot be cut off safely.
        """
        state = self._neighbours.get(to)
        if state is None:
            log.warning("%s: not sending to %s, which is not a neighbour", self.name, to)
            return
        deadline = trio.current_time() + self.limits.send_timeout_s
        try:
            await self._send(to, state, payload, deadline)
        except _SendFailed as failure:
            self._failed(to, state, str(failure))
        except trio.TooSlowError:
            self._failed(to, state, f"timed out after {self.limits.send_timeout_s:g} s")
        except STREAM_ERRORS as error:
            self._failed(to, state, f"{type(error).__name__}: {error}".rstrip(": "))
        except Exception as error:  # whatever libp2p raises, the peer loop carries on
            log.exception("%s: unexpected error sending to %s", self.name, to)
            self._failed(to, state, f"{type(error).__name__}: {error}")
        else:
            state.consecutive_failures = 0

    async def receive(self) -> tuple[str, bytes]:
        return await self._inbound.receive()

    def online(self, round_index: int) -> bool:
        return True

    # -- neighbours -----------------------------------------------------------------------

    @property
    def listen_addrs(self) -> list[str]:
        """The addresses this host listens on (real ports), for neighbours' configuration."""
        return [str(addr) for addr in self._host.get_transport_addrs()]

    @property
    def neighbours(self) -> Mapping[str, NeighbourState]:
        return self._neighbours

    @property
    def host(self):
        return self._host  # for protocols beside the updates' (p2pfed.net.membership)

    def connected(self, peer_id: str) -> bool:
        """Whether a connection to `peer_id` is open now (either side may have dialled)."""
        return bool(self._host.get_network().get_connections(parse_peer_id(peer_id)))

    @property
    def failures(self) -> dict[str, int]:
        """Failed sends per neighbour, in total."""
        return {peer_id: state.failures for peer_id, state in self._neighbours.items()}

    @property
    def buffered(self) -> dict[str, int]:
        """Bytes of each neighbour's updates being read or waiting for receive() (none: left out)."""
        return self._inbound.buffered

    def admits(self, peer: ID) -> bool:
        """Whether a dialler that Noise authenticated as `peer` may keep its connection: neighbours only,
        as they are now (the security transport asks at every inbound handshake)."""
        if peer.to_base58() in self._neighbours or (self.admit_others and self.admit_others(peer.to_base58())):
            return True
        self.strangers_refused += 1
        log.debug("%s: hung up on %s after Noise: not a neighbour", self.name, peer)
        return False

    def wrong_peer(self, expected: ID, answered: ID, address: str) -> None:
        """A dial to `expected` at `address` was answered, Noise-authenticated, by `answered`: one warning
        per neighbour, answering peer and address, however often the dial is retried."""
        state = self._neighbours.get(expected.to_base58())
        key = (answered.to_base58(), address)
        if state is None or key in state.wrong_peers:
            return
        state.wrong_peers.add(key)
        log.warning("%s: neighbour %s was dialled at %s but %s answered there; check its address and peer ID "
                    "(reported once)", self.name, expected, address, answered)

    def add_neighbour(self, peer_id: str, addrs: Iterable[str | Multiaddr] = ()) -> None:
        """Accept streams from `peer_id` and send to it at `addrs` (empty: it only dials us)."""
        if peer_id in self._neighbours:
            self.set_neighbour_addrs(peer_id, addrs)
            return
        parse_peer_id(peer_id)  # validate before anything reaches libp2p
        self._neighbours[peer_id] = NeighbourState(dial_addrs(peer_id, addrs))
        self._forget_addrs(peer_id)

    def remove_neighbour(self, peer_id: str) -> None:
        """Stop accepting streams from `peer_id` and sending to it (a member that left the swarm)."""
        self._neighbours.pop(peer_id, None)

    def set_neighbour_addrs(self, peer_id: str, addrs: Iterable[str | Multiaddr]) -> None:
        """New addresses for a neighbour (say, restarted on another port): the old ones are forgotten."""
        state = self._neighbours.get(peer_id)
        if state is None:
            raise KeyError(f"{peer_id} is not a neighbour; add_neighbour first")
        state.addrs = dial_addrs(peer_id, addrs)
        self._forget_addrs(peer_id)

    def _forget_addrs(self, peer_id: str) -> None:
        # libp2p dials only one address per transport class, so a stale one would shadow the new
        # one; and after all addresses of a peer are refused it refuses that peer for 60 s.
        pid = parse_peer_id(peer_id)
        self._host.get_peerstore().clear_addrs(pid)
        self._host.get_network().unblock_peer(pid)

    # -- sending ----------------------------------------------------------------------------

    async def _send(self, to: str, state: NeighbourState, payload: bytes, deadline: float) -> None:
        async with self._turn(state, deadline):
            try:
                await self._deliver(to, state, payload, deadline)
            except BaseException:
                # Whatever was half-done on the stream (a partial frame, an ack still to come) would
                # put the next frame out of step: reset it, and the next send opens a new one.
                await self._forget_stream(state)
                raise

    @contextlib.asynccontextmanager
    async def _turn(self, state: NeighbourState, deadline: float) -> AsyncIterator[None]:
        """One frame at a time on a neighbour's stream, and at most max_concurrent_sends in all."""
        if not await _acquire_by(state.stream_lock, deadline):
            raise _SendFailed(f"an earlier send to this neighbour held its stream for {self.limits.send_timeout_s:g} s")
        try:
            if not await _acquire_by(self._send_slots, deadline):
                raise _SendFailed(f"no send slot free within {self.limits.send_timeout_s:g} s")
            try:
                yield
            finally:
                self._send_slots.release()
        finally:
            state.stream_lock.release()

    async def _deliver(self, to: str, state: NeighbourState, payload: bytes, deadline: float) -> None:
        kept = state.stream is not None
        stream = await self._stream(to, state, deadline)
        try:
            await self._write_frame(to, stream, payload, deadline)
        except STREAM_ERRORS as error:
            if not kept:
                raise
            # The kept stream died since the last send (the neighbour restarted, reset it, or the
            # connection dropped). The receiver delivers only whole frames, and this one did not go
            # out whole, so sending it again on a new stream cannot duplicate it.
            log.info("%s: the stream kept for %s is gone (%s); sending on a new one", self.name, to,
                     type(error).__name__)
            await self._forget_stream(state)
            stream = await self._stream(to, state, deadline)
            await self._write_frame(to, stream, payload, deadline)
        with trio.move_on_at(deadline) as ack_wait:
            # Cancelling a read is safe but in the window update it may write (at a stream's first read,
            # then every 4 MiB read; a hit burns a Noise nonce: the neighbour drops the connection, we redial).
            ack = await read_upto(stream, 1)
        if ack_wait.cancelled_caught:
            raise _SendFailed(f"no ack within {self.limits.send_timeout_s:g} s")
        if ack != ACK:
            raise _SendFailed("the neighbour closed the stream without acknowledging the update")

    async def _stream(self, to: str, state: NeighbourState, deadline: float) -> INetStream:
        """The neighbour's kept stream, or a new one (dialling first if not connected)."""
        pid = parse_peer_id(to)
        if not self._host.get_network().get_connections(pid):
            await self._forget_stream(state)  # it belonged to a connection that is gone
            with trio.move_on_at(deadline) as dialling:  # nothing shared to wedge before we are connected
                await self._dial(to, pid, state)
            if dialling.cancelled_caught:
                await self._drop_connection(to)  # in case the cut-off dial got as far as registering it
                raise trio.TooSlowError
        if state.stream is not None:
            return state.stream
        # Opening a stream writes (multistream-select) on the shared connection: shielded like the body.
        with trio.CancelScope(shield=True, deadline=deadline + self.limits.write_stall_s) as opening:
            stream = await self._host.new_stream(pid, [PROTOCOL_ID])
            use_fast_stream(stream)
        if opening.cancelled_caught:
            await self._drop_connection(to)
            raise _SendFailed("opening a stream stalled; dropped the connection")
        state.stream = stream
        if trio.current_time() >= deadline:
            raise trio.TooSlowError
        return stream

    async def _forget_stream(self, state: NeighbourState) -> None:
        stream, state.stream = state.stream, None
        if stream is not None:
            await reset_stream(stream)

    async def wait_for_neighbours(self, timeout: float, retry_s: float = 0.25) -> list[str]:
        """Dial every neighbour with a known address until all are connected or `timeout` passes.

        For a start-up without a lost first round: a peer that starts before its neighbours listen would
        otherwise send round 1 into the void. Neighbours without an address must dial us: they count as
        reached once they have. Returns the IDs still unreachable (the caller goes on without them). Each
        failed dial leaves its reason in the neighbour's `last_error`; nothing is logged per dial (the
        caller reports who it is waiting for, libp2p's own lines go to debug: p2pfed.net.dialling).
        """
        with trio.move_on_after(timeout):
            while pending := [peer for peer in self._neighbours if not self.connected(peer)]:
                for peer in pending:
                    state = self._neighbours.get(peer)
                    if state is None or not state.addrs:
                        continue
                    limit = max(retry_s, 1.0)
                    with trio.move_on_after(limit) as dialling:
                        try:
                            await self._dial(peer, parse_peer_id(peer), state)
                        except Exception as error:  # not listening yet: try again
                            state.last_error = str(error)
                    if dialling.cancelled_caught:
                        state.last_error = f"no answer within {limit:g} s"
                        await self._drop_connection(peer, quiet=True)  # a cut-off dial may have half-registered
                await trio.sleep(retry_s)
        return [peer for peer in self._neighbours if not self.connected(peer)]

    async def _dial(self, to: str, pid: ID, state: NeighbourState) -> None:
        if not state.addrs:
            raise _SendFailed("not connected and no known address")
        # Dial exactly the addresses we were given (identify may have added others), and retry a
        # neighbour libp2p blocked after an earlier failure: our callers decide when to give up.
        self._forget_addrs(to)
        try:
            with quiet_dials():
                await self._host.connect(PeerInfo(pid, state.addrs))
        except Exception as error:  # libp2p's layers of wrapping errors: the root cause, in a few words
            raise _SendFailed(f"cannot connect: {dial_failure(error)}") from error

    async def _write_frame(self, to: str, stream: INetStream, payload: bytes, deadline: float) -> None:
        pieces = frame_pieces(payload)
        for index, (piece, body_bytes) in enumerate(pieces):
            if index:
                if trio.current_time() >= deadline:
                    raise trio.TooSlowError
                await trio.lowlevel.checkpoint()  # an outer cancellation lands here, between chunks
            # A write cancelled half-way can leave the Noise session wedged: let each chunk finish,
            # unless it takes write_stall_s (the neighbour stopped reading), and then drop the connection.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self.limits.write_stall_s) as scope:
                await stream.write(piece)
                self.bytes_sent += body_bytes
            if scope.cancelled_caught:
                await self._drop_connection(to)
                raise _SendFailed(f"a write stalled for {self.limits.write_stall_s:g} s; dropped the connection")

    async def _drop_connection(self, peer_id: str, quiet: bool = False) -> None:
        """Close the connection to `peer_id`: an I/O call cut off half-way may have left it unusable."""
        log.log(logging.DEBUG if quiet else logging.INFO, "%s: dropping the connection to %s", self.name, peer_id)
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                await self._host.disconnect(parse_peer_id(peer_id))
            except Exception as error:
                log.debug("%s: disconnecting %s failed: %s", self.name, peer_id, error)

    def _failed(self, to: str, state: NeighbourState, reason: str) -> None:
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = reason
        log.warning("%s: send to %s failed (%d in a row): %s", self.name, to, state.consecutive_failures, reason)


async def _acquire_by(resource: trio.Lock | trio.Semaphore, deadline: float) -> bool:
    """Acquire `resource` by `deadline` (False if not); without a trio checkpoint when it is free."""
    try:
        resource.acquire_nowait()
        return True
    except trio.WouldBlock:
        pass
    with trio.move_on_at(deadline):
        await resource.acquire()
        return True
    return False


@contextlib.asynccontextmanager
async def open_libp2p_endpoint(
    key_pair: KeyPair,
    listen: str | Sequence[str] = "/ip4/127.0.0.1/tcp/0",
    neighbours: Mapping[str, Iterable[str | Multiaddr]] | None = None,
    limits: TransportLimits = TransportLimits(),
) -> AsyncIterator[Libp2pEndpoint]:
    """Run a libp2p host (Noise only, Yamux only, with p2pfed's fast paths) on `listen` for as long as the block lasts.

    `neighbours` maps each neighbour's peer ID to the addresses to dial it at (may be empty for one
    that dials us). Raises ListenError if an address cannot be listened on. The host is closed on the
    way out, whatever happens.
    """
    listen_addrs = [Multiaddr(listen)] if isinstance(listen, str) else [Multiaddr(a) for a in listen]
    for addr in listen_addrs:
        check_bindable(addr)
    endpoint = Libp2pEndpoint(key_pair, limits)
    host = endpoint._host
    try:
        for peer_id, addrs in (neighbours or {}).items():
            endpoint.add_neighbour(peer_id, addrs)
        async with host.run(listen_addrs):
            try:
                check_listening(host.get_network(), listen_addrs)
                yield endpoint
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await host.close()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await host.close()  # idempotent; covers a failure inside host.run() itself
        endpoint._inbound.close()
