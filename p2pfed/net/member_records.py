"""Signed membership records and the membership protocol's one message, both bounded like the update format.

A record says who a swarm member is: (swarm, peer ID, name, addresses, join round, leave round, seq). Its body
is canonical msgpack (a list, so the same record is the same bytes everywhere), signed with the member's own
Ed25519 identity key under a domain tag; the public key travels beside it and must hash to the peer ID the
body names. So a record for peer X can only come from X's key: nobody can add, change or replay-forward
another member's record except as X signed it, and a higher `seq` replaces a lower one.

Message (msgpack): [VERSION, swarm, kind, round, [[body, public key, signature], ...]]. `kind` is "join" (the
dialler asks for the members and is not stored yet) or "sync" (both sides store what they get); `round` is the
round the sender is in (0 before round 1), a hint for newcomers only. Decoding caps the size before msgpack
parses anything, every string, list and number, and turns anything malformed into a MembershipError.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2pfed.config.checks import PEER_NAME
from p2pfed.config.peer import MAX_SWARM_PEERS, SWARM_NAME

VERSION = 1
DOMAIN = b"p2pfed/member-record/1\x00"  # a signature here is never valid for anything else the key signs
KINDS = ("join", "sync")
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_ROUND = 1 << 31
MAX_SEQ = 1 << 62
DIALABLE = (("ip4", "tcp"), ("ip6", "tcp"))  # what members dial: no names to resolve, no other transports
MAX_BODY_BYTES = 2048  # a record's body: 8 addresses of 256 characters fit
MAX_MESSAGE_BYTES = 64 + MAX_SWARM_PEERS * 2 * (MAX_BODY_BYTES + 128)  # every member, twice over (left ones)


def message_bytes_cap(num_peers: int) -> int:
    """The largest message a member of a swarm of `num_peers` reads: its records, twice over."""
    return 64 + min(num_peers, MAX_SWARM_PEERS) * 2 * (MAX_BODY_BYTES + 128)


class MembershipError(ValueError):
    """A membership record or message is malformed, oversized, unsigned, or signed by another key."""


@dataclass(frozen=True)
class MemberRecord:
    swarm: str
    peer_id: str
    name: str  # its data name in results (peer0, peer1, ...)
    addrs: tuple[str, ...]
    join_round: int  # the first round it takes part in
    leave_round: int | None  # the first round it no longer takes part in; None: it stays
    seq: int  # higher replaces lower: a member re-signs its record to show it is alive or to change it

    def takes_part(self, round_index: int) -> bool:
        return self.join_round <= round_index and (self.leave_round is None or round_index < self.leave_round)

    def body(self) -> bytes:
        return msgpack.packb([self.swarm, self.peer_id, self.name, list(self.addrs), self.join_round,
                              self.leave_round or 0, self.seq], use_bin_type=True)


@dataclass(frozen=True)
class SignedRecord:
    record: MemberRecord
    public_key: bytes
    signature: bytes

    def wire(self) -> list[bytes]:
        return [self.record.body(), self.public_key, self.signature]


@dataclass(frozen=True)
class MembershipMessage:
    swarm: str
    kind: str
    round: int
    records: tuple[object, ...]  # [body, public key, signature] triples, not verified yet (see verify)


def sign_record(key_pair: KeyPair, record: MemberRecord) -> SignedRecord:
    """`record` signed with `key_pair`, which must be the record's own peer's key."""
    if ID.from_pubkey(key_pair.public_key).to_base58() != record.peer_id:
        raise ValueError("a member signs its own record only")
    check_record(record)
    check_addrs(record)
    return SignedRecord(record, key_pair.public_key.to_bytes(), key_pair.private_key.sign(DOMAIN + record.body()))


def peek(raw: object) -> MemberRecord:
    """The record a [body, public key, signature] triple claims, checked in form but not signature (cheap: to
    skip verifying what is known already). Raises MembershipError."""
    if not (isinstance(raw, list) and len(raw) == 3 and all(isinstance(x, bytes) for x in raw)):
        raise MembershipError("a record must be [body, public key, signature] (bytes)")
    if len(raw[0]) > MAX_BODY_BYTES or len(raw[1]) != 32 or len(raw[2]) != 64:
        raise MembershipError("a record's body, key or signature has the wrong size")
    return _record_of(_unpack(raw[0], MAX_BODY_BYTES))


def verify(raw: object) -> SignedRecord:
    """A [body, public key, signature] triple from the network, checked: the key is the named peer's and signed
    the body. Raises MembershipError."""
    record = peek(raw)
    body, key_bytes, signature = raw
    try:
        key = Ed25519PublicKey.from_bytes(key_bytes)
        owner = ID.from_pubkey(key).to_base58()
    except Exception as error:
        raise MembershipError(f"a record's public key is not an Ed25519 key ({type(error).__name__})") from None
    if owner != record.peer_id:
        raise MembershipError(f"a record for {record.peer_id} is signed by another key ({owner})")
    if not key.verify(DOMAIN + body, signature):
        raise MembershipError(f"the signature of {record.peer_id}'s record does not verify")
    check_addrs(record)  # here, not in peek: parsing 8 multiaddrs per relayed record would cost every exchange
    return SignedRecord(record, key_bytes, signature)


def encode_message(swarm: str, kind: str, round_index: int, records: list[SignedRecord]) -> bytes:
    return msgpack.packb([VERSION, swarm, kind, round_index, [r.wire() for r in records]], use_bin_type=True)


def decode_message(payload: bytes) -> MembershipMessage:
    """The message with its header checked and its records still unverified (the receiver verifies only the ones
    it would use: verifying costs ~0.1 ms each). Raises MembershipError."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MembershipError(f"a membership message of {len(payload)} bytes is over {MAX_MESSAGE_BYTES}")
    message = _unpack(payload, MAX_MESSAGE_BYTES)
    if not (isinstance(message, list) and len(message) == 5):
        raise MembershipError("a membership message must be a list of 5")
    version, swarm, kind, round_index, records = message
    if version != VERSION:
        raise MembershipError("unknown membership message version")
    _check_swarm(swarm)
    if kind not in KINDS:
        raise MembershipError("unknown membership message kind")
    _check_int(round_index, "round", 0, MAX_ROUND)
    if not isinstance(records, list) or len(records) > 2 * MAX_SWARM_PEERS:
        raise MembershipError("a membership message's records must be a list of at most "
                              f"{2 * MAX_SWARM_PEERS}")
    return MembershipMessage(swarm, kind, round_index, tuple(records))


def check_record(record: MemberRecord) -> None:
    _check_swarm(record.swarm)
    if not isinstance(record.peer_id, str) or len(record.peer_id) > 128:
        raise MembershipError("a record's peer ID must be a short string")
    if not isinstance(record.name, str) or PEER_NAME.fullmatch(record.name) is None \
            or int(record.name[4:]) >= MAX_SWARM_PEERS:
        raise MembershipError("a record's name must be peer0, peer1, ...")
    if len(record.addrs) > MAX_ADDRS or not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS
                                                for a in record.addrs):
        raise MembershipError(f"a record has at most {MAX_ADDRS} addresses of {MAX_ADDR_CHARS} characters")
    _check_int(record.join_round, "join round", 1, MAX_ROUND)
    if record.leave_round is not None:
        _check_int(record.leave_round, "leave round", record.join_round + 1, MAX_ROUND)
    _check_int(record.seq, "seq", 0, MAX_SEQ)


def check_addrs(record: MemberRecord) -> None:
    """Every address must be /ip4 or /ip6, then /tcp/PORT (1-65535), optionally /p2p/ and the record's own ID:
    members dial these, and an address that does not parse would otherwise fail where the neighbour is added."""
    for addr in record.addrs:
        head, sep, tail = addr.partition("/p2p/")
        if sep and tail != record.peer_id:
            raise MembershipError(f"{record.peer_id}'s address {addr!r} names another peer")
        try:
            parsed = Multiaddr(head)
            names = tuple(p.name for p in parsed.protocols())
            port = int(parsed.value_for_protocol("tcp")) if names in DIALABLE else 0
        except Exception:
            port = 0
        if not 1 <= port <= 65535:
            raise MembershipError(f"{record.peer_id}'s address {addr[:80]!r} is not /ip4 or /ip6 with /tcp/PORT")


def _record_of(fields: object) -> MemberRecord:
    if not (isinstance(fields, list) and len(fields) == 7 and isinstance(fields[3], list)):
        raise MembershipError("a record's body must be a list of 7")
    swarm, peer_id, name, addrs, join_round, leave_round, seq = fields
    if not isinstance(leave_round, int) or isinstance(leave_round, bool):
        raise MembershipError("a record's leave round must be an integer")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise MembershipError(f"a record has at most {MAX_ADDRS} addresses")
    record = MemberRecord(swarm, peer_id, name, tuple(addrs), join_round, leave_round or None, seq)
    check_record(record)
    return record


def _unpack(payload: bytes, max_bytes: int) -> object:
    # The size first, then msgpack's own caps bound every container and string before it allocates.
    if len(payload) > max_bytes:
        raise MembershipError(f"{len(payload)} bytes is over the {max_bytes} allowed")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True,
                               max_str_len=MAX_ADDR_CHARS, max_bin_len=MAX_BODY_BYTES,
                               max_array_len=2 * MAX_SWARM_PEERS, max_map_len=0, max_ext_len=0)
    except Exception as error:
        raise MembershipError(f"not a membership message ({type(error).__name__})") from None


def _check_swarm(swarm: object) -> None:
    if not isinstance(swarm, str) or SWARM_NAME.fullmatch(swarm) is None:
        raise MembershipError("a swarm name must be 1-64 letters, digits, '.', '_' or '-'")


def _check_int(value: object, what: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MembershipError(f"a record's {what} must be an integer in [{low}, {high}]")
