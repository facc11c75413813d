"""Bulk transfer over py-libp2p 0.8.1's Noise and Yamux at several times the stock speed, same bytes on the wire.

The stock code spends a bulk transfer in Python framing, not in encryption: every 64 KiB Noise message is
read as a 2-byte length and then a body, in separate socket calls, and copied five or six times; every Yamux
frame (at most 64 KiB) passes five locks, each a trio checkpoint; every read of a stream sends a window
update. The replacements here are confined to what p2pfed creates; other hosts and streams in the process
keep the stock code.

- `security_options(key_pair)`, given to `new_host(sec_opt=...)` (public configuration): Noise only, as
  `NoiseOnlyTransport`. It runs the stock Noise XX handshake, then hands the connection to
  `BatchedNoiseSession`, which reads the socket 1 MiB at a time straight into one buffer, decrypts every
  whole message there into one plaintext buffer (ChaCha20-Poly1305 `decrypt_into`, no copies), and seals a
  write's messages SEAL_BATCH at a time into one buffer per socket write. It takes the two keys and nonce
  counters over from noiseprotocol and leaves noiseprotocol's counters exhausted, so a stray use of the
  stock path fails instead of reusing a nonce. Offering Noise alone also keeps diallers from negotiating
  libp2p's /plaintext/2.0.0, in which they could claim any peer ID. With `admit`, a dialler whose
  authenticated ID it refuses is hung up on right after the handshake, before any session buffer exists;
  with `on_wrong_peer`, a dialled address that answers as another peer is reported (and refused).
- `use_fast_stream(stream)`, for the streams p2pfed opens and accepts, swaps two classes. The stream
  becomes a `FastYamuxStream`: writes go out in Yamux frames of up to LARGE_FRAME bytes instead of 64 KiB
  (never more than the peer's window, the one limit in the Yamux spec), header and payload reach the
  session unjoined, reads hand over the whole receive buffer instead of copying it, and window goes back
  to the sender once a quarter of RECEIVE_WINDOW has been read instead of after every read. The
  connection becomes a `FastYamux`, which takes a frame's payload from the session as it is instead of
  through libp2p's read_exactly (two more copies).

All of it leans on py-libp2p internals (NoiseTransportReadWriter.noise_state and .read_writer, the raw
connection's trio socket, the Yamux connection's write lock, buffers and events, the stream's window
fields), which is why libp2p is pinned to 0.8.1, why each class swap checks the exact stock class first,
and why the tests exchange data both ways between these and stock hosts and check the session against
noiseprotocol's own messages.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Callable

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p.abc import INetStream, IRawConnection, ISecureConn
from libp2p.crypto.keys import KeyPair, PrivateKey
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import (
    MAX_WINDOW_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
    _yamux_data_read_timeout,
)
from noise.constants import MAX_NONCE
from noise.state import CipherState

READ_SIZE = 1 << 20  # bytes asked of the socket at a time
SEAL_BATCH = 4  # Noise messages (64 KiB each) per socket write: the peer opens one batch while we seal the next
LARGE_FRAME = 1 << 20  # Yamux payload per frame written by a FastYamuxStream
RECEIVE_WINDOW = MAX_WINDOW_SIZE  # 16 MiB, go-yamux's largest: what a sender may have unread with us
_LENGTH_BYTES = 2  # Noise message length prefix, big-endian
_TAG_BYTES = 16  # Poly1305 tag
_WINDOW_POLL_S = 0.001  # Yamux has no event for a window update; the stock code polls every 10 ms


# ---------------------------------------------------------------------------------------------
# Noise


class _CipherDirection:
    """ChaCha20-Poly1305 and the nonce counter of one direction, taken over from a noiseprotocol CipherState."""

    def __init__(self, state: CipherState) -> None:
        aead = getattr(state.cipher, "cipher", None)
        if not isinstance(aead, ChaCha20Poly1305) or not isinstance(state.n, int):
            raise TypeError(f"expected a ChaCha20-Poly1305 transport cipher state, got {type(aead).__name__}")
        self._aead = aead
        self._n = state.n
        state.n = MAX_NONCE  # noiseprotocol now refuses to use this key: no nonce is ever used twice

    def _nonce(self) -> bytes:
        if self._n >= MAX_NONCE:
            raise RawConnError("Noise nonces exhausted")
        self._n += 1
        return b"\x00\x00\x00\x00" + (self._n - 1).to_bytes(8, "little")  # as noiseprotocol formats it

    def seal_into(self, plaintext: memoryview | bytes, out: memoryview) -> None:
        self._aead.encrypt_into(self._nonce(), plaintext, None, out)

    def open_into(self, ciphertext: memoryview, out: memoryview) -> None:
        nonce = self._nonce()
        try:
            self._aead.decrypt_into(nonce, ciphertext, None, out)
        except InvalidTag:
            raise RawConnError("a Noise message failed authentication") from None


class BatchedNoiseSession(SecureSession):
    """A Noise transport session that reads and writes many messages per socket call.

    Built from the stock session right after the handshake, before any transport message is read.
    """

    def __init__(self, session: SecureSession) -> None:
        conn = session.conn
        if not isinstance(conn, NoiseTransportReadWriter):
            raise TypeError(f"expected a Noise session, got one over {type(conn).__name__}")
        ciphers = conn.noise_state.noise_protocol
        sealer = _CipherDirection(ciphers.cipher_state_encrypt)
        opener = _CipherDirection(ciphers.cipher_state_decrypt)
        super().__init__(local_peer=session.local_peer, local_private_key=session.local_private_key,
                         remote_peer=session.remote_peer, remote_permanent_pubkey=session.remote_permanent_pubkey,
                         is_initiator=session.is_initiator, conn=conn)
        self._sealer, self._opener = sealer, opener
        self._raw: IRawConnection = conn.read_writer.read_write_closer
        # Received bytes, [0, _wire_end); at most one unfinished message stays between reads. The socket is read
        # into it directly when it is a plain trio TCP socket (the stock path allocates a bytes per read).
        self._wire = bytearray(READ_SIZE)
        self._wire_end = 0
        self._socket = _trio_socket(self._raw)
        self._plain = bytearray(READ_SIZE)  # decrypted bytes not read yet live in [_plain_at, _plain_end)
        self._plain_at = self._plain_end = 0
        self._out = bytearray()  # sealed messages of the write in progress
        self._write_lock = trio.Lock()  # messages must reach the socket in nonce order

    # -- reading

    async def read(self, n: int | None = None) -> bytes:
        """`n` bytes (fewer only at the end of the connection), or with n=None whatever is decrypted (>= 1)."""
        if n == 0:
            return b""
        wanted = 1 if n is None else n
        while self._plain_end - self._plain_at < wanted:
            if not await self._receive():
                if self._plain_end > self._plain_at:
                    break
                raise IncompleteReadError("connection closed", expected_bytes=wanted, received_bytes=self._wire_end)
        available = self._plain_end - self._plain_at
        return self._take(available if n is None else min(n, available))

    def _take(self, n: int) -> bytes:
        with memoryview(self._plain) as plain:
            data = plain[self._plain_at : self._plain_at + n].tobytes()
        self._plain_at += n
        if self._plain_at == self._plain_end:
            self._plain_at = self._plain_end = 0
        return data

    async def _receive(self) -> bool:
        """Add what the socket holds to the wire buffer and decrypt every whole message; False at its end."""
        with memoryview(self._wire) as wire:
            got = await self._receive_into(wire[self._wire_end :])
        if not got:
            return False
        self._wire_end += got
        with memoryview(self._wire) as wire:
            at = 0
            while self._wire_end - at >= _LENGTH_BYTES:
                end = at + _LENGTH_BYTES + int.from_bytes(wire[at : at + _LENGTH_BYTES], "big")
                if end > self._wire_end:
                    break
                self._open(wire[at + _LENGTH_BYTES : end])
                at = end
        if at:  # keep the unfinished message (under 64 KiB) at the front
            self._wire[: self._wire_end - at] = self._wire[at : self._wire_end]
            self._wire_end -= at
        return True

    async def _receive_into(self, room: memoryview) -> int:
        if self._socket is None:
            data = await self._raw.read(len(room))
            room[: len(data)] = data
            return len(data)
        try:
            return await self._socket.recv_into(room)
        except trio.ClosedResourceError:
            return 0  # closed on our side: the end, as the stock stream reports it
        except OSError as error:
            raise RawConnError(f"connection broken: {error}") from error

    def _open(self, ciphertext: memoryview) -> None:
        size = len(ciphertext) - _TAG_BYTES
        if size < 0:
            raise RawConnError("a Noise message shorter than its tag")
        self._make_room(size)
        with memoryview(self._plain) as plain:
            self._opener.open_into(ciphertext, plain[self._plain_end : self._plain_end + size])
        self._plain_end += size

    def _make_room(self, size: int) -> None:
        if len(self._plain) - self._plain_end >= size:
            return
        unread = self._plain_end - self._plain_at
        if self._plain_at:  # move what is unread to the front
            self._plain[:unread] = self._plain[self._plain_at : self._plain_end]
            self._plain_at, self._plain_end = 0, unread
        if len(self._plain) - unread < size:
            self._plain.extend(bytes(max(len(self._plain), unread + size - len(self._plain))))

    # -- writing

    async def write(self, data: bytes) -> None:
        await self.write_parts(data)

    async def write_parts(self, head: bytes, body: bytes | memoryview = b"") -> None:
        """Write head + body, sealed as the stock session would seal them joined, a batch per socket call."""
        pieces = _message_pieces(head, body)
        async with _held(self._write_lock):
            for first in range(0, len(pieces), SEAL_BATCH):
                await self._raw.write(self._seal(pieces[first : first + SEAL_BATCH]))

    def _seal(self, pieces: list[bytes | memoryview]) -> memoryview:
        size = sum(len(piece) for piece in pieces) + len(pieces) * (_LENGTH_BYTES + _TAG_BYTES)
        if len(self._out) < size:
            self._out = bytearray(size)  # replaced, not grown: a bytearray cannot grow while viewed
        out = memoryview(self._out)
        at = 0
        for piece in pieces:
            sealed = len(piece) + _TAG_BYTES
            out[at : at + _LENGTH_BYTES] = sealed.to_bytes(_LENGTH_BYTES, "big")
            self._sealer.seal_into(piece, out[at + _LENGTH_BYTES : at + _LENGTH_BYTES + sealed])
            at += _LENGTH_BYTES + sealed
        return out[:at]


def _trio_socket(raw: IRawConnection) -> trio.socket.SocketType | None:
    """The trio socket under libp2p's RawConnection -> TrioTCPStream -> trio.SocketStream, if that is the stack."""
    stream = getattr(getattr(raw, "stream", None), "stream", None)
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _message_pieces(head: bytes, body: bytes | memoryview) -> list[bytes | memoryview]:
    """The plaintexts of the Noise messages for head + body: the first joins head and the start of body."""
    body = memoryview(body)
    if len(head) > MAX_PLAINTEXT_LENGTH or not len(body):
        whole = memoryview(bytes(head) + body if len(body) else head)
        return [whole[i : i + MAX_PLAINTEXT_LENGTH] for i in range(0, max(len(whole), 1), MAX_PLAINTEXT_LENGTH)]
    first = MAX_PLAINTEXT_LENGTH - len(head)
    return [head + body[:first]] + [body[i : i + MAX_PLAINTEXT_LENGTH]
                                    for i in range(first, len(body), MAX_PLAINTEXT_LENGTH)]


@contextlib.asynccontextmanager
async def _held(lock: trio.Lock) -> AsyncIterator[None]:
    """Hold `lock`; without a trio checkpoint when it is free (the write that follows checkpoints anyway)."""
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()
    try:
        yield
    finally:
        lock.release()


class NotAdmitted(HandshakeFailure):
    """A dialler authenticated as a peer that `admit` refuses."""


class WrongPeer(HandshakeFailure):
    """A dialled address answered, Noise-authenticated, as another peer than the one dialled."""


Admit = Callable[[ID], bool]
WrongPeerReport = Callable[[ID, ID, str], None]  # expected, answered, the address dialled


class NoiseOnlyTransport(NoiseTransport):
    """The stock Noise transport whose sessions are `BatchedNoiseSession`s, with an optional gate on diallers."""

    def __init__(self, key_pair: KeyPair, noise_privkey: PrivateKey, admit: Admit | None = None,
                 on_wrong_peer: WrongPeerReport | None = None) -> None:
        super().__init__(key_pair, noise_privkey=noise_privkey)
        self._admit = admit
        self._on_wrong_peer = on_wrong_peer

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        session = await super().secure_inbound(conn)
        # Noise is the first moment the dialler's ID is known (authenticated); refusing here, before the
        # batched session's two 1 MiB buffers exist, makes a stranger cost a socket and a handshake only.
        # The raised HandshakeFailure ends libp2p's inbound handler, which frees its connection slot too.
        if self._admit is not None and not self._admit(session.remote_peer):
            await conn.close()
            raise NotAdmitted(f"refused {session.remote_peer}: not admitted")
        return _batched(session)

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        if self._on_wrong_peer is None:
            return _batched(await super().secure_outbound(conn, peer_id))
        # The stock check raises with the answering ID only inside its message; check it here instead,
        # so the caller learns which peer answered. (Noise has then sent our own signed ID to that
        # peer, which it would learn from any dial of ours anyway: peer IDs are public names.)
        session = await self.get_pattern().handshake_outbound(conn, None)
        if session.get_remote_peer() != peer_id:
            self._on_wrong_peer(peer_id, session.get_remote_peer(), _address_of(conn))
            await conn.close()
            raise WrongPeer(f"dialled {peer_id}, {session.get_remote_peer()} answered")
        return _batched(session)


def _address_of(conn: IRawConnection) -> str:
    address = conn.get_remote_address() if hasattr(conn, "get_remote_address") else None
    if address is None:
        return "an unknown address"
    host, port = address[0], address[1]
    return f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{port}"


def _batched(session: ISecureConn) -> ISecureConn:
    if not isinstance(session, SecureSession):
        raise TypeError(f"the Noise handshake gave an unexpected {type(session).__name__}")
    return BatchedNoiseSession(session)


def security_options(key_pair: KeyPair, admit: Admit | None = None,
                     on_wrong_peer: WrongPeerReport | None = None) -> dict[TProtocol, ISecureConn]:
    """`new_host(sec_opt=...)`: Noise only, with batched sessions; `admit` (a live check, asked at every
    inbound handshake) decides which authenticated diallers may stay; `on_wrong_peer` hears of dialled
    addresses that answer as another peer."""
    return {NOISE_PROTOCOL_ID: NoiseOnlyTransport(key_pair, create_x25519_key_pair().private_key, admit,
                                                  on_wrong_peer)}


# ---------------------------------------------------------------------------------------------
# Yamux


class FastYamuxStream(YamuxStream):
    """A Yamux stream with large frames out and window returned in batches; see the module docstring."""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            size = await self._reserve(min(LARGE_FRAME, len(view) - sent))
            header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, self.stream_id, size)
            await self._send_frame(header, view[sent : sent + size])
            sent += size

    async def _reserve(self, wanted: int) -> int:
        """Take up to `wanted` bytes of send window, waiting at most 5 s (as stock Yamux) while it is closed.

        No await falls between reading and updating the window, so no lock is needed: trio runs one task
        at a time, and the connection's reader only adds to the window.
        """
        size = self._take_window(wanted)
        if size:
            return size
        with trio.move_on_after(5.0):
            while not size:
                await trio.sleep(_WINDOW_POLL_S)
                size = self._take_window(wanted)
            return size
        raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")

    def _take_window(self, wanted: int) -> int:
        if self.send_closed:
            raise MuxedStreamError("Stream is closed for sending")
        if self.closed:
            raise MuxedStreamError("Stream is closed")
        size = min(self.send_window, wanted)
        self.send_window -= size
        return size

    async def _send_frame(self, header: bytes, payload: memoryview) -> None:
        conn = self.conn
        session = conn.secured_conn
        async with _held(conn._write_lock):  # the connection's frames must not interleave
            if isinstance(session, BatchedNoiseSession):
                await session.write_parts(header, payload)
            else:
                await session.write(header + payload)

    async def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return await super().read(n)  # read-to-end: p2pfed never does
        conn = self.conn
        while True:
            if self.closed or self.recv_closed or self.reset_received or conn.event_shutting_down.is_set():
                data = await conn.read_stream(self.stream_id, n)  # the stock path sorts out ends and resets
                break
            buffer = conn.stream_buffers.get(self.stream_id)
            event = conn.stream_events.get(self.stream_id)
            if buffer is None or event is None:
                data = await conn.read_stream(self.stream_id, n)
                break
            if buffer:
                data = self._take(buffer, n)
                break
            await event.wait()  # the connection's reader sets it when data (or an end) arrives, as in read_stream
            conn.stream_events[self.stream_id] = trio.Event()
        await self._return_window()
        return data

    def _take(self, buffer: bytearray, n: int) -> bytes | bytearray:
        if len(buffer) <= n:  # all of it: hand the buffer over (a bytearray) instead of copying it
            self.conn.stream_buffers[self.stream_id] = bytearray()
            return buffer
        with memoryview(buffer) as view:
            data = view[:n].tobytes()
        del buffer[:n]
        return data

    async def _return_window(self) -> None:
        # Window read but not yet returned: everything granted that neither waits in the buffer nor
        # remains open. At the first read this grows the stock 256 KiB window to RECEIVE_WINDOW.
        unreturned = RECEIVE_WINDOW - self.recv_window - len(self.conn.stream_buffers.get(self.stream_id, b""))
        if unreturned >= RECEIVE_WINDOW // 4:
            self.recv_window += unreturned
            await self.send_window_update(unreturned)


class FastYamux(Yamux):
    """A Yamux connection that reads a frame's payload from the session without copying it twice more."""

    async def _read_data_body(self, length: int) -> bytes:
        # The stock version goes through libp2p's read_exactly, which copies into a bytearray and out again.
        with trio.fail_after(_yamux_data_read_timeout()):
            data = await self.secured_conn.read(length)
        if len(data) < length:
            raise IncompleteReadError(f"connection closed after {len(data)} of {length} bytes of a frame",
                                      expected_bytes=length, received_bytes=len(data))
        return data


def use_fast_stream(stream: INetStream) -> None:
    """Give a stream p2pfed opened or accepted over Yamux, and its connection, the fast paths; other muxers
    are left alone. The connection's reader picks the new class up at its next frame."""
    if type(stream.muxed_stream) is YamuxStream:
        stream.muxed_stream.__class__ = FastYamuxStream
    if type(stream.muxed_conn) is Yamux:
        stream.muxed_conn.__class__ = FastYamux
