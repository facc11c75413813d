"""The libp2p endpoint: one host per peer, updates sent over direct streams to topology neighbours.

    key = identity_from_file("peer.key")  # peer_id_of(key) is this peer's name; neighbours need it
    async with open_libp2p_endpoint(key, "/ip4/127.0.0.1/tcp/4001", {neighbour_id: [neighbour_addr]}) as endpoint:
        await endpoint.send(neighbour_id, payload)
        sender, payload = await endpoint.receive()

A peer's name on the network is its peer ID, which Noise authenticates: `receive()` names the sender by
the ID of the connection the bytes came on, never by anything in the payload. A peer accepts streams only
from its neighbours' IDs. The transport moves bytes; the peer decodes them (p2pfed.net.wire), so nothing here
unpickles or parses what arrives beyond the frame header.

Updates go out on one kept stream per neighbour, one frame each, and the receiver answers each with a
1-byte ack once the body is in its inbox: the send side is `p2pfed.net.outbound` (one retry on a new stream
for a frame whose stream ended before its ack; `send_many` to several neighbours at once), the receive side
`p2pfed.net.inbound` (what one neighbour may have buffered is bounded in bytes). A send that fails (the
neighbour is gone, refuses, or is too slow) is logged and counted, never raised into the peer's loop.

Hosts offer Noise only and Yamux only, through `p2pfed.net.fastpath`, which also moves bulk data
several times faster than stock py-libp2p with the same protocols on the wire (see its docstring).
py-libp2p's default hosts also accept /plaintext/2.0.0, in which a dialler can claim any peer ID whose
public key it knows: offering Noise alone is what makes the peer ID an authenticated name. A dialler that
is not a neighbour is hung up on right after Noise, before any buffer of its own exists, and libp2p's
inbound connection slots are given back when connections close (`p2pfed.net.inbound_slots`): strangers
can neither lock neighbours out nor cost more than a handshake each.

Facts about py-libp2p 0.8.1 that shape this module (docs/libp2p.md has the measurements; the send
side's own are in p2pfed.net.outbound):
- `stream.read(n)` returns what is buffered and ends with StreamEOF; `read_exactly` fails from ~7 MB.
- A refused dial makes libp2p refuse that peer for 60 s, and it dials one address per transport:
  before each dial the neighbour is unblocked and its peerstore addresses replaced by ours.
- A listen address libp2p cannot bind is logged at debug level and skipped, and listeners use SO_REUSEPORT
  (a second host binds a port in use without an error): `open_libp2p_endpoint` checks both (ListenError).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from p2pfed.config import NetworkConfig
from p2pfed.net.fastpath import security_options
from p2pfed.net.framing import PROTOCOL_ID
from p2pfed.net.identity import dial_addrs, parse_peer_id
from p2pfed.net.inbound import InboundStreams
from p2pfed.net.inbound_slots import InboundSlots
from p2pfed.net.listening import ListenError, check_bindable, check_listening
from p2pfed.net.outbound import NeighbourState, OutboundSends

__all__ = ["Libp2pEndpoint", "ListenError", "NeighbourState", "TransportLimits", "open_libp2p_endpoint"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TransportLimits:
    max_message_bytes: int = NetworkConfig.max_message_bytes  # frames declaring a longer body are refused unread
    send_timeout_s: float = 60.0  # one send: dial, open the stream, write, wait for the ack
    receive_timeout_s: float = 60.0  # one inbound frame: header, body and a place in the inbox
    write_stall_s: float = 10.0  # the most one ~1 MiB chunk may take; past it the connection is dropped
    max_concurrent_sends: int = 2  # more streams at once only adds latency and memory
    max_inbound_per_neighbour: int = 2  # streams a neighbour may have open to us at once (it keeps one)
    inbox_size: int = 32  # received updates waiting for receive(); a full inbox holds back the acks
    # Bytes of one neighbour's updates being read or waiting for receive(); past it, its next update waits
    # unacknowledged (p2pfed.net.inbound). A peer sets about two expected updates; one update bigger than
    # this still gets through once nothing else of that neighbour's is buffered.
    max_buffered_bytes_per_neighbour: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_concurrent_sends", "max_inbound_per_neighbour", "inbox_size",
                     "max_buffered_bytes_per_neighbour"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("send_timeout_s", "receive_timeout_s", "write_stall_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# The endpoint


class Libp2pEndpoint:
    """A peer's view of a libp2p network (the `Endpoint` protocol). Open it with `open_libp2p_endpoint`."""

    def __init__(self, key_pair: KeyPair, limits: TransportLimits):
        self.strangers_refused = 0  # diallers hung up on after Noise: not neighbours
        self.limits = limits
        self.admit_others: Callable[[str], bool] | None = None  # who else may stay after Noise (membership)
        self._neighbours: dict[str, NeighbourState] = {}
        # One connection per peer: with more allowed, every connect() waits for happy eyeballs (250 ms).
        # Noise alone (no plaintext, which proves no identity) and Yamux alone (Mplex manages 7-11 MB/s).
        self._host = new_host(key_pair=key_pair, connection_config=ConnectionConfig(max_connections_per_peer=1),
                              sec_opt=security_options(key_pair, self.admits, self.wrong_peer),
                              muxer_opt={YAMUX_PROTOCOL_ID: Yamux})
        InboundSlots.install(self._host.get_network())
        self.name = self._host.get_id().to_base58()
        self._outbound = OutboundSends(self.name, self._host, limits, self._neighbours, self._drop_connection)
        self._inbound = InboundStreams(self.name, limits, self._neighbours.__contains__, self._drop_connection)
        self._host.set_stream_handler(PROTOCOL_ID, self._inbound.handle_stream)

    # -- the Endpoint protocol --------------------------------------------------------------

    async def send(self, to: str, payload: bytes) -> None:
        """Deliver `payload` to neighbour `to`, or log and count why not; never raises (but for cancellation).
        Returns within `send_timeout_s` (up to `write_stall_s` later when the deadline falls inside a write)."""
        await self._outbound.send(to, payload)

    async def send_many(self, neighbours: Iterable[str], payload: bytes) -> None:
        """`send` to all of `neighbours` at once, at most `max_concurrent_sends` at a time; never raises."""
        await self._outbound.send_many(neighbours, payload)

    @property
    def bytes_sent(self) -> int:
        """Body bytes written to streams (headers excluded, unacknowledged ones included)."""
        return self._outbound.bytes_sent

    async def receive(self) -> tuple[str, bytes]:
        return await self._inbound.receive()

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
    def host(self):
        return self._host  # for protocols beside the updates' (p2pfed.net.membership)

    def connected(self, peer_id: str) -> bool:
        """Whether a connection to `peer_id` is open now (either side may have dialled)."""
        return bool(self._host.get_network().get_connections(parse_peer_id(peer_id)))

    @property
    def failures(self) -> dict[str, int]:
        """Failed sends per neighbour, in total."""
        return {peer_id: state.failures for peer_id, state in self._neighbours.items()}

    @property
    def buffered(self) -> dict[str, int]:
        """Bytes of each neighbour's updates being read or waiting for receive() (none: left out)."""
        return self._inbound.buffered

    def admits(self, peer: ID) -> bool:
        """Whether a dialler that Noise authenticated as `peer` may keep its connection: neighbours only,
        as they are now (the security transport asks at every inbound handshake)."""
        if peer.to_base58() in self._neighbours or (self.admit_others and self.admit_others(peer.to_base58())):
            return True
        self.strangers_refused += 1
        log.debug("%s: hung up on %s after Noise: not a neighbour", self.name, peer)
        return False

    def wrong_peer(self, expected: ID, answered: ID, address: str) -> None:
        """A dial to `expected` at `address` was answered, Noise-authenticated, by `answered`: one warning
        per neighbour, answering peer and address, however often the dial is retried."""
        state = self._neighbours.get(expected.to_base58())
        key = (answered.to_base58(), address)
        if state is None or key in state.wrong_peers:
            return
        state.wrong_peers.add(key)
        log.warning("%s: neighbour %s was dialled at %s but %s answered there; check its address and peer ID "
                    "(reported once)", self.name, expected, address, answered)

    def add_neighbour(self, peer_id: str, addrs: Iterable[str | Multiaddr] = ()) -> None:
        """Accept streams from `peer_id` and send to it at `addrs` (empty: it only dials us)."""
        if peer_id in self._neighbours:
            self.set_neighbour_addrs(peer_id, addrs)
            return
        parse_peer_id(peer_id)  # validate before anything reaches libp2p
        self._neighbours[peer_id] = NeighbourState(dial_addrs(peer_id, addrs))
        self._outbound.forget_addrs(peer_id)

    def remove_neighbour(self, peer_id: str) -> None:
        """Stop accepting streams from `peer_id` and sending to it (a member that left the swarm)."""
        self._neighbours.pop(peer_id, None)

    def set_neighbour_addrs(self, peer_id: str, addrs: Iterable[str | Multiaddr]) -> None:
        """New addresses for a neighbour (say, restarted on another port): the old ones are forgotten."""
        state = self._neighbours.get(peer_id)
        if state is None:
            raise KeyError(f"{peer_id} is not a neighbour; add_neighbour first")
        state.addrs = dial_addrs(peer_id, addrs)
        self._outbound.forget_addrs(peer_id)

    # -- connections -------------------------------------------------------------------------

    async def wait_for_neighbours(self, timeout: float, retry_s: float = 0.25) -> list[str]:
        """Dial every neighbour with a known address until all are connected or `timeout` passes.

        For a start-up without a lost first round: a peer that starts before its neighbours listen would
        otherwise send round 1 into the void. Neighbours without an address must dial us: they count as
        reached once they have. Returns the IDs still unreachable (the caller goes on without them). Each
        failed dial leaves its reason in the neighbour's `last_error`; nothing is logged per dial (the
        caller reports who it is waiting for, libp2p's own lines go to debug: p2pfed.net.dialling).
        """
        with trio.move_on_after(timeout):
            while pending := [peer for peer in self._neighbours if not self.connected(peer)]:
                for peer in pending:
                    state = self._neighbours.get(peer)
                    if state is None or not state.addrs:
                        continue
                    limit = max(retry_s, 1.0)
                    with trio.move_on_after(limit) as dialling:
                        try:
                            await self._outbound.dial(peer, state)
                        except Exception as error:  # not listening yet: try again
                            state.last_error = str(error)
                    if dialling.cancelled_caught:
                        state.last_error = f"no answer within {limit:g} s"
                        await self._drop_connection(peer, quiet=True)  # a cut-off dial may have half-registered
                await trio.sleep(retry_s)
        return [peer for peer in self._neighbours if not self.connected(peer)]

    async def _drop_connection(self, peer_id: str, quiet: bool = False) -> None:
        """Close the connection to `peer_id`: an I/O call cut off half-way may have left it unusable."""
        log.log(logging.DEBUG if quiet else logging.INFO, "%s: dropping the connection to %s", self.name, peer_id)
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                await self._host.disconnect(parse_peer_id(peer_id))
            except Exception as error:
                log.debug("%s: disconnecting %s failed: %s", self.name, peer_id, error)


@contextlib.asynccontextmanager
async def open_libp2p_endpoint(
    key_pair: KeyPair,
    listen: str | Sequence[str] = "/ip4/127.0.0.1/tcp/0",
    neighbours: Mapping[str, Iterable[str | Multiaddr]] | None = None,
    limits: TransportLimits = TransportLimits(),
) -> AsyncIterator[Libp2pEndpoint]:
    """Run a libp2p host (Noise only, Yamux only, with p2pfed's fast paths) on `listen` for as long as the block lasts.

    `neighbours` maps each neighbour's peer ID to the addresses to dial it at (may be empty for one
    that dials us). Raises ListenError if an address cannot be listened on. The host is closed on the
    way out, whatever happens.
    """
    listen_addrs = [Multiaddr(listen)] if isinstance(listen, str) else [Multiaddr(a) for a in listen]
    for addr in listen_addrs:
        check_bindable(addr)
    endpoint = Libp2pEndpoint(key_pair, limits)
    host = endpoint._host
    try:
        for peer_id, addrs in (neighbours or {}).items():
            endpoint.add_neighbour(peer_id, addrs)
        async with host.run(listen_addrs):
            try:
                check_listening(host.get_network(), listen_addrs)
                yield endpoint
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await host.close()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await host.close()  # idempotent; covers a failure inside host.run() itself
        endpoint._inbound.close()
