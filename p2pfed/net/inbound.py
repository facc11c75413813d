"""The libp2p endpoint's receive side: neighbours' inbound streams, their frames, and the inbox.

Each inbound stream on PROTOCOL_ID carries frames one after another (`p2pfed.net.framing`), each answered
with a 1-byte ack once its body is in the inbox. The length is checked against `max_message_bytes` before
the body is read, and the body is read whole (Yamux resets a sender whose receiver stops reading for 5 s).

What one neighbour may have buffered here is bounded in bytes (`max_buffered_bytes_per_neighbour`):
its frames being read and those waiting for `receive()`. A frame counts from its header on, before its
body is read; one that does not fit waits there, unread and unacknowledged, until `receive()` makes room,
and is dropped (one warning, the stream reset) if that takes `receive_timeout_s`. Held back rather than
dropped at once: the missing ack blocks the neighbour's send, the backpressure the ack is for, and an
honest neighbour that is merely a round ahead of a busy receiver loses nothing. A frame bigger than the
whole budget is taken once nothing else of its sender's is buffered, so any frame within
`max_message_bytes` gets through.

Not counted: what the transport holds for a stream that waits, at most the Yamux receive window
(`fastpath.RECEIVE_WINDOW`, 16 MiB) per stream, `max_inbound_per_neighbour` streams. A sender whose frame is
longer than the window it has left stalls, and its own Yamux gives up after 5 s: a failed send there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from p2pfed.net.fastpath import use_fast_stream
from p2pfed.net.framing import (
    ACK,
    READ_AHEAD,
    STREAM_ERRORS,
    FrameError,
    read_frame_body,
    read_frame_header,
    reset_stream,
)

if TYPE_CHECKING:  # a type only: libp2p_endpoint imports this module
    from p2pfed.net.libp2p_endpoint import TransportLimits

log = logging.getLogger("p2pfed.net.libp2p_endpoint")  # one logger for the endpoint, whichever module logs


@dataclass
class _Budget:
    used: int = 0  # bytes of the neighbour's frames being read or waiting in the inbox
    room: trio.Event = field(default_factory=trio.Event)  # set, and replaced, whenever `used` goes down


class InboundStreams:
    """Serves neighbours' inbound streams into a bounded inbox; `handle_stream` is the libp2p stream handler."""

    def __init__(self, name: str, limits: TransportLimits, is_neighbour: Callable[[str], bool],
                 drop_connection: Callable[[str], Awaitable[None]]) -> None:
        self.name = name
        self.limits = limits
        self._is_neighbour = is_neighbour
        self._drop_connection = drop_connection
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[tuple[str, bytes]](limits.inbox_size)
        self._streams: dict[str, int] = {}  # streams open to us, per neighbour
        self._budgets: dict[str, _Budget] = {}  # one per neighbour that ever sent (a few dozen bytes each)

    async def receive(self) -> tuple[str, bytes]:
        sender, body = await self._inbox_receive.receive()
        self._release(sender, len(body))
        return sender, body

    @property
    def buffered(self) -> dict[str, int]:
        """Bytes buffered per neighbour (being read, or waiting for receive()); neighbours with none left out."""
        return {peer: budget.used for peer, budget in self._budgets.items() if budget.used}

    def close(self) -> None:
        self._inbox_send.close()
        self._inbox_receive.close()

    # -- streams

    async def handle_stream(self, stream: INetStream) -> None:
        """libp2p runs this in a task of its own for each inbound stream on PROTOCOL_ID."""
        sender = stream.muxed_conn.peer_id.to_base58()  # authenticated by Noise
        if not self._is_neighbour(sender):
            log.warning("%s: refused a stream from %s, which is not a neighbour", self.name, sender)
            await reset_stream(stream)
            return
        if self._streams.get(sender, 0) >= self.limits.max_inbound_per_neighbour:
            log.warning("%s: refused a stream from %s, which already has %d streams open to us", self.name,
                        sender, self._streams[sender])
            await reset_stream(stream)
            return
        self._streams[sender] = self._streams.get(sender, 0) + 1
        use_fast_stream(stream)
        try:
            await self._serve_stream(sender, stream)
        except STREAM_ERRORS as error:
            log.warning("%s: stream from %s failed: %s %s", self.name, sender, type(error).__name__, error)
            await reset_stream(stream)
        except Exception:
            log.exception("%s: unexpected error on a stream from %s", self.name, sender)
            await reset_stream(stream)
        finally:
            self._streams[sender] -= 1
            if not self._streams[sender]:
                del self._streams[sender]

    async def _serve_stream(self, sender: str, stream: INetStream) -> None:
        """Frames one after another, each acknowledged, until the sender closes the stream or sends a bad one."""
        start = b""  # bytes of the next frame already read
        while True:
            if not start:
                try:
                    start = await stream.read(READ_AHEAD)  # idle between updates: no deadline here
                except StreamEOF:
                    pass
                if not start:
                    log.debug("%s: %s closed its stream", self.name, sender)
                    await stream.close()
                    return
            if not self._is_neighbour(sender):
                log.warning("%s: dropped an update from %s, which is no longer a neighbour", self.name, sender)
                await reset_stream(stream)
                return
            start = await self._take_update(sender, stream, start)
            if start is None:
                await reset_stream(stream)
                return
            await stream.write(ACK)

    async def _take_update(self, sender: str, stream: INetStream, start: bytes) -> bytes | None:
        """Read the rest of one frame and put its body in the inbox; what came after it, or None (logged)
        when the frame was dropped."""
        stage = "read"
        reserved = 0  # bytes counted against the sender's budget by this frame, until the inbox has them
        try:
            with trio.move_on_after(self.limits.receive_timeout_s):
                try:
                    length, head = await read_frame_header(stream, start, self.limits.max_message_bytes)
                    stage = "room"
                    reserved = await self._reserve(sender, length)
                    stage = "read"
                    body, after = await read_frame_body(stream, length, head)
                except FrameError as error:
                    log.warning("%s: dropped a frame from %s: %s", self.name, sender, error)
                    return None
                stage = "inbox"
                try:
                    self._inbox_send.send_nowait((sender, body))
                except trio.WouldBlock:
                    await self._inbox_send.send((sender, body))  # a full inbox holds back the ack
                reserved = 0  # receive() gives it back
                return after
        finally:
            if reserved:
                self._release(sender, reserved)
        timeout = self.limits.receive_timeout_s
        if stage == "room":
            log.warning("%s: dropped an update from %s: over its buffer budget (%d of %d bytes taken) for %g s",
                        self.name, sender, self._budgets[sender].used,
                        self.limits.max_buffered_bytes_per_neighbour, timeout)
        elif stage == "inbox":
            log.warning("%s: dropped an update from %s: the inbox stayed full for %g s", self.name, sender, timeout)
        else:
            log.warning("%s: dropped an update from %s: not read whole within %g s", self.name, sender, timeout)
            # The cancelled read may have been sending a window update: start afresh.
            await reset_stream(stream)
            await self._drop_connection(sender)
        return None

    # -- the per-neighbour budget

    async def _reserve(self, sender: str, length: int) -> int:
        """Count `length` bytes against the sender's budget, once they fit (or nothing else is buffered)."""
        budget = self._budgets.setdefault(sender, _Budget())
        if budget.used and budget.used + length > self.limits.max_buffered_bytes_per_neighbour:
            log.debug("%s: holding back a %d-byte update from %s: %d bytes of its are buffered", self.name,
                      length, sender, budget.used)
            while budget.used and budget.used + length > self.limits.max_buffered_bytes_per_neighbour:
                await budget.room.wait()
        budget.used += length
        return length

    def _release(self, sender: str, length: int) -> None:
        budget = self._budgets.get(sender)
        if budget is None or not length:
            return
        budget.used -= length
        budget.room.set()
        budget.room = trio.Event()
