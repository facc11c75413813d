"""The libp2p endpoint on loopback: delivery, identities, refusals, malformed frames, dead and restarted neighbours.

Every test runs its own trio loop under a time limit and binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator

import pytest
import trio
from libp2p import new_host
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pfed.libp2p_transport import (
    ACK,
    FRAME_HEADER,
    FRAME_VERSION,
    MAGIC,
    PROTOCOL_ID,
    TransportLimits,
    identity_from_file,
    identity_from_seed,
    open_libp2p_endpoint,
    peer_id_of,
)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
LOGGER = "p2pfed.libp2p_transport"


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


def test_a_non_neighbour_is_refused_and_its_payload_never_arrives(caplog):
    kb, kc = identity_from_seed(2), identity_from_seed(3)
    b_id, c_id = peer_id_of(kb), peer_id_of(kc)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {}) as b:  # c is not b's neighbour
            async with open_libp2p_endpoint(kc, LOOPBACK, {b_id: b.listen_addrs}) as c:
                await c.send(b_id, b"let me in")  # logs and returns; never raises
                assert c.failures[b_id] == 1
                assert await nothing_arrives(b)
        assert any("not a neighbour" in m for m in logged_about(caplog, c_id))

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
        assert any("over max_message_bytes" in m for m in logged_about(caplog, raw_id, logging.ERROR))

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

    async def small_message_arrives(a, b) -> bool:
        failures = a.failures[b_id]
        await a.send(b_id, b"small")
        while (await b.receive())[1] != b"small":  # skip any big one that made it
            pass
        return a.failures[b_id] == failures

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs},
                                            TransportLimits(send_timeout_s=0.05)) as hasty:
                b.set_neighbour_addrs(a_id, hasty.listen_addrs)
                await b.send(a_id, b"warm up")  # connected: hasty's deadline goes to the body alone
                assert await hasty.receive() == (b_id, b"warm up")
                await hasty.send(b_id, big)  # 20 MB take longer than 50 ms: the deadline passes between chunks
                assert hasty.failures[b_id] == 1 and hasty.bytes_sent < len(big)
                assert "timed out" in hasty.neighbours[b_id].last_error
                assert await small_message_arrives(hasty, b)
            async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
                for cut_ms in (0, 1, 3, 7, 15):  # the first cuts fall in the dial or the stream's opening
                    with trio.move_on_after(cut_ms / 1000):
                        await a.send(b_id, big)
                    assert await small_message_arrives(a, b)

    run(main, 20.0)


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
