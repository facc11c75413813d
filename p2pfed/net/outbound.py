"""The libp2p endpoint's send side: one kept stream per neighbour, one frame at a time on it, one retry.

Updates to a neighbour go out one after another on one long-lived stream on PROTOCOL_ID (opening a stream
costs 8-16 ms; a kept one also keeps the Yamux window it has grown), one frame each (`p2pfed.net.framing`),
and the receiver (`p2pfed.net.inbound`) answers each with a 1-byte ack once the body is in its inbox. Any
failure on a stream (a timeout, a reset, a bad frame) resets it, so a stream never carries on half-way
through a frame; the next send opens a new one.

One retry: a stream that fails before its ack came back (reset or closed by the neighbour, its connection
closed under it: a neighbour that restarted, dropped the stream, or dropped a duplicate connection while we
were opening a stream on it) is replaced and the frame sent once more on a new stream, dialling first if the
connection is gone, within the same deadline. The receiver delivers whole frames only, so a frame cut off
half-way cannot arrive twice; one that arrived whole but lost its ack may, and the peer keeps one update per
(sender, round) anyway (`loop.UpdateInbox`). A timeout, a refused dial or a stalled write is not retried.
A send that fails (the neighbour is gone, refuses, or is too slow) is logged and counted, never raised into
the peer's loop.

`send_many` sends one payload to several neighbours at once, at most `max_concurrent_sends` at a time: a
round costs about one ack's round trip instead of one per neighbour.

Facts about py-libp2p 0.8.1 that shape this module (docs/libp2p.md has the measurements):
- A write cut off half-way (after Noise has sealed a message, before the socket took it) can wedge or
  tear down the connection. So nothing that writes on a shared connection is cancelled: opening a stream
  and each 1 MiB chunk of the body run shielded, the deadline is checked between chunks, and where a
  hard stop had to cut something off anyway the connection is dropped and the next send redials.
- A refused dial makes libp2p refuse that peer for 60 s, and it dials one address per transport:
  before each dial the neighbour is unblocked and its peerstore addresses replaced by ours.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pfed.net.dialling import dial_failure, quiet_dials
from p2pfed.net.fastpath import use_fast_stream
from p2pfed.net.framing import ACK, PROTOCOL_ID, STREAM_ERRORS, frame_pieces, read_upto, reset_stream
from p2pfed.net.identity import parse_peer_id

if TYPE_CHECKING:  # a type only: libp2p_endpoint imports this module
    from p2pfed.net.libp2p_endpoint import TransportLimits

log = logging.getLogger("p2pfed.net.libp2p_endpoint")  # one logger for the endpoint, whichever module logs


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


class SendFailed(Exception):
    """A send to a neighbour did not complete; the message says why."""


class _StreamLost(Exception):
    """The stream ended before the neighbour acknowledged the frame: worth one more try on a new stream."""


class OutboundSends:
    """Sends frames to neighbours over `host`; the endpoint owns the neighbours and hands them in."""

    def __init__(self, name: str, host, limits: TransportLimits, neighbours: Mapping[str, NeighbourState],
                 drop_connection: Callable[[str], Awaitable[None]]) -> None:
        self.name = name
        self.limits = limits
        self.bytes_sent = 0  # body bytes written to streams (headers excluded, unacknowledged ones included)
        self._host = host
        self._neighbours = neighbours
        self._drop_connection = drop_connection
        self._slots = trio.Semaphore(limits.max_concurrent_sends)

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
        except (SendFailed, _StreamLost) as failure:
            self._failed(to, state, str(failure))
        except trio.TooSlowError:
            self._failed(to, state, f"timed out after {self.limits.send_timeout_s:g} s")
        except STREAM_ERRORS as error:
            self._failed(to, state, _error_text(error))
        except Exception as error:  # whatever libp2p raises, the peer loop carries on
            log.exception("%s: unexpected error sending to %s", self.name, to)
            self._failed(to, state, f"{type(error).__name__}: {error}")
        else:
            state.consecutive_failures = 0

    async def send_many(self, neighbours: Iterable[str], payload: bytes) -> None:
        """`send` to every one of `neighbours` at once (at most max_concurrent_sends at a time); never raises."""
        async with trio.open_nursery() as nursery:
            for to in neighbours:
                nursery.start_soon(self.send, to, payload)

    async def dial(self, to: str, state: NeighbourState) -> None:
        """Connect to neighbour `to` at its configured addresses; SendFailed with the root cause if not."""
        if not state.addrs:
            raise SendFailed("not connected and no known address")
        # Dial exactly the addresses we were given (identify may have added others), and retry a
        # neighbour libp2p blocked after an earlier failure: our callers decide when to give up.
        self.forget_addrs(to)
        pid = parse_peer_id(to)
        try:
            with quiet_dials():
                if self._host.get_network().get_connections(pid):
                    # Only closed ones, not yet noticed: connect() would take them for a connection and return.
                    self._host.get_peerstore().add_addrs(pid, state.addrs, 120)
                    await self._host.get_network().dial_peer(pid)
                else:
                    await self._host.connect(PeerInfo(pid, state.addrs))
        except Exception as error:  # libp2p's layers of wrapping errors: the root cause, in a few words
            raise SendFailed(f"cannot connect: {dial_failure(error)}") from error

    def forget_addrs(self, peer_id: str) -> None:
        # libp2p dials only one address per transport class, so a stale one would shadow the new
        # one; and after all addresses of a peer are refused it refuses that peer for 60 s.
        pid = parse_peer_id(peer_id)
        self._host.get_peerstore().clear_addrs(pid)
        self._host.get_network().unblock_peer(pid)

    # -- one send ---------------------------------------------------------------------------

    async def _send(self, to: str, state: NeighbourState, payload: bytes, deadline: float) -> None:
        async with self._turn(state, deadline):
            for attempt in (1, 2):
                try:
                    await self._deliver(to, state, payload, deadline)
                    return
                except (_StreamLost, *STREAM_ERRORS) as error:
                    # Whatever was half-done on the stream (a partial frame, an ack still to come) would
                    # put the next frame out of step: reset it, and a new one is opened.
                    await self._forget_stream(state)
                    if attempt == 2 or trio.current_time() >= deadline:
                        raise
                    log.info("%s: the stream to %s ended before the ack (%s); sending again on a new one",
                             self.name, to, _error_text(error))
                except BaseException:
                    await self._forget_stream(state)
                    raise

    @contextlib.asynccontextmanager
    async def _turn(self, state: NeighbourState, deadline: float) -> AsyncIterator[None]:
        """One frame at a time on a neighbour's stream, and at most max_concurrent_sends in all."""
        if not await _acquire_by(state.stream_lock, deadline):
            raise SendFailed(f"an earlier send to this neighbour held its stream for {self.limits.send_timeout_s:g} s")
        try:
            if not await _acquire_by(self._slots, deadline):
                raise SendFailed(f"no send slot free within {self.limits.send_timeout_s:g} s")
            try:
                yield
            finally:
                self._slots.release()
        finally:
            state.stream_lock.release()

    async def _deliver(self, to: str, state: NeighbourState, payload: bytes, deadline: float) -> None:
        stream = await self._stream(to, state, deadline)
        await self._write_frame(to, stream, payload, deadline)
        with trio.move_on_at(deadline) as ack_wait:
            # Cancelling a read is safe but in the window update it may write (at a stream's first read,
            # then every 4 MiB read; a hit burns a Noise nonce: the neighbour drops the connection, we redial).
            ack = await read_upto(stream, 1)
        if ack_wait.cancelled_caught:
            raise SendFailed(f"no ack within {self.limits.send_timeout_s:g} s")
        if ack != ACK:
            raise _StreamLost("the neighbour closed the stream without acknowledging the update")

    async def _stream(self, to: str, state: NeighbourState, deadline: float) -> INetStream:
        """The neighbour's kept stream, or a new one (dialling first if not connected)."""
        pid = parse_peer_id(to)
        if all(connection.is_closed for connection in self._host.get_network().get_connections(pid)):
            await self._forget_stream(state)  # it belonged to a connection that is gone
            with trio.move_on_at(deadline) as dialling:  # nothing shared to wedge before we are connected
                await self.dial(to, state)
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
            raise SendFailed("opening a stream stalled; dropped the connection")
        state.stream = stream
        if trio.current_time() >= deadline:
            raise trio.TooSlowError
        return stream

    async def _forget_stream(self, state: NeighbourState) -> None:
        stream, state.stream = state.stream, None
        if stream is not None:
            await reset_stream(stream)

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
                raise SendFailed(f"a write stalled for {self.limits.write_stall_s:g} s; dropped the connection")

    def _failed(self, to: str, state: NeighbourState, reason: str) -> None:
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = reason
        log.warning("%s: send to %s failed (%d in a row): %s", self.name, to, state.consecutive_failures, reason)


def _error_text(error: BaseException) -> str:
    return str(error) if isinstance(error, _StreamLost) else f"{type(error).__name__}: {error}".rstrip(": ")


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

