"""Frames on a libp2p stream: what the libp2p endpoint writes and reads, and stream helpers.

One frame per update, many frames per stream:

    magic b"P2PF" | version (1 byte) | body length (8 bytes, big-endian) | body

The receiver answers each frame with a 1-byte ACK. It checks the declared length against its cap
before reading the body, and delivers whole frames only.
"""

from __future__ import annotations

import logging
import struct

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/p2pfed/update/1.1.0")  # 1.1: many frames per stream
MAGIC = b"P2PF"
FRAME_VERSION = 1
FRAME_HEADER = struct.Struct(">4sBQ")  # magic, version, body length
ACK = b"\x06"

WRITE_CHUNK = 1 << 20  # bytes written, shielded from cancellation, between deadline checks
FIRST_PIECE = 64 * 1024  # body bytes that travel with the frame header
READ_AHEAD = 1 << 20  # bytes a receiver reads at once, the frame header among them

# What I/O on a stream that died under us raises (reset, closed, connection gone).
STREAM_ERRORS = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class FrameError(Exception):
    """A frame is malformed, truncated or over the size cap; the message says which (no payload bytes)."""


def frame_pieces(payload: bytes) -> list[tuple[bytes | memoryview, int]]:
    """The writes of one frame, each with the number of body bytes it carries.

    The header goes with the first bytes of the body (a small copy; a write of its own would cost a
    Noise message and a Yamux frame), the rest in WRITE_CHUNK slices of the payload, without copying.
    """
    header = FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(payload))
    body = memoryview(payload)
    first = min(len(body), FIRST_PIECE)
    pieces: list[tuple[bytes | memoryview, int]] = [(header + body[:first], first)]
    for at in range(first, len(body), WRITE_CHUNK):
        chunk = body[at : at + WRITE_CHUNK]
        pieces.append((chunk, len(chunk)))
    return pieces


async def read_frame(stream: INetStream, start: bytes, max_bytes: int) -> tuple[bytes, bytes]:
    """The body of the frame that begins with `start` (bytes read already), and the bytes read past it.

    The rest of the body is read only once its declared length has passed `max_bytes`. Raises FrameError.
    """
    length, head = await read_frame_header(stream, start, max_bytes)
    return await read_frame_body(stream, length, head)


async def read_frame_header(stream: INetStream, start: bytes, max_bytes: int) -> tuple[int, memoryview]:
    """The declared body length of the frame that begins with `start`, and the bytes read past its header
    (a view of `start`: no copy).

    Raises FrameError for a bad or truncated header, or a length over `max_bytes`.
    """
    if len(start) < FRAME_HEADER.size:
        start += await read_upto(stream, FRAME_HEADER.size - len(start))
    if len(start) < FRAME_HEADER.size:
        raise FrameError(f"truncated frame header ({len(start)} of {FRAME_HEADER.size} bytes)")
    magic, version, length = FRAME_HEADER.unpack_from(start)
    if magic != MAGIC or version != FRAME_VERSION:
        raise FrameError("bad magic or frame version")
    if length > max_bytes:
        raise FrameError(f"a {length}-byte update is over max_message_bytes={max_bytes}")
    return length, memoryview(start)[FRAME_HEADER.size :]


async def read_frame_body(stream: INetStream, length: int, head: memoryview) -> tuple[bytes, bytes]:
    """The `length`-byte body whose first bytes are `head`, and the bytes read past it. Raises FrameError."""
    if len(head) >= length:
        return bytes(head[:length]), bytes(head[length:])
    chunks: list[bytes | memoryview] = [head]
    got = len(head)
    while got < length:
        try:
            data = await stream.read(length - got)  # returns what is buffered
        except StreamEOF:
            data = b""
        if not data:
            raise FrameError(f"truncated update: {got} of {length} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks), b""  # the body's only copy on our side


async def read_upto(stream: INetStream, n: int) -> bytes:
    """Up to `n` bytes: fewer only at the end of the stream. (libp2p's read_exactly fails from ~7 MB.)"""
    chunks = []
    got = 0
    while got < n:
        try:
            data = await stream.read(n - got)  # returns what is buffered
        except StreamEOF:
            break
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def reset_stream(stream: INetStream) -> None:
    """Reset `stream`, shielded and bounded: the connection under it may be gone already."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await stream.reset()
        except Exception as error:
            log.debug("resetting a stream failed: %s", error)
