"""A member's answering side of /p2pfed/members/1: one exchange per inbound stream, within the stranger gate
(p2pfed.net.member_gate), and the connections of strangers that stayed too long closed.

Whatever a peer sends ends as one log line (once per peer and reason) and a reset stream, never as an error
in libp2p's stream handler: an exception there ends the member's whole host.
"""

from __future__ import annotations

import logging

import trio

from p2pfed.net.framing import STREAM_ERRORS, reset_stream
from p2pfed.net.identity import parse_peer_id
from p2pfed.net.member_records import (MembershipError, decode_message, encode_message, message_bytes_cap, peek,
                                       verify)
from p2pfed.net.member_streams import EXCHANGE_TIMEOUT_S, read_message, reason, write_message

log = logging.getLogger("p2pfed.net.membership")  # the protocol's one logger, whichever module logs


async def serve_stream(membership, stream) -> None:
    """libp2p runs this for each inbound stream on MEMBERS_PROTOCOL (`membership`: a Membership)."""
    remote = stream.muxed_conn.peer_id.to_base58()  # authenticated by Noise
    view, name = membership.view, membership.settings.name
    member = remote in view.records
    if not view.listed(remote):  # a closed swarm's stranger (on a connection we dialled): no slot, no answer
        refused = "not in this closed swarm's members table"
    else:
        refused = membership.gate.start(remote, member, trio.current_time())
    if refused is not None:
        await reset_stream(stream)
        if view.note_refused(remote, refused):
            log.info("%s: refused a membership exchange from %s: %s", name, remote, refused)
        return
    try:
        with trio.fail_after(EXCHANGE_TIMEOUT_S):
            await _answer(membership, stream, remote, member)
    except Exception as error:  # whatever a peer sent: one line, and the member carries on
        await reset_stream(stream)
        if view.note_refused(remote, type(error).__name__):
            log.info("%s: refused a membership exchange from %s: %s", name, remote,
                     reason(error) if isinstance(error, (MembershipError, trio.TooSlowError, *STREAM_ERRORS))
                     else f"{type(error).__name__}: {str(error)[:200]}")
    finally:
        membership.gate.finish(remote, member)


async def _answer(membership, stream, remote: str, member: bool) -> None:
    settings, view = membership.settings, membership.view
    message = decode_message(await read_message(stream, message_bytes_cap(settings.num_peers)))
    if message.swarm != settings.swarm:
        raise MembershipError(f"it asked for swarm {message.swarm!r}")
    own = [raw for raw in message.records if peek(raw).peer_id == remote]
    if not own:
        raise MembershipError("its message holds no record of its own")
    newest = max(own, key=lambda raw: peek(raw).seq)
    verify(newest)
    if message.kind == "sync":
        # A stranger introduces itself only: relayed records come from members, so one stranger's connection
        # cannot fill the swarm's free names with records of keys made for the purpose.
        membership.take(remote, message.records if member else [newest])
        if remote in view.records:  # members only: strangers leave nothing behind
            membership.rounds_heard[remote] = message.round
            view.touch(remote, trio.current_time())
    answer = encode_message(settings.swarm, "sync", membership.current_round(), view.signed())
    await write_message(stream, answer)
    await stream.close()  # the dialler reads the answer, then closes its side
    if message.kind == "sync" and remote in view.records:
        membership.synced.add(remote)  # it keeps our records, our own newest among them


async def close_overstayed(membership) -> None:
    """Close the connections of strangers admitted more than STRANGER_GRACE_S ago that are not members."""
    network = membership.endpoint.host.get_network()
    for pid in membership.gate.overstayed(trio.current_time()):
        if pid not in membership.view.records:
            with trio.move_on_after(EXCHANGE_TIMEOUT_S):
                try:
                    await network.close_peer(parse_peer_id(pid))
                except Exception as error:  # closing is best effort: it may be gone already
                    log.debug("%s: closing %s's connection: %s", membership.settings.name, pid, error)
