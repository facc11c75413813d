"""The libp2p endpoint: one host per peer, updates sent over direct streams to topology neighbours.

    key = identity_from_file("peer.key")  # peer_id_of(key) is this peer's name; neighbours need it
    async with open_libp2p_endpoint(key, "/ip4/127.0.0.1/tcp/4001", {neighbour_id: [neighbour_addr]}) as endpoint:
        await endpoint.send(neighbour_id, payload)
        sender, payload = await endpoint.receive()

A peer's name on the network is its peer ID, which Noise authenticates: `receive()` names the sender by
the ID of the connection the bytes came on, never by anything in the payload. A peer accepts streams only
from its neighbours' IDs. The transport moves bytes; the peer decodes them (p2pfed.wire), so nothing here
unpickles or parses what arrives beyond the frame header.

One update is one stream on PROTOCOL_ID carrying one frame:

    magic b"P2PF" | version (1 byte) | body length (8 bytes, big-endian) | body

The receiver checks the length against `max_message_bytes` before reading the body, reads the body whole
(Yamux resets a sender whose receiver stops reading for 5 s), hands it to a bounded inbox and then writes
a 1-byte ack; the sender half-closes after the body and waits for that ack. A send that fails (the
neighbour is gone, refuses, or is too slow) is logged and counted, never raised into the peer's loop.

Facts about py-libp2p 0.8.1 that shape this module (shared/docs/libp2p-notes.md has the measurements):
- A write cut off half-way (after Noise has sealed a message, before the socket took it) can wedge or
  tear down the connection. So nothing that writes on a shared connection is cancelled: opening a stream
  and each ~1 MiB chunk of the body run shielded, the deadline is checked between chunks, and where a
  hard stop had to cut something off anyway the connection is dropped and the next send redials.
- Writes go out in pieces of WRITE_PIECE bytes, so that each Yamux frame fits one Noise message.
- `stream.read(n)` returns what is buffered and ends with StreamEOF; `read_exactly` fails from ~7 MB.
- A refused dial makes libp2p refuse that peer for 60 s, and it dials one address per transport:
  before each dial the neighbour is unblocked and its peerstore addresses replaced by ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as YAMUX_HEADER_SIZE
from multiaddr import Multiaddr

log = logging.getLogger(__name__)

PROTOCOL_ID = TProtocol("/p2pfed/update/1.0.0")
MAGIC = b"P2PF"
FRAME_VERSION = 1
FRAME_HEADER = struct.Struct(">4sBQ")  # magic, version, body length
ACK = b"\x06"

# Yamux cuts a write into frames of up to 64 KiB (header included) and Noise seals at most 65,519
# plaintext bytes per message, so a full Yamux frame goes out as two Noise messages. A write of
# exactly this many bytes makes one Yamux frame that fits one Noise message.
WRITE_PIECE = MAX_PLAINTEXT_LENGTH - YAMUX_HEADER_SIZE  # 65,507 with libp2p 0.8.1
PIECES_PER_CHUNK = 16  # about 1 MiB written, shielded from cancellation, between deadline checks

_SEED_DOMAIN = b"p2pfed/libp2p-identity/v1:"
_KEY_FILE_BYTES = 32


# ---------------------------------------------------------------------------------------------
# Identity


def identity_from_seed(seed: bytes | int) -> KeyPair:
    """A deterministic Ed25519 key pair: the same peer ID on every run and machine.

    `seed` is 32 raw bytes, or an int hashed (with a domain tag) into 32 bytes. Anyone who knows the
    seed has the private key: seeds are for tests and simulations, key files for real deployments.
    """
    if isinstance(seed, bool) or not isinstance(seed, (bytes, int)):
        raise TypeError(f"seed must be 32 bytes or an int, got {type(seed).__name__}")
    if isinstance(seed, int):
        seed = hashlib.sha256(_SEED_DOMAIN + str(seed).encode()).digest()
    if len(seed) != _KEY_FILE_BYTES:
        raise ValueError(f"seed must be exactly {_KEY_FILE_BYTES} bytes, got {len(seed)}")
    return create_new_key_pair(seed)


def identity_from_file(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair whose 32-byte Ed25519 seed is stored at `path`; a new random one is created (0600) if absent."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as file:
            file.write(os.urandom(_KEY_FILE_BYTES))
        log.info("created a new identity key at %s", path)
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("identity key %s is readable by others (mode %o); chmod 600 it", path, mode & 0o777)
    seed = path.read_bytes()
    if len(seed) != _KEY_FILE_BYTES:
        raise ValueError(f"identity key {path} must hold exactly {_KEY_FILE_BYTES} bytes, it holds {len(seed)}")
    return create_new_key_pair(seed)


def peer_id_of(key_pair: KeyPair) -> str:
    """The peer ID (base58) of a key pair: the peer's name on the network."""
    return ID.from_pubkey(key_pair.public_key).to_base58()


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TransportLimits:
    max_message_bytes: int = 256 * 1024 * 1024  # frames declaring a longer body are refused unread
    send_timeout_s: float = 60.0  # one send: dial, open the stream, write, wait for the ack
    receive_timeout_s: float = 60.0  # one inbound frame: header, body and a place in the inbox
    write_stall_s: float = 10.0  # the most one ~1 MiB chunk may take; past it the connection is dropped
    max_concurrent_sends: int = 2  # more streams at once only adds latency and memory
    max_inbound_per_neighbour: int = 2  # frames a neighbour may have in flight to us at once
    inbox_size: int = 32  # received updates waiting for receive(); a full inbox holds back the acks

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_concurrent_sends", "max_inbound_per_neighbour", "inbox_size"):
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


class _SendFailed(Exception):
    """A send to a neighbour did not complete; the message says why."""


def _peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as error:  # base58 raises ValueError; short inputs other things
        raise ValueError(f"{peer_id!r} is not a peer ID: {error}") from error


def _multiaddrs(peer_id: str, addrs: Iterable[str | Multiaddr]) -> list[Multiaddr]:
    """Dialable addresses without a trailing /p2p/<id> (which, if present, must name `peer_id`)."""
    result = []
    for addr in addrs:
        text = str(addr)
        head, sep, tail = text.partition("/p2p/")
        if sep:
            if tail != peer_id:
                raise ValueError(f"address {text} names peer {tail}, not {peer_id}")
            text = head
        result.append(Multiaddr(text))
    return result


# ---------------------------------------------------------------------------------------------
# The endpoint


class Libp2pEndpoint:
    """A peer's view of a libp2p network (the `Endpoint` protocol). Open it with `open_libp2p_endpoint`."""

    def __init__(self, host: IHost, limits: TransportLimits,
                 inbox_send: trio.MemorySendChannel, inbox_receive: trio.MemoryReceiveChannel):
        self.name = host.get_id().to_base58()
        self.bytes_sent = 0  # body bytes written to streams (headers excluded, unacknowledged ones included)
        self.limits = limits
        self._host = host
        self._inbox_send = inbox_send
        self._inbox_receive = inbox_receive
        self._send_slots = trio.Semaphore(limits.max_concurrent_sends)
        self._neighbours: dict[str, NeighbourState] = {}
        self._inbound: dict[str, int] = {}

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
        except (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._failed(to, state, f"{type(error).__name__}: {error}".rstrip(": "))
        except Exception as error:  # whatever libp2p raises, the peer loop carries on
            log.exception("%s: unexpected error sending to %s", self.name, to)
            self._failed(to, state, f"{type(error).__name__}: {error}")
        else:
            state.consecutive_failures = 0

    async def receive(self) -> tuple[str, bytes]:
        return await self._inbox_receive.receive()

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
    def failures(self) -> dict[str, int]:
        """Failed sends per neighbour, in total."""
        return {peer_id: state.failures for peer_id, state in self._neighbours.items()}

    def add_neighbour(self, peer_id: str, addrs: Iterable[str | Multiaddr] = ()) -> None:
        """Accept streams from `peer_id` and send to it at `addrs` (empty: it only dials us)."""
        if peer_id in self._neighbours:
            self.set_neighbour_addrs(peer_id, addrs)
            return
        _peer_id(peer_id)  # validate before anything reaches libp2p
        self._neighbours[peer_id] = NeighbourState(_multiaddrs(peer_id, addrs))
        self._forget_addrs(peer_id)

    def set_neighbour_addrs(self, peer_id: str, addrs: Iterable[str | Multiaddr]) -> None:
        """New addresses for a neighbour (say, restarted on another port): the old ones are forgotten."""
        state = self._neighbours.get(peer_id)
        if state is None:
            raise KeyError(f"{peer_id} is not a neighbour; add_neighbour first")
        state.addrs = _multiaddrs(peer_id, addrs)
        self._forget_addrs(peer_id)

    def remove_neighbour(self, peer_id: str) -> None:
        """Stop accepting from and sending to `peer_id` (an existing connection stays until it idles out)."""
        self._neighbours.pop(peer_id, None)

    def _forget_addrs(self, peer_id: str) -> None:
        # libp2p dials only one address per transport class, so a stale one would shadow the new
        # one; and after all addresses of a peer are refused it refuses that peer for 60 s.
        pid = _peer_id(peer_id)
        self._host.get_peerstore().clear_addrs(pid)
        self._host.get_network().unblock_peer(pid)

    # -- sending ----------------------------------------------------------------------------

    async def _send(self, to: str, state: NeighbourState, payload: bytes, deadline: float) -> None:
        with trio.move_on_at(deadline) as waiting:
            await self._send_slots.acquire()
        if waiting.cancelled_caught:
            raise _SendFailed(f"no send slot free within {self.limits.send_timeout_s:g} s")
        try:
            pid = _peer_id(to)
            if not self._host.get_network().get_connections(pid):
                with trio.move_on_at(deadline) as dialling:  # nothing shared to wedge before we are connected
                    await self._dial(to, pid, state)
                if dialling.cancelled_caught:
                    await self._drop_connection(to)  # in case the cut-off dial got as far as registering it
                    raise trio.TooSlowError
            # Opening a stream writes (multistream-select) on the shared connection: shielded like the body.
            with trio.CancelScope(shield=True, deadline=deadline + self.limits.write_stall_s) as opening:
                stream = await self._host.new_stream(pid, [PROTOCOL_ID])
            if opening.cancelled_caught:
                await self._drop_connection(to)
                raise _SendFailed("opening a stream stalled; dropped the connection")
            try:
                if trio.current_time() >= deadline:
                    raise trio.TooSlowError
                await self._write_frame(to, stream, payload, deadline)
                with trio.move_on_at(deadline) as ack_wait:
                    # Cancelling a read is safe but in the window update it writes once the byte is in
                    # (a rare hit burns a Noise nonce: the neighbour drops the connection, we redial).
                    ack = await _read_upto(stream, 1)
                if ack_wait.cancelled_caught:
                    raise _SendFailed(f"no ack within {self.limits.send_timeout_s:g} s")
                if ack != ACK:
                    raise _SendFailed("the neighbour closed the stream without acknowledging the update")
            except BaseException:
                await _reset(stream)
                raise
        finally:
            self._send_slots.release()

    async def _dial(self, to: str, pid: ID, state: NeighbourState) -> None:
        if not state.addrs:
            raise _SendFailed("not connected and no known address")
        # Dial exactly the addresses we were given (identify may have added others), and retry a
        # neighbour libp2p blocked after an earlier failure: our callers decide when to give up.
        self._forget_addrs(to)
        await self._host.connect(PeerInfo(pid, state.addrs))

    async def _write_frame(self, to: str, stream: INetStream, payload: bytes, deadline: float) -> None:
        header = FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(payload))
        body = memoryview(payload)
        pieces = [header + bytes(body[: WRITE_PIECE - len(header)])]
        pieces += [body[i : i + WRITE_PIECE] for i in range(WRITE_PIECE - len(header), len(body), WRITE_PIECE)]
        for first in range(0, len(pieces), PIECES_PER_CHUNK):
            if first and trio.current_time() >= deadline:
                raise trio.TooSlowError
            await trio.lowlevel.checkpoint()  # an outer cancellation lands here, between chunks
            chunk = pieces[first : first + PIECES_PER_CHUNK]
            # A write cancelled half-way can leave the Noise session wedged: let each chunk finish,
            # unless it takes write_stall_s (the neighbour stopped reading), and then drop the connection.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self.limits.write_stall_s) as scope:
                for piece in chunk:
                    await stream.write(piece)
                    self.bytes_sent += len(piece) - (len(header) if piece is pieces[0] else 0)
                if first + PIECES_PER_CHUNK >= len(pieces):
                    await stream.close()  # half-close: we can still read the ack
            if scope.cancelled_caught:
                await self._drop_connection(to)
                raise _SendFailed(f"a write stalled for {self.limits.write_stall_s:g} s; dropped the connection")

    async def _drop_connection(self, peer_id: str) -> None:
        """Close the connection to `peer_id`: an I/O call cut off half-way may have left it unusable."""
        log.info("%s: dropping the connection to %s", self.name, peer_id)
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                await self._host.disconnect(_peer_id(peer_id))
            except Exception as error:
                log.debug("%s: disconnecting %s failed: %s", self.name, peer_id, error)

    def _failed(self, to: str, state: NeighbourState, reason: str) -> None:
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = reason
        log.warning("%s: send to %s failed (%d in a row): %s", self.name, to, state.consecutive_failures, reason)

    # -- receiving --------------------------------------------------------------------------

    async def _handle_stream(self, stream: INetStream) -> None:
        """libp2p runs this in a task of its own for each inbound stream on PROTOCOL_ID."""
        sender = stream.muxed_conn.peer_id.to_base58()  # authenticated by Noise
        if sender not in self._neighbours:
            log.warning("%s: refused a stream from %s, which is not a neighbour", self.name, sender)
            await _reset(stream)
            return
        if self._inbound.get(sender, 0) >= self.limits.max_inbound_per_neighbour:
            log.warning("%s: refused a stream from %s, which already has %d updates in flight", self.name,
                        sender, self._inbound[sender])
            await _reset(stream)
            return
        try:
            if await self._take_update(sender, stream):
                await stream.write(ACK)
                await stream.close()
            else:
                await _reset(stream)
        except (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            log.warning("%s: stream from %s failed: %s %s", self.name, sender, type(error).__name__, error)
            await _reset(stream)
        except Exception:
            log.exception("%s: unexpected error on a stream from %s", self.name, sender)
            await _reset(stream)

    async def _take_update(self, sender: str, stream: INetStream) -> bool:
        """Read one frame and put its body in the inbox; False (logged) when it was dropped."""
        self._inbound[sender] = self._inbound.get(sender, 0) + 1
        body = None
        try:
            with trio.move_on_after(self.limits.receive_timeout_s):
                body = await self._read_frame(sender, stream)
                if body is None:
                    return False
                await self._inbox_send.send((sender, body))
                return True
            if body is not None:
                log.warning("%s: dropped an update from %s: the inbox stayed full for %g s", self.name, sender,
                            self.limits.receive_timeout_s)
                return False
            log.warning("%s: dropped an update from %s: not read whole within %g s", self.name, sender,
                        self.limits.receive_timeout_s)
            # The cancelled read may have been sending a window update: start afresh.
            await _reset(stream)
            await self._drop_connection(sender)
            return False
        finally:
            self._inbound[sender] -= 1
            if not self._inbound[sender]:
                del self._inbound[sender]

    async def _read_frame(self, sender: str, stream: INetStream) -> bytes | None:
        """The frame's body, or None when it is malformed (logged here)."""
        header = await _read_upto(stream, FRAME_HEADER.size)
        if not header:
            log.info("%s: %s closed a stream without sending anything", self.name, sender)
            return None
        if len(header) < FRAME_HEADER.size:
            log.warning("%s: dropped a truncated frame header (%d of %d bytes) from %s", self.name, len(header),
                        FRAME_HEADER.size, sender)
            return None
        magic, version, length = FRAME_HEADER.unpack(header)
        if magic != MAGIC or version != FRAME_VERSION:
            log.error("%s: dropped a frame from %s: bad magic or version %r (expected %r)", self.name, sender,
                      header[:5], MAGIC + bytes([FRAME_VERSION]))
            return None
        if length > self.limits.max_message_bytes:
            log.error("%s: refused a %d-byte update from %s: over max_message_bytes=%d", self.name, length,
                      sender, self.limits.max_message_bytes)
            return None
        body = await _read_upto(stream, length)
        if len(body) < length:
            log.warning("%s: dropped a truncated update from %s: %d of %d bytes", self.name, sender, len(body),
                        length)
            return None
        return body


async def _read_upto(stream: INetStream, n: int) -> bytes:
    """Up to `n` bytes: fewer only at the end of the stream. (libp2p's read_exactly fails from ~7 MB.)"""
    chunks = []
    got = 0
    while got < n:
        try:
            data = await stream.read(n - got)  # returns what is buffered, about 64 KiB at a time
        except StreamEOF:
            break
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await stream.reset()
        except Exception as error:  # the connection may be gone already
            log.debug("resetting a stream failed: %s", error)


@contextlib.asynccontextmanager
async def open_libp2p_endpoint(
    key_pair: KeyPair,
    listen: str | Sequence[str] = "/ip4/127.0.0.1/tcp/0",
    neighbours: Mapping[str, Iterable[str | Multiaddr]] | None = None,
    limits: TransportLimits = TransportLimits(),
) -> AsyncIterator[Libp2pEndpoint]:
    """Run a libp2p host (Noise, Yamux) listening on `listen` for as long as the block lasts.

    `neighbours` maps each neighbour's peer ID to the addresses to dial it at (may be empty for one
    that dials us). The host is closed on the way out, whatever happens.
    """
    listen_addrs = [Multiaddr(listen)] if isinstance(listen, str) else [Multiaddr(a) for a in listen]
    # One connection per peer: with more allowed, every connect() waits for happy eyeballs (250 ms).
    host = new_host(key_pair=key_pair, connection_config=ConnectionConfig(max_connections_per_peer=1))
    inbox_send, inbox_receive = trio.open_memory_channel(limits.inbox_size)
    endpoint = Libp2pEndpoint(host, limits, inbox_send, inbox_receive)
    for peer_id, addrs in (neighbours or {}).items():
        endpoint.add_neighbour(peer_id, addrs)
    host.set_stream_handler(PROTOCOL_ID, endpoint._handle_stream)
    try:
        async with host.run(listen_addrs):
            try:
                yield endpoint
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await host.close()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await host.close()  # idempotent; covers a failure inside host.run() itself
        inbox_send.close()
        inbox_receive.close()
