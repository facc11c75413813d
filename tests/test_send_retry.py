"""A send whose stream ends before the ack is sent once more on a new stream: a receiver that resets a fresh
stream half-way through a frame, drops the connection under it, or closes the kept stream between two
updates loses nothing; a receiver that keeps failing costs one failure and exactly two tries.

Every test runs its own trio loop under a time limit and binds 127.0.0.1 only.
"""

from __future__ import annotations

import logging

from p2pfed.net.framing import reset_stream
from p2pfed.net.identity import identity_from_seed, peer_id_of
from p2pfed.net.libp2p_endpoint import TransportLimits, open_libp2p_endpoint
from tests.test_libp2p_transport import LOOPBACK, nothing_arrives, run

LIMITS = TransportLimits(send_timeout_s=5.0)
PAYLOAD = bytes(range(256)) * 400  # 100 KB: more than the first piece, so a cut falls inside the frame


def failing_frames(receiver, how: str, frames: set[int]):
    """Make `receiver` fail the frames numbered in `frames` (counted from 1 across streams) after reading part of
    them: "reset" resets the stream, "disconnect" drops the whole connection. Returns the list of frame numbers
    seen so far."""
    seen: list[int] = []
    take_update = receiver._inbound._take_update

    async def flaky(sender, stream, start):
        seen.append(len(seen) + 1)
        if seen[-1] not in frames:
            return await take_update(sender, stream, start)
        # `start` holds the header and the first 64 KiB of the body: the frame is cut off half-way.
        if how == "disconnect":
            await receiver._drop_connection(sender)
        else:
            await reset_stream(stream)
        return None  # dropped, as the receive side drops a frame it cannot take

    receiver._inbound._take_update = flaky
    return seen


def pair(test):
    """Run `test(a, b, a_id, b_id)` with a able to send to b."""
    ka, kb = identity_from_seed(31), identity_from_seed(32)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)

    async def main():
        async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}) as b, \
                open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}, LIMITS) as a:
            await test(a, b, a_id, b_id)

    run(main)


def test_a_fresh_stream_reset_half_way_through_the_first_frame_is_retried_and_the_update_arrives(caplog):
    caplog.set_level(logging.INFO, logger="p2pfed.net.libp2p_endpoint")

    async def test(a, b, a_id, b_id):
        seen = failing_frames(b, "reset", {1})
        await a.send(b_id, PAYLOAD)  # the first stream a opens to b
        assert await b.receive() == (a_id, PAYLOAD)
        assert seen == [1, 2] and a.failures[b_id] == 0
        assert await nothing_arrives(b, 0.1)  # delivered once
        assert any("sending again on a new one" in r.getMessage() for r in caplog.records)

    pair(test)


def test_a_connection_dropped_under_a_fresh_stream_is_redialled_and_the_update_arrives():
    async def test(a, b, a_id, b_id):
        seen = failing_frames(b, "disconnect", {1})
        await a.send(b_id, PAYLOAD)
        assert await b.receive() == (a_id, PAYLOAD)
        assert seen == [1, 2] and a.failures[b_id] == 0

    pair(test)


def test_a_kept_stream_the_receiver_fails_on_the_next_update_is_replaced_and_both_updates_arrive():
    async def test(a, b, a_id, b_id):
        seen = failing_frames(b, "reset", {2})
        await a.send(b_id, b"round 1")
        assert await b.receive() == (a_id, b"round 1")
        kept = a.neighbours[b_id].stream
        await a.send(b_id, PAYLOAD)  # written whole on the kept stream, which b resets before the ack
        assert await b.receive() == (a_id, PAYLOAD)
        assert seen == [1, 2, 3] and a.failures[b_id] == 0 and a.neighbours[b_id].stream is not kept

    pair(test)


def test_a_receiver_that_keeps_failing_costs_two_tries_and_one_failure():
    async def test(a, b, a_id, b_id):
        seen = failing_frames(b, "reset", {1, 2, 3})
        await a.send(b_id, PAYLOAD)
        assert seen == [1, 2]  # one retry, not more
        assert a.failures[b_id] == 1 and a.neighbours[b_id].stream is None
        assert await nothing_arrives(b, 0.1)
        await a.send(b_id, b"later")  # the next send starts afresh: its first try fails, the retry gets through
        assert await b.receive() == (a_id, b"later")
        assert a.neighbours[b_id].consecutive_failures == 0

    pair(test)
