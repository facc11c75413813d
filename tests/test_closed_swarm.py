"""A closed swarm (the peer file's `members` table, which `p2pfed init --swarm` writes): strangers get no name, no
admission and no answer, and nobody takes another member's name, online or not (docs/libp2p.md, Membership:
bounds). Each test fails without the table's check it names."""

from __future__ import annotations

import contextlib

import pytest
import trio

from p2pfed.config import ConfigError, PeerConfig
from p2pfed.net.member_gate import STRANGER_BURST
from p2pfed.net.member_records import MembershipError, sign_record
from p2pfed.net.member_view import MemberView
from tests.test_membership import IDS, KEYS, record, settings, signed

TABLE = {f"peer{i}": IDS[i] for i in range(4)}  # peers 0-3 listed; KEYS[5] is the squatter's own fresh key


def closed_view(own: int = 0) -> MemberView:
    v = MemberView("lab", IDS[own], 6, 10.0, allowed=dict(TABLE))
    v.set_own(sign_record(KEYS[own], record(own)), 0.0)
    return v


def test_a_closed_view_refuses_a_squatters_signed_record_for_a_free_name_and_takes_the_listed_one():
    v = closed_view()
    with pytest.raises(MembershipError, match="closed swarm's members table gives to"):
        v.offer(signed(5, name="peer3"), 1.0)  # validly signed with its own key, for a name nobody holds
    with pytest.raises(MembershipError, match="gives to nobody"):
        v.offer(signed(5, name="peer5"), 1.0)  # a name below num_peers that the table leaves out
    # A listed member cannot take another's name while that one is offline (in an open swarm it could).
    with pytest.raises(MembershipError, match=f"gives to {IDS[3]}"):
        v.offer(signed(2, name="peer3"), 1.0)
    assert v.holder("peer3") is None and IDS[5] not in v.records
    assert v.offer(signed(3), 1.0) is not None and v.holder("peer3") == IDS[3]
    assert v.listed(IDS[3]) and not v.listed(IDS[5])
    open_view = MemberView("lab", IDS[0], 6, 10.0)
    assert open_view.listed(IDS[5]) and open_view.offer(signed(5, name="peer3"), 1.0) is not None


def test_a_closed_views_refusal_costs_no_signature_check(monkeypatch):
    import p2pfed.net.member_view as member_view

    def no_check(raw):
        raise AssertionError("the signature was checked")
    monkeypatch.setattr(member_view, "verify", no_check)
    with pytest.raises(MembershipError, match="members table"):
        closed_view().offer(signed(5, name="peer3"), 1.0)


@pytest.mark.parametrize("members, message", [
    ({"peer0": IDS[0], "peer9": IDS[1]}, r"members.peer9: not a member name: they are peer0..peer3"),
    ({"peer0": IDS[0], "bob": IDS[1]}, r"members.bob: not a member name"),
    ({"peer0": IDS[0], "peer1": "notanid"}, r"members.peer1: 'notanid' is not a libp2p peer ID"),
    ({"peer0": IDS[0], "peer1": IDS[0][:-1]}, r"members.peer1: .* is not a libp2p peer ID"),
    ({"peer0": IDS[0], "peer1": IDS[0]}, "members: lists a peer ID twice"),
    ({"peer1": IDS[1]}, r"members: does not list this peer \(peer0\)"),
])
def test_a_bad_members_table_is_a_configuration_error_naming_the_key(members, message):
    with pytest.raises(ConfigError, match=message):
        PeerConfig(num_peers=4, swarm="lab", members=members).validate()
    with pytest.raises(ConfigError, match="members: needs swarm"):
        PeerConfig(num_peers=4, members=TABLE).validate()
    PeerConfig(num_peers=4, swarm="lab", members=TABLE).validate()


def test_a_peer_whose_key_is_not_its_name_in_the_table_stops_at_start():
    from p2pfed.swarm_peer import SwarmMember

    member = SwarmMember(PeerConfig(name="peer1", num_peers=4, swarm="lab", members=TABLE).validate())
    with pytest.raises(ConfigError, match=f"members.peer1: {IDS[1]} is not this peer's key's ID"):
        member.open(KEYS[5], endpoint=None)


def test_init_swarm_closes_the_swarm_with_every_key_it_made_and_the_files_load(tmp_path):
    from p2pfed.load import load_peer
    from p2pfed.net.identity import identity_from_file, peer_id_of
    from p2pfed.scaffold import init_swarm

    paths = init_swarm(3, tmp_path, None, swarm="lab")
    table = {f"peer{i}": peer_id_of(identity_from_file(tmp_path / f"peer{i}.key")) for i in range(3)}
    assert all(load_peer(p).members == table for p in paths)
    # Deleting the table in a file opens the swarm for that peer; the file still loads.
    text = paths[1].read_text(encoding="utf-8")
    paths[1].write_text(text[:text.index("[members]")], encoding="utf-8")
    assert load_peer(paths[1]).members == {}
    assert all(not load_peer(p).members for p in init_swarm(2, tmp_path / "plain"))  # no swarm: no table


# -- over loopback libp2p ------------------------------------------------------------------------

def test_a_squatter_with_a_fresh_key_cannot_join_a_closed_swarm_while_the_listed_peer_can():
    from p2pfed.net.libp2p_endpoint import open_libp2p_endpoint
    from p2pfed.net.membership import JoinError, Membership
    from tests.test_membership import open_members

    members_kw = dict(members=tuple(TABLE.items()), expected=2)

    async def newcomer(stack, bootstrap, index: int, name: str, timeout: float) -> Membership:
        endpoint = await stack.enter_async_context(open_libp2p_endpoint(KEYS[index], "/ip4/127.0.0.1/tcp/0"))
        m = Membership(settings(index, bootstrap, name=name, startup_timeout_s=timeout, **members_kw),
                       KEYS[index], endpoint, lambda: 0)
        m.open()
        return m

    async def main():
        async with contextlib.AsyncExitStack() as stack:
            members = await open_members(stack, 2, **members_kw)
            bootstrap = members[0].settings.bootstrap  # endpoints open outside fail_after: they hold nurseries
            squatter = await newcomer(stack, bootstrap, 5, "peer3", 2.0)  # a free name, its own key
            listed = await newcomer(stack, bootstrap, 2, "peer2", 20.0)
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(members[1].join)
                    await trio.sleep(0.3)
                    nursery.start_soon(members[0].join)
                with pytest.raises(JoinError):
                    await squatter.join()
                await listed.join()
            for m in members:
                assert IDS[5] not in m.view.records and m.view.holder("peer3") is None
                assert m.view.records[IDS[2]].record.name == "peer2"
            # Hung up on after Noise without spending the strangers' budget (a listed newcomer spends one).
            assert members[0].endpoint.strangers_refused >= 1
            assert members[0].gate.tokens >= STRANGER_BURST - 2
            assert IDS[5] not in members[0].gate.admitted
    trio.run(main)


def test_a_stream_from_an_unlisted_peer_on_a_connection_the_member_dialled_is_reset_unread():
    from types import SimpleNamespace

    from p2pfed.net.member_gate import StrangerGate
    from p2pfed.net.member_serving import serve_stream

    class Stream:
        muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: IDS[5]))
        was_reset = False

        async def read(self, n=None):
            raise AssertionError("a closed swarm read an unlisted peer's message")

        async def reset(self):
            self.was_reset = True

    membership = SimpleNamespace(view=closed_view(), gate=StrangerGate(), settings=SimpleNamespace(name="peer0"))
    stream = Stream()
    trio.run(serve_stream, membership, stream)
    assert stream.was_reset and not membership.gate.admitted and not membership.gate.strangers_serving
