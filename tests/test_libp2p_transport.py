"""The libp2p endpoint on loopback: delivery, identities, refusals, malformed frames, dead and restarted neighbours,
buffering bounds, listen addresses. (Strangers: tests/test_strangers.py.)

Every test runs its own trio loop under a time limit and binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.io import NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession
from multiaddr import Multiaddr
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection
from noise.exceptions import NoiseMaxNonceError

from p2pfed.net.fastpath import BatchedNoiseSession
from p2pfed.net.framing import ACK, FRAME_HEADER, FRAME_VERSION, MAGIC, PROTOCOL_ID
from p2pfed.net.identity import identity_from_file, identity_from_seed, peer_id_of
from p2pfed.net.libp2p_endpoint import ListenError, TransportLimits, open_libp2p_endpoint
from p2pfed.net.listening import check_listening

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
LOGGER = "p2pfed.net.libp2p_endpoint"


def run(test, seconds: float = 15.0) -> None:
    async def bounded():
        with trio.fail_after(seconds):
            await test()

    trio.run(bounded)


async def nothing_arrives(endpoint, seconds: float = 0.3) -> bool:
    with trio.move_on_after(seconds):
        await endpoint.receive()
        return False
    return True


def logged_about(caplog, peer_id: str, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= level and peer_id in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# Identity


def test_peer_id_from_a_seed_is_deterministic():
    assert peer_id_of(identity_from_seed(7)) == peer_id_of(identity_from_seed(7))
    assert peer_id_of(identity_from_seed(7)) != peer_id_of(identity_from_seed(8))
    raw = bytes(range(32))
    assert peer_id_of(identity_from_seed(raw)) == peer_id_of(identity_from_seed(raw))
    assert peer_id_of(identity_from_seed(7)).startswith("12D3KooW")  # an Ed25519 peer ID
    with pytest.raises(ValueError):
        identity_from_seed(b"too short")


def test_identity_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "peer.key"
    first = peer_id_of(identity_from_file(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.stat().st_size == 32
    assert peer_id_of(identity_from_file(path)) == first
    path.write_bytes(b"short")
    with pytest.raises(ValueError):
        identity_from_file(path)


# ---------------------------------------------------------------------------------------------
# Delivery


def test_two_endpoints_exchange_both_ways_named_by_peer_id():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
                assert (a.name, b.name) == (a_id, b_id)
                b.set_neighbour_addrs(a_id, a.listen_addrs)
                await a.send(b_id, b"from a")
                assert await b.receive() == (a_id, b"from a")
                await b.send(a_id, b"from b")
                assert await a.receive() == (b_id, b"from b")
                assert (a.bytes_sent, b.bytes_sent) == (6, 6)
                assert a.failures == {b_id: 0} and b.failures == {a_id: 0}
                assert a.online(1) and b.online(3)

    run(main)


def test_ten_megabytes_arrive_intact():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    payload = os.urandom(10_000_000)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
                await a.send(b_id, payload)
                sender, received = await b.receive()
                assert sender == a_id
                assert len(received) == len(payload) and received == payload
                assert a.bytes_sent == len(payload)

    run(main)


# ---------------------------------------------------------------------------------------------
# Refusals and malformed frames


def test_a_non_neighbour_is_hung_up_on_after_noise_and_its_payload_never_arrives(caplog):
    kb, kc = identity_from_seed(2), identity_from_seed(3)
    b_id = peer_id_of(kb)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {}) as b:  # c is not b's neighbour
            async with open_libp2p_endpoint(kc, LOOPBACK, {b_id: b.listen_addrs}) as c:
                await c.send(b_id, b"let me in")  # logs and returns; never raises
                assert c.failures[b_id] == 1
                assert await nothing_arrives(b)
                assert b.strangers_refused >= 1  # at the connection, before any stream
                assert not b._host.get_network().get_connections()
        assert any("send to" in m for m in logged_about(caplog, b_id))

    run(main)


@contextlib.asynccontextmanager
async def raw_client(seed: int, target_id: str, target_addrs: list[str]) -> AsyncIterator:
    """A plain libp2p host connected to the target; it writes frames by hand."""
    host = new_host(key_pair=identity_from_seed(seed), connection_config=ConnectionConfig(max_connections_per_peer=1))
    async with host.run([Multiaddr(LOOPBACK)]):
        try:
            await host.connect(PeerInfo(ID.from_base58(target_id), [Multiaddr(a) for a in target_addrs]))
            yield host
        finally:
            await host.close()


async def send_raw(host, target_id: str, data: bytes) -> bytes:
    """Write `data` on a fresh stream, half-close, and return what came back (b"" for a reset or EOF)."""
    stream = await host.new_stream(ID.from_base58(target_id), [PROTOCOL_ID])
    with contextlib.suppress(StreamReset, StreamEOF):
        await stream.write(data)
        await stream.close()
        return await stream.read(1)
    return b""


def test_malformed_frames_from_a_raw_client_are_logged_and_dropped(caplog):
    kb = identity_from_seed(2)
    b_id = peer_id_of(kb)
    raw_id = peer_id_of(identity_from_seed(9))
    limits = TransportLimits(max_message_bytes=1 << 20)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def header(length: int) -> bytes:
        return FRAME_HEADER.pack(MAGIC, FRAME_VERSION, length)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {raw_id: []}, limits) as b:
            async with raw_client(9, b_id, b.listen_addrs) as raw:
                assert await send_raw(raw, b_id, b"GARBAGE!" * 8) != ACK  # bad magic
                assert await send_raw(raw, b_id, header(1000) + b"x" * 10) != ACK  # EOF inside the body
                assert await send_raw(raw, b_id, header(5)[:7]) != ACK  # EOF inside the header
                assert await send_raw(raw, b_id, header(limits.max_message_bytes + 1)) != ACK  # oversized
                assert await nothing_arrives(b)
                # The endpoint still works: a well-formed frame after all that is delivered and acked.
                assert await send_raw(raw, b_id, header(5) + b"hello") == ACK
                assert await b.receive() == (raw_id, b"hello")
                assert await nothing_arrives(b, 0.1)

        messages = logged_about(caplog, raw_id)
        assert any("bad magic" in m for m in messages)
        assert any("truncated update" in m and "10 of 1000" in m for m in messages)
        assert any("truncated frame header" in m for m in messages)
        assert any("over max_message_bytes" in m for m in messages)

    run(main)


# ---------------------------------------------------------------------------------------------
# Faults


def test_sending_to_a_dead_neighbour_returns_within_the_timeout(caplog):
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    limits = TransportLimits(send_timeout_s=3.0)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            dead_addrs = b.listen_addrs
        async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: dead_addrs}, limits) as a:
            for attempt in (1, 2):  # the second goes past libp2p's 60-second block of a failed peer
                start = trio.current_time()
                await a.send(b_id, b"anyone there?")
                assert trio.current_time() - start < limits.send_timeout_s + 0.5
                assert a.failures[b_id] == attempt
            assert a.neighbours[b_id].consecutive_failures == 2
            assert a.bytes_sent == 0
        assert any("send to" in m for m in logged_about(caplog, b_id))

    run(main)


def test_a_neighbour_that_never_acknowledges_costs_one_send_timeout():
    ka = identity_from_seed(1)
    silent_id = peer_id_of(identity_from_seed(9))
    limits = TransportLimits(send_timeout_s=1.0)

    async def main():
        silent = new_host(key_pair=identity_from_seed(9),
                          connection_config=ConnectionConfig(max_connections_per_peer=1))

        async def never_answer(stream):
            await trio.sleep_forever()

        silent.set_stream_handler(PROTOCOL_ID, never_answer)
        async with silent.run([Multiaddr(LOOPBACK)]):
            try:
                addrs = [str(addr) for addr in silent.get_transport_addrs()]
                async with open_libp2p_endpoint(ka, LOOPBACK, {silent_id: addrs}, limits) as a:
                    start = trio.current_time()
                    await a.send(silent_id, b"x" * 100_000)  # fits the Yamux window: only the ack is missing
                    assert 0.9 < trio.current_time() - start < 2.0
                    assert a.failures[silent_id] == 1
            finally:
                await silent.close()

    run(main)


def test_sends_cut_off_by_the_deadline_or_the_caller_leave_the_connection_usable():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    big = bytes(20_000_000)
    huge = bytes(60_000_000)  # well over 30 ms on loopback, even on an idle machine

    async def small_message_arrives(a, b, attempts: int = 1) -> bool:
        """`a` gets a small message to `b` through (within `attempts` tries) and `b` receives it."""
        failures = a.failures[b_id]
        for _ in range(attempts):
            await a.send(b_id, b"small")
            if a.neighbours[b_id].consecutive_failures == 0:
                break
        while (await b.receive())[1] != b"small":  # skip any big one that made it
            pass
        return a.failures[b_id] - failures < attempts

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs},
                                            TransportLimits(send_timeout_s=0.03)) as hasty:
                b.set_neighbour_addrs(a_id, hasty.listen_addrs)
                await b.send(a_id, b"warm up")  # connected: hasty's deadline goes to its stream and the body
                assert await hasty.receive() == (b_id, b"warm up")
                # Opening hasty's stream may itself take 30 ms on a busy machine: retry until it is open.
                assert await small_message_arrives(hasty, b, attempts=20)
                failures, sent = hasty.failures[b_id], hasty.bytes_sent
                await hasty.send(b_id, huge)  # the deadline passes between chunks
                assert hasty.failures[b_id] == failures + 1 and hasty.bytes_sent - sent < len(huge)
                assert "timed out" in hasty.neighbours[b_id].last_error
                assert hasty.neighbours[b_id].stream is None  # reset: a half-sent frame must not be continued
                await b.send(a_id, b"still connected")  # the same connection, the other way
                assert (await hasty.receive())[1] == b"still connected" and b.failures[a_id] == 0
                assert await small_message_arrives(hasty, b, attempts=20)
            async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
                for cut_ms in (0, 1, 3, 7, 15):  # the first cuts fall in the dial or the stream's opening
                    with trio.move_on_after(cut_ms / 1000):
                        await a.send(b_id, big)
                    assert await small_message_arrives(a, b)

    run(main, 30.0)


# ---------------------------------------------------------------------------------------------
# A kept stream per neighbour


def inbound_streams(endpoint, peer_id: str) -> list:
    """The Yamux streams `peer_id` has open to `endpoint` (reached through libp2p internals, for tests)."""
    connections = endpoint._host.get_network().get_connections(ID.from_base58(peer_id))
    return [stream for conn in connections for stream in conn.muxed_conn.streams.values()
            if not stream.is_initiator]


def test_updates_to_a_neighbour_share_one_kept_stream():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    payloads = [os.urandom(size) for size in (10, 300_000, 3_000_000, 1, 70_000)]

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b, \
                open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
            kept = []
            for payload in payloads:
                await a.send(b_id, payload)
                assert await b.receive() == (a_id, payload)
                kept.append(a.neighbours[b_id].stream)
            assert kept[0] is not None and all(stream is kept[0] for stream in kept)
            assert len(inbound_streams(b, a_id)) == 1
            assert a.failures[b_id] == 0 and a.bytes_sent == sum(map(len, payloads))

    run(main)


def test_a_kept_stream_reset_by_the_neighbour_is_replaced_without_a_failure():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b, \
                open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
            await a.send(b_id, b"first")
            assert await b.receive() == (a_id, b"first")
            first = a.neighbours[b_id].stream
            for stream in inbound_streams(b, a_id):
                await stream.reset()  # as a neighbour does that dropped the stream
            await trio.sleep(0.05)  # the reset reaches a
            await a.send(b_id, b"second")  # the kept stream fails before any byte: sent again on a new one
            assert await b.receive() == (a_id, b"second")
            assert a.failures[b_id] == 0 and a.neighbours[b_id].stream is not first
            assert await nothing_arrives(b, 0.1)  # delivered once

    run(main)


def test_a_kept_stream_to_a_restarted_neighbour_is_replaced():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    limits = TransportLimits(send_timeout_s=3.0)

    async def main():
        async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: []}, limits) as a:
            async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
                a.set_neighbour_addrs(b_id, b.listen_addrs)
                await a.send(b_id, b"before")
                assert await b.receive() == (a_id, b"before")
            async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
                a.set_neighbour_addrs(b_id, b.listen_addrs)
                await a.send(b_id, b"after")  # the kept stream died with the old process
                assert await b.receive() == (a_id, b"after")
                assert a.failures[b_id] == 0

    run(main)


def test_frames_written_back_to_back_on_one_stream_are_each_delivered_and_acked():
    kb = identity_from_seed(2)
    b_id, raw_id = peer_id_of(kb), peer_id_of(identity_from_seed(9))
    bodies = [b"one", os.urandom(200_000), b"three"]

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {raw_id: []}) as b, raw_client(9, b_id, b.listen_addrs) as raw:
            stream = await raw.new_stream(ID.from_base58(b_id), [PROTOCOL_ID])
            # One write with all three frames: the receiver reads past the first frame's end.
            await stream.write(b"".join(FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(body)) + body for body in bodies))
            acks = b""
            while len(acks) < len(bodies):
                acks += await stream.read(len(bodies) - len(acks))
            assert acks == ACK * len(bodies)
            assert [await b.receive() for _ in bodies] == [(raw_id, body) for body in bodies]

    run(main)


# ---------------------------------------------------------------------------------------------
# Stock libp2p peers: the fast Noise session and Yamux streams speak the same protocols


@contextlib.asynccontextmanager
async def stock_host(seed: int, handler=None) -> AsyncIterator:
    """A libp2p host with py-libp2p's default options, listening on loopback."""
    host = new_host(key_pair=identity_from_seed(seed), connection_config=ConnectionConfig(max_connections_per_peer=1))
    if handler is not None:
        host.set_stream_handler(PROTOCOL_ID, handler)
    async with host.run([Multiaddr(LOOPBACK)]):
        try:
            yield host
        finally:
            await host.close()


def test_updates_both_ways_with_a_stock_libp2p_host():
    ka = identity_from_seed(1)
    a_id, stock_id = peer_id_of(ka), peer_id_of(identity_from_seed(9))
    to_stock, from_stock = os.urandom(3_000_000), os.urandom(2_500_000)  # many Noise messages and Yamux frames
    received = []

    async def stock_receiver(stream):
        header = await stream.read(FRAME_HEADER.size)
        length = FRAME_HEADER.unpack(header)[2]
        body = b""
        while len(body) < length:
            body += await stream.read(length - len(body))
        received.append(body)
        await stream.write(ACK)

    async def main():
        async with stock_host(9, stock_receiver) as stock:
            addrs = [str(addr) for addr in stock.get_transport_addrs()]
            async with open_libp2p_endpoint(ka, LOOPBACK, {stock_id: addrs}) as a:
                await a.send(stock_id, to_stock)
                assert a.failures[stock_id] == 0 and received == [to_stock]
                stream = await stock.new_stream(ID.from_base58(a_id), [PROTOCOL_ID])
                await stream.write(FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(from_stock)) + from_stock)
                assert await stream.read(1) == ACK
                assert await a.receive() == (stock_id, from_stock)

    run(main)


def test_a_plaintext_dialler_claiming_a_neighbours_id_is_refused():
    """py-libp2p's default hosts accept /plaintext/2.0.0, where a dialler names itself by any public key it
    knows (an Ed25519 peer ID contains one). The endpoint offers Noise only."""
    kb, neighbour = identity_from_seed(2), identity_from_seed(1)
    neighbour_id = peer_id_of(neighbour)

    class ClaimsTheNeighboursKey(type(neighbour.private_key)):
        def get_public_key(self):
            return neighbour.public_key  # proves nothing: plaintext has no signature

    own = identity_from_seed(66).private_key
    claim = KeyPair(ClaimsTheNeighboursKey(own.impl), neighbour.public_key)

    async def main():
        attacker = new_host(key_pair=identity_from_seed(66), sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(claim)},
                            connection_config=ConnectionConfig(max_connections_per_peer=1))
        async with open_libp2p_endpoint(kb, LOOPBACK, {neighbour_id: []}) as b, \
                attacker.run([Multiaddr(LOOPBACK)]):
            try:
                with pytest.raises(SwarmException):  # no security protocol in common
                    await attacker.connect(PeerInfo(ID.from_base58(b.name), [Multiaddr(a) for a in b.listen_addrs]))
                assert await nothing_arrives(b, 0.1)
            finally:
                await attacker.close()

    run(main)


def test_a_neighbour_restarted_on_a_new_port_is_reached_after_set_neighbour_addrs():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    limits = TransportLimits(send_timeout_s=3.0)

    async def main():
        async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: []}, limits) as a:
            async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: a.listen_addrs}) as b:
                old_addrs = b.listen_addrs
                a.set_neighbour_addrs(b_id, old_addrs)
                await a.send(b_id, b"before")
                assert await b.receive() == (a_id, b"before")
            await a.send(b_id, b"while down")  # fails, and libp2p now blocks b
            assert a.failures[b_id] == 1
            async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: a.listen_addrs}) as b:
                assert b.listen_addrs != old_addrs
                await a.send(b_id, b"to the old port")  # a still dials the stale address
                assert a.failures[b_id] == 2
                a.set_neighbour_addrs(b_id, b.listen_addrs)
                await a.send(b_id, b"after")
                assert await b.receive() == (a_id, b"after")
                assert a.failures[b_id] == 2 and a.neighbours[b_id].consecutive_failures == 0
                assert await nothing_arrives(b, 0.1)

    run(main)


# ---------------------------------------------------------------------------------------------
# The batched Noise session against noiseprotocol's own transport messages, in memory


class MemoryConnection:
    """A raw connection that serves `incoming` in pieces of the sizes in `splits` (cycled) and keeps what is written."""

    def __init__(self, incoming: bytes = b"", splits: tuple[int, ...] = (65536,)):
        self.incoming, self.at, self.splits, self.written = incoming, 0, itertools.cycle(splits), bytearray()

    async def read(self, n: int | None = None) -> bytes:
        size = min(next(self.splits), n or 65536, len(self.incoming) - self.at)
        self.at += size
        return self.incoming[self.at - size : self.at]

    async def write(self, data) -> None:
        self.written += data

    async def close(self) -> None:
        pass

    def get_remote_address(self):
        return None


def noise_pair():
    """Two noiseprotocol states that finished the XX handshake libp2p uses, as initiator and responder."""
    initiator = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    responder = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    initiator.set_as_initiator()
    responder.set_as_responder()
    for state in (initiator, responder):
        state.set_keypair_from_private_bytes(NoiseKeypair.STATIC, os.urandom(32))
        state.start_handshake()
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    responder.read_message(initiator.write_message())
    return initiator, responder


def batched_session(conn: MemoryConnection, state) -> BatchedNoiseSession:
    keys = identity_from_seed(1), identity_from_seed(2)
    stock = SecureSession(local_peer=ID.from_pubkey(keys[0].public_key), local_private_key=keys[0].private_key,
                          remote_peer=ID.from_pubkey(keys[1].public_key), remote_permanent_pubkey=keys[1].public_key,
                          is_initiator=True, conn=NoiseTransportReadWriter(conn, state))
    return BatchedNoiseSession(stock)


MESSAGE_SIZES = (0, 1, 12, 65_519, 65_520, 200_000, 3)  # empty, tiny, exactly one message, one byte over, many


def test_batched_session_reads_stock_noise_messages_split_anywhere():
    plaintexts = [os.urandom(size) for size in MESSAGE_SIZES]
    expected = b"".join(plaintexts)

    async def read_back(splits: tuple[int, ...]) -> None:
        sender_state, receiver_state = noise_pair()  # fresh nonces for every pattern
        wire = MemoryConnection()
        stock = NoiseTransportReadWriter(wire, sender_state)
        for plaintext in plaintexts:
            await stock.write_msg(plaintext)
        session = batched_session(MemoryConnection(bytes(wire.written), splits), receiver_state)
        got = b""
        while len(got) < len(expected):
            got += await session.read(min(100_000, len(expected) - len(got)))
        assert got == expected
        with pytest.raises(IncompleteReadError):  # the end of the connection
            await session.read(1)

    for splits in ((1,), (2, 3), (7, 65_537, 1), (1 << 20,)):  # across length prefixes, tags and messages
        run(functools.partial(read_back, splits))


def test_stock_noise_reads_what_the_batched_session_writes():
    writer_state, reader_state = noise_pair()
    heads_and_bodies = [(os.urandom(12), os.urandom(size)) for size in MESSAGE_SIZES] + [(os.urandom(70_000), b"")]

    async def main():
        wire = MemoryConnection()
        session = batched_session(wire, writer_state)
        for head, body in heads_and_bodies:
            await session.write_parts(head, body)
        await session.write(b"plain write")
        stock = NoiseTransportReadWriter(MemoryConnection(bytes(wire.written), (4096,)), reader_state)
        expected = b"".join(head + body for head, body in heads_and_bodies) + b"plain write"
        got = b""
        while len(got) < len(expected):
            got += await stock.read_msg()
        assert got == expected

    run(main)


def test_batched_session_refuses_a_tampered_message_and_retires_the_stock_nonces():
    sender_state, receiver_state = noise_pair()

    async def main():
        wire = MemoryConnection()
        await NoiseTransportReadWriter(wire, sender_state).write_msg(b"x" * 1000)
        tampered = bytearray(wire.written)
        tampered[500] ^= 1
        session = batched_session(MemoryConnection(bytes(tampered)), receiver_state)
        with pytest.raises(RawConnError, match="authentication"):
            await session.read(1000)
        # The session owns the keys now: the stock path can no longer use (and so reuse) a nonce.
        with pytest.raises(NoiseMaxNonceError):
            receiver_state.encrypt(b"stray")

    run(main)


def test_wait_for_neighbours_returns_once_a_late_neighbour_listens_and_names_one_that_never_does():
    ka, kb, kc = identity_from_seed(11), identity_from_seed(12), identity_from_seed(13)
    b_id, c_id = peer_id_of(kb), peer_id_of(kc)
    from p2pfed.launch import free_ports, loopback_addr

    b_port, c_port = free_ports(2)

    async def main():
        async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: [loopback_addr(b_port)],
                                                       c_id: [loopback_addr(c_port)]}) as a:
            async def start_b_late():
                await trio.sleep(0.5)
                async with open_libp2p_endpoint(kb, loopback_addr(b_port), {peer_id_of(ka): []}):
                    await trio.sleep(5)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(start_b_late)
                started = trio.current_time()
                unreachable = await a.wait_for_neighbours(3.0)
                assert unreachable == [c_id]  # c never listens
                assert trio.current_time() - started < 4.5
                nursery.cancel_scope.cancel()

    run(main)


def test_a_neighbour_restarted_on_a_new_port_that_dials_first_is_reached_on_its_connection():
    """No address update needed: the restarted neighbour sends its update first, and the reply rides its connection."""
    ka, kb = identity_from_seed(21), identity_from_seed(22)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    limits = TransportLimits(send_timeout_s=3.0)

    async def main():
        async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: []}, limits) as a:
            async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: a.listen_addrs}) as b:
                old_addrs = b.listen_addrs
                a.set_neighbour_addrs(b_id, old_addrs)
                await b.send(a_id, b"hello")
                assert await a.receive() == (b_id, b"hello")
            async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: a.listen_addrs}) as b:
                assert b.listen_addrs != old_addrs
                await b.send(a_id, b"back, elsewhere")
                assert await a.receive() == (b_id, b"back, elsewhere")
                await a.send(b_id, b"welcome back")  # a's configured address is stale; the connection is not
                assert await b.receive() == (a_id, b"welcome back")

    run(main)


# ---------------------------------------------------------------------------------------------
# Bytes buffered per neighbour


def frame(body: bytes) -> bytes:
    return FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(body)) + body


def test_a_neighbour_flooding_frames_never_has_more_than_its_budget_buffered():
    kb = identity_from_seed(2)
    b_id, raw_id = peer_id_of(kb), peer_id_of(identity_from_seed(9))
    limits = TransportLimits(max_buffered_bytes_per_neighbour=3_000_000)
    bodies = [bytes([i]) * 1_000_000 for i in range(10)]  # 10 MB: within the 16 MiB Yamux window

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {raw_id: []}, limits) as b, \
                raw_client(9, b_id, b.listen_addrs) as raw:
            stream = await raw.new_stream(ID.from_base58(b_id), [PROTOCOL_ID])
            acks = []

            async def flood_and_count_acks():
                await stream.write(b"".join(frame(body) for body in bodies))  # without waiting for acks
                while len(acks) < len(bodies):
                    acks.append(await stream.read(1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood_and_count_acks)
                most = 0
                with trio.move_on_after(1.5):  # b does not call receive() meanwhile
                    while True:
                        most = max(most, b.buffered.get(raw_id, 0))
                        await trio.sleep(0.005)
                assert most == b.buffered[raw_id] == 3_000_000  # three frames, the fourth waits unread
                assert len(acks) == 3  # ... and unacknowledged
                for body in bodies:  # receive() makes room: the rest follow, in order
                    assert await b.receive() == (raw_id, body)
                    assert b.buffered.get(raw_id, 0) <= 3_000_000
            assert acks == [ACK] * len(bodies) and b.buffered == {}

    run(main)


def test_an_update_bigger_than_the_budget_waits_for_an_empty_buffer_and_one_held_too_long_is_dropped(caplog):
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)
    limits = TransportLimits(max_buffered_bytes_per_neighbour=1_000_000, receive_timeout_s=1.0)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}, limits) as b, \
                open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}, TransportLimits(send_timeout_s=3.0)) as a:
            await a.send(b_id, b"small")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send, b_id, bytes(2_000_000))  # over the budget: waits for "small" to go
                await trio.sleep(0.5)
                assert b.buffered == {a_id: 5}
                assert await b.receive() == (a_id, b"small")
                assert await b.receive() == (a_id, bytes(2_000_000))
            assert a.failures[b_id] == 0
            # Held back past receive_timeout_s (b never calls receive): dropped with one warning, not acked;
            # the reset stream ended before an ack, so a sends it once more on a new stream: dropped again.
            await a.send(b_id, b"kept")
            await a.send(b_id, bytes(1_000_000))
            assert a.failures[b_id] == 1
            assert b.buffered == {a_id: 4}
            assert await b.receive() == (a_id, b"kept")
            assert await nothing_arrives(b, 0.1)
        dropped = [m for m in logged_about(caplog, a_id) if "over its buffer budget" in m]
        assert len(dropped) == 2  # one per try

    run(main)


def test_limits_refuse_a_budget_below_one_byte():
    with pytest.raises(ValueError, match="max_buffered_bytes_per_neighbour"):
        TransportLimits(max_buffered_bytes_per_neighbour=0)


# ---------------------------------------------------------------------------------------------
# Listen addresses and neighbours' identities


def test_a_listen_address_that_cannot_be_bound_is_a_clear_error():
    key = identity_from_seed(1)

    async def cannot_listen_on(addr: str, also: tuple[str, ...] = ()) -> ListenError:
        with pytest.raises(ListenError) as caught:
            async with open_libp2p_endpoint(key, [*also, addr]):
                pytest.fail(f"listening on {addr}")
        assert addr in str(caught.value) and caught.value.address == addr
        return caught.value

    async def main():
        with socket.socket() as plain:  # no SO_REUSEPORT: libp2p's own bind would fail (and be skipped)
            plain.bind(("127.0.0.1", 0))
            plain.listen()
            in_use = f"/ip4/127.0.0.1/tcp/{plain.getsockname()[1]}"
            assert "in use" in str(await cannot_listen_on(in_use))
            assert "in use" in str(await cannot_listen_on(in_use, also=(LOOPBACK,)))  # one bad address of two
        # TEST-NET-3: never on this machine. Only bound (and refused), never sent to.
        assert "not an address of this machine" in str(await cannot_listen_on("/ip4/203.0.113.7/tcp/4001"))
        async with open_libp2p_endpoint(identity_from_seed(2), LOOPBACK) as first:
            # libp2p would bind it too (SO_REUSEPORT) and the kernel would split connections between the two
            assert "in use" in str(await cannot_listen_on(first.listen_addrs[0]))

    run(main)


def test_an_address_libp2p_did_not_start_listening_on_is_an_error():
    """What the bind probe cannot see (a listener taken between the probe and libp2p's bind, another
    transport): libp2p logs the failure at debug level and drops the listener; the endpoint checks."""
    addr = Multiaddr("/ip4/127.0.0.1/tcp/4001")
    with pytest.raises(ListenError, match="/ip4/127.0.0.1/tcp/4001"):
        check_listening(SimpleNamespace(listeners={}), [addr])
    check_listening(SimpleNamespace(listeners={str(addr): SimpleNamespace(get_addrs=lambda: (addr,))}), [addr])


def test_a_neighbour_address_answering_as_another_peer_is_reported_once(caplog):
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    b_id, expected = peer_id_of(kb), peer_id_of(identity_from_seed(3))
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {}) as b, \
                open_libp2p_endpoint(ka, LOOPBACK, {expected: b.listen_addrs}, TransportLimits(send_timeout_s=2.0)) as a:
            for _ in range(3):
                await a.send(expected, b"for the expected peer")
            assert await a.wait_for_neighbours(1.0) == [expected]  # retried every 0.25 s
            assert a.failures[expected] == 3
            assert await nothing_arrives(b, 0.1)
            reports = [m for m in logged_about(caplog, expected) if b_id in m]
            assert len(reports) == 1
            assert b.listen_addrs[0] in reports[0]

    run(main)


# ---------------------------------------------------------------------------------------------
# One update to many neighbours


def test_send_many_reaches_a_neighbour_while_another_has_not_acknowledged_yet():
    """Concurrent, not one after another: b gets its update while the silent neighbour listed first still
    holds its send (a sequential loop would reach b only after that send's timeout)."""
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id, silent_id = peer_id_of(ka), peer_id_of(kb), peer_id_of(identity_from_seed(9))

    async def never_answer(stream):
        await trio.sleep_forever()

    async def main():
        async with stock_host(9, never_answer) as silent, open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            silent_addrs = [str(addr) for addr in silent.get_transport_addrs()]
            async with open_libp2p_endpoint(ka, LOOPBACK, {silent_id: silent_addrs, b_id: b.listen_addrs},
                                            TransportLimits(send_timeout_s=3.0)) as a:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.send_many, [silent_id, b_id], b"round 1")
                    assert await b.receive() == (a_id, b"round 1")
                    assert a.failures[silent_id] == 0  # its send is still waiting for the ack
                assert a.failures == {silent_id: 1, b_id: 0}  # then timed out
                assert await nothing_arrives(b, 0.1)

    run(main)


def test_the_in_memory_send_many_sends_in_the_given_order():
    from p2pfed.config import NetworkConfig
    from p2pfed.net.memory import InMemoryNetwork

    async def main():
        network = InMemoryNetwork(NetworkConfig(), seed=0)
        sender, receivers = network.endpoint("p0"), [network.endpoint(f"p{i}") for i in (3, 1, 2)]
        await sender.send_many(["p3", "p1", "p2", "p3"], b"x")
        assert list(sender.sent_count.items()) == [("p3", 2), ("p1", 1), ("p2", 1)]  # numbered in that order
        assert [r.inbox_receive.statistics().current_buffer_used for r in receivers] == [2, 1, 1]

    run(main)
