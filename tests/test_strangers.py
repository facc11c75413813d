"""Strangers (peers that are not neighbours) get nothing: hung up on right after Noise, at a bounded cost,
and never locking a neighbour out of py-libp2p's inbound connection slots.

Every test runs its own trio loop under a time limit and binds 127.0.0.1 only.
"""

from __future__ import annotations

import os

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pfed.net.framing import PROTOCOL_ID
from p2pfed.net.identity import identity_from_seed, peer_id_of
from p2pfed.net.libp2p_endpoint import open_libp2p_endpoint
from p2pfed.net.stranger import dial_strangers

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def run(test, seconds: float = 30.0) -> None:
    async def bounded():
        with trio.fail_after(seconds):
            await test()

    trio.run(bounded)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def inbound_slots_taken(endpoint) -> int:
    return int(endpoint._host.get_network()._inbound_limiter.borrowed_tokens)


async def slots_settle(endpoint, seconds: float = 3.0) -> int:
    """Inbound slots still taken once closing connections have been noticed (within `seconds`)."""
    with trio.move_on_after(seconds):
        while inbound_slots_taken(endpoint):
            await trio.sleep(0.02)
    return inbound_slots_taken(endpoint)


def test_three_hundred_strangers_leave_a_neighbour_able_to_deliver_at_a_bounded_cost():
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            target, addr = ID.from_base58(b_id), b.listen_addrs[0]
            assert await dial_strangers(addr, target, 20) == {"hung up after Noise": 20}  # warm-up: first-use costs
            before = rss_bytes()
            # py-libp2p 0.8.1 alone would have taken all 250 inbound slots for good by the 250th, and
            # kept ~2 MB per stranger (its session buffers) for the host's life.
            assert await dial_strangers(addr, target, 300) == {"hung up after Noise": 300}
            grown = rss_bytes() - before
            assert grown < 30_000_000, f"RSS grew {grown / 1e6:.1f} MB for 300 strangers"
            assert b.strangers_refused == 320
            assert not b._host.get_network().get_connections()
            assert await slots_settle(b) == 0
            async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
                b.set_neighbour_addrs(a_id, a.listen_addrs)
                await a.send(b_id, b"still welcome")
                assert await b.receive() == (a_id, b"still welcome")
                await b.send(a_id, b"and answered")
                assert await a.receive() == (b_id, b"and answered")
                assert a.failures == {b_id: 0} and b.failures == {a_id: 0}

    run(main, 60.0)


def test_a_strangers_connection_and_stream_are_refused():
    kb = identity_from_seed(2)
    b_id = peer_id_of(kb)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {}) as b:
            host = new_host(key_pair=create_new_key_pair(),
                            connection_config=ConnectionConfig(max_connections_per_peer=1))
            async with host.run([Multiaddr(LOOPBACK)]):
                try:
                    target = ID.from_base58(b_id)
                    with pytest.raises(SwarmException):
                        await host.connect(PeerInfo(target, [Multiaddr(a) for a in b.listen_addrs]))
                    host.get_peerstore().add_addrs(target, [Multiaddr(a) for a in b.listen_addrs], 60)
                    with pytest.raises(SwarmException):  # new_stream dials again: refused again
                        await host.new_stream(target, [PROTOCOL_ID])
                finally:
                    await host.close()
            with trio.move_on_after(0.3):
                await b.receive()
                pytest.fail("a stranger's payload arrived")
            assert b.strangers_refused >= 1
            assert not b._host.get_network().get_connections()

    run(main)


def test_a_neighbour_that_reconnects_more_often_than_libp2p_has_inbound_slots_is_never_locked_out():
    """py-libp2p 0.8.1 gives a connection's inbound slot back only when the whole host stops: after
    max_connections - min_connections (250) inbound connections in a host's life it accepts none.
    Here the host has 3 slots and a neighbour connects 6 times, one connection after another."""
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b:
            b._host.get_network()._inbound_limiter = trio.CapacityLimiter(3)  # as if 247 were taken already
            for attempt in range(6):
                async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}) as a:
                    await a.send(b_id, b"round %d" % attempt)
                    assert await b.receive() == (a_id, b"round %d" % attempt)
                    assert a.failures == {b_id: 0}
                    assert inbound_slots_taken(b) == 1  # the open connection holds its slot
                assert await slots_settle(b) == 0  # ... and gives it back once closed

    run(main)
