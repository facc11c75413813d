"""Membership mode under attack: what a stranger or a misbehaving member can send, and what it may cost a member
(docs/libp2p.md, Membership: bounds). Each test fails without the bound it names."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import trio

from p2pfed.net.identity import identity_from_seed, parse_peer_id, peer_id_of
from p2pfed.net.member_gate import (MAX_SERVING, PER_MEMBER, STRANGER_EXCHANGES, STRANGER_GRACE_S, STRANGER_SLOTS,
                                    StrangerGate)
from p2pfed.net.member_records import (DOMAIN, MemberRecord, MembershipError, SignedRecord, check_addrs,
                                       sign_record, verify)
from p2pfed.net.member_serving import close_overstayed
from tests.test_membership import IDS, KEYS, record, settings, signed, view, with_members


def signed_anyway(key, rec: MemberRecord) -> SignedRecord:
    """`rec` signed by `key` without sign_record's checks: what an attacker's own code would send."""
    return SignedRecord(rec, key.public_key.to_bytes(), key.private_key.sign(DOMAIN + rec.body()))


async def open_stranger(stack, members, index: int = 5, name: str = "peer5"):
    """A would-be member with KEYS[index], not joined: its Membership, opened."""
    from p2pfed.net.libp2p_endpoint import open_libp2p_endpoint
    from p2pfed.net.membership import Membership

    endpoint = await stack.enter_async_context(open_libp2p_endpoint(KEYS[index], "/ip4/127.0.0.1/tcp/0"))
    stranger = Membership(settings(index, members[0].settings.bootstrap, name=name), KEYS[index], endpoint,
                          lambda: 0)
    stranger.open()
    return stranger


# -- records: what members would dial ----------------------------------------------------------

@pytest.mark.parametrize("addr, message", [
    ("not-a-multiaddr", "not /ip4 or /ip6"),
    ("/ip4/1.2.3.4/tcp/0", "not /ip4 or /ip6"),
    ("/dns4/example.com/tcp/4001", "not /ip4 or /ip6"),  # a name every member would resolve
    ("/ip4/1.2.3.4/udp/4001/quic", "not /ip4 or /ip6"),
    (f"/ip4/1.2.3.4/tcp/4001/p2p/{IDS[2]}", "names another peer"),
])
def test_a_record_with_an_address_members_cannot_or_should_not_dial_is_refused(addr, message):
    bad = signed_anyway(KEYS[1], dataclasses.replace(record(1), addrs=(addr,)))
    with pytest.raises(MembershipError, match=message):
        verify(bad.wire())
    with pytest.raises(MembershipError, match=message):
        sign_record(KEYS[1], bad.record)
    check_addrs(dataclasses.replace(record(1), addrs=(f"/ip6/::1/tcp/4001/p2p/{IDS[1]}",)))


def test_a_stranger_whose_record_lists_an_address_that_does_not_parse_cannot_crash_a_member():
    # Before: the record was taken, and adding its peer as the endpoint's neighbour raised inside libp2p's
    # stream handler, which ended the member's whole host.
    async def body(stack, members):
        stranger = await open_stranger(stack, members)
        bad = dataclasses.replace(stranger.own, addrs=("not-a-multiaddr",), seq=stranger.own.seq + 1)
        stranger.view.set_own(signed_anyway(KEYS[5], bad), trio.current_time())
        with pytest.raises(Exception):
            await stranger.exchange(IDS[0], members[0].own.addrs, "sync")
        assert IDS[5] not in members[0].view.records
        await members[1].exchange(IDS[0], members[0].own.addrs, "sync")  # the member still answers
    with_members(2, body, joined=2, expected=2)


def test_a_strangers_first_message_introduces_itself_only():
    # Before: a stranger's sync carried records of keys made for the purpose, and every one was taken: one
    # connection held every free name of the swarm.
    fakes = [identity_from_seed(3000 + i) for i in range(3)]

    async def body(stack, members):
        stranger = await open_stranger(stack, members)
        extra = [sign_record(key, dataclasses.replace(record(0, name=f"peer{2 + i}", peer_id=peer_id_of(key))))
                 for i, key in enumerate(fakes)]
        stranger._outgoing = lambda kind: [stranger.view.records[IDS[5]], *extra]
        await stranger.exchange(IDS[0], members[0].own.addrs, "sync")
        assert IDS[5] in members[0].view.records
        assert not {peer_id_of(key) for key in fakes} & set(members[0].view.records)
    with_members(1, body, joined=1, expected=1)


# -- what a stranger may cost a member -----------------------------------------------------------

def test_a_stranger_holding_streams_open_takes_no_members_exchange_slot():
    # Before: four streams from one admitted stranger, each sending nothing for 5 s, held all four slots, and
    # every member's exchange meanwhile was reset.
    from libp2p.peer.peerinfo import PeerInfo

    from p2pfed.net.identity import dial_addrs
    from p2pfed.net.member_streams import MEMBERS_PROTOCOL

    async def body(stack, members):
        stranger = await open_stranger(stack, members)
        host, target = stranger.endpoint.host, parse_peer_id(IDS[0])
        await host.connect(PeerInfo(target, dial_addrs(IDS[0], members[0].own.addrs)))
        streams = []
        for _ in range(MAX_SERVING + 2):
            try:
                streams.append(await host.new_stream(target, [MEMBERS_PROTOCOL]))
            except Exception:  # reset by the member: it serves a stranger one exchange at a time
                pass
        await trio.sleep(0.2)  # the member's handlers have run: one waits for a message, the rest were reset
        assert streams and members[0].gate.strangers_serving == {IDS[5]: 1}
        await members[1].exchange(IDS[0], members[0].own.addrs, "sync")
        for stream in streams:
            await stream.reset()
    with_members(2, body, joined=2, expected=2)


def test_the_gate_gives_strangers_a_few_exchanges_and_slots_of_their_own():
    gate, now = StrangerGate(), 100.0
    assert gate.admit("s1", now)
    for _ in range(STRANGER_EXCHANGES):
        assert gate.start("s1", member=False, now=now) is None
        assert gate.start("s1", member=False, now=now) is not None  # one at a time
        gate.finish("s1", member=False)
    assert "used up" in gate.start("s1", member=False, now=now)
    for i in range(STRANGER_SLOTS):
        assert gate.start(f"t{i}", member=False, now=now) is None
    assert "non-members" in gate.start("t9", member=False, now=now)
    for i in range(MAX_SERVING):  # the members' slots are all free still
        assert gate.start(f"m{i // PER_MEMBER}", member=True, now=now) is None
    assert gate.start("m9", member=True, now=now) is not None
    assert gate.overstayed(now + STRANGER_GRACE_S / 2) == []
    assert set(gate.overstayed(now + STRANGER_GRACE_S + 1)) == {"s1", "t0", "t1", "t9"} and not gate.admitted


def test_a_strangers_connection_is_closed_after_the_grace_period_unless_it_became_a_member():
    # Before: an admitted stranger kept its connection for good; at one a second, strangers filled py-libp2p's
    # 250 inbound connection slots within minutes and newcomers could no longer connect.
    from libp2p.peer.peerinfo import PeerInfo

    from p2pfed.net.identity import dial_addrs

    async def body(stack, members):
        strangers = [await open_stranger(stack, members, i, f"peer{i}") for i in (4, 5)]
        for stranger in strangers:
            await stranger.endpoint.host.connect(PeerInfo(parse_peer_id(IDS[0]),
                                                          dial_addrs(IDS[0], members[0].own.addrs)))
        await strangers[1].exchange(IDS[0], members[0].own.addrs, "sync")  # peer5 becomes a member
        assert members[0].endpoint.connected(IDS[4]) and IDS[5] in members[0].view.records
        for admission in members[0].gate.admitted.values():
            admission.since -= STRANGER_GRACE_S + 1
        await close_overstayed(members[0])
        await trio.sleep(0.2)
        assert not members[0].endpoint.connected(IDS[4]) and members[0].endpoint.connected(IDS[5])
    with_members(1, body, joined=1, expected=1)


# -- what a member may cost another --------------------------------------------------------------

def test_a_member_that_never_answers_is_redialled_after_a_growing_wait_and_dials_run_at_once():
    # Before: every unsynced member was dialled in turn every second: a record listing another host's address
    # made every member dial that host every second, and each silent member cost a 5-s timeout in turn.
    phantoms = [identity_from_seed(4000 + i) for i in range(3)]

    async def body(stack, members):
        member = members[0]
        for i, key in enumerate(phantoms):
            phantom = MemberRecord("lab", peer_id_of(key), f"peer{3 + i}", ("/ip4/127.0.0.1/tcp/9",), 1, None, 5)
            member.take(IDS[1], [sign_record(key, phantom).wire()])
        events = []

        async def exchange(peer_id, addrs, kind):
            events.append(("start", peer_id))
            await trio.sleep(0.1)
            events.append(("end", peer_id))
            raise OSError("no answer")
        member.exchange = exchange
        member.known_since = dict.fromkeys(member.known_since, 0.0)  # no DIAL_WAIT_S
        await member._sync_unsynced()
        assert [e[0] for e in events] == ["start"] * 3 + ["end"] * 3  # at once, not in turn
        await member._sync_unsynced()
        assert len(events) == 6  # not again within a second
        waits = {pid: wait for pid, (_, wait) in member.retry_at.items()}
        assert waits == {peer_id_of(key): 1.0 for key in phantoms}
    with_members(1, body, joined=1, expected=1)


def test_a_member_that_left_leaves_no_state_behind():
    async def body(stack, members):
        member, gone = members[0], IDS[1]
        member.rounds_heard[gone], member.errors[gone], member.retry_at[gone] = 3, "refused", (0.0, 1.0)
        member.leaving.add(gone)
        member.expire(trio.current_time() + 1000)
        assert gone not in {**member.rounds_heard, **member.errors, **member.retry_at, **member.known_since}
        assert gone not in member.leaving and gone not in member.view.records
    with_members(2, body, joined=2, expected=2)


def test_a_message_with_more_records_than_twice_the_swarm_is_refused_whole():
    async def body(stack, members):
        with pytest.raises(MembershipError, match="over twice"):
            members[0].take(IDS[1], [signed(1)] * (2 * members[0].settings.num_peers + 1))
    with_members(1, body)


# -- the view ---------------------------------------------------------------------------------------

def test_a_record_that_cannot_be_taken_is_refused_before_its_signature_is_checked():
    v = view()
    v.offer(signed(1), 1.0)
    body, key, signature = signed(2, name="peer1")
    with pytest.raises(MembershipError, match="which .* holds"):  # not "does not verify": no check was made
        v.offer([body, key, bytes(64)], 1.0)


def test_a_name_freed_by_a_newer_record_under_another_name_can_be_taken():
    v = view()
    v.offer(signed(1), 1.0)
    v.offer(signed(1, name="peer4", seq=2), 1.0)
    assert v.holder("peer1") is None and v.holder("peer4") == IDS[1]
    assert v.offer(signed(2, name="peer1"), 1.0) is not None


def test_refusals_are_logged_again_once_the_set_of_logged_ones_is_full():
    v = view(num_peers=2)
    for i in range(8):
        assert v.note_refused(f"junk{i}", "flood")
    assert v.note_refused(IDS[1], "a real one")  # before: a full set silenced every refusal after it
    assert not v.note_refused(IDS[1], "a real one")


def test_a_record_body_must_be_canonical_fields_of_the_right_types():
    body = msgpack.packb(["lab", IDS[1], "peer1", ["/ip4/127.0.0.1/tcp/1"], 1.5, 0, 1], use_bin_type=True)
    with pytest.raises(MembershipError, match="join round"):
        verify([body, KEYS[1].public_key.to_bytes(), KEYS[1].private_key.sign(DOMAIN + body)])


def test_a_message_of_many_refused_records_is_one_log_line_and_one_exchange_at_a_time_per_member(caplog):
    fakes = [identity_from_seed(5000 + i) for i in range(5)]

    async def body(stack, members):
        member = members[0]
        junk = [sign_record(key, dataclasses.replace(record(0, name="peer1", peer_id=peer_id_of(key))))
                for key in fakes]  # each claims peer1, which members[1] holds
        with caplog.at_level("WARNING", logger="p2pfed.net.membership"):
            member.take(IDS[1], [j.wire() for j in junk])
        assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == [
            f"peer0: refused 5 membership record(s) from {IDS[1]}: {peer_id_of(fakes[0])} claims peer1, "
            f"which {IDS[1]} holds"]
        calls = []

        async def exchange(peer_id, addrs, kind):
            calls.append(kind)
            await trio.sleep(0.1)
        member.exchange = exchange
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member._try, IDS[1], (), "sync")
            nursery.start_soon(member._try, IDS[1], (), "sync")
        assert calls == ["sync"]
    with_members(2, body, joined=2, expected=2)


def test_a_swarm_member_must_listen_where_members_may_dial_it():
    # Its record lists its listen addresses, and members take TCP over /ip4 or /ip6 only: any other address is
    # a configuration error at start rather than a record nobody takes.
    from p2pfed.config import ConfigError, PeerConfig
    from p2pfed.peer_addresses import check_addresses

    config = PeerConfig(swarm="lab", listen=("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/4001/quic"))
    with pytest.raises(ConfigError, match=r"listen\[1\]: .* /ip4 or /ip6 with /tcp/PORT"):
        check_addresses(config, IDS[0])
    check_addresses(dataclasses.replace(config, swarm="", listen=config.listen), IDS[0])  # no swarm: no rule
