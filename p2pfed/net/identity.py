"""A peer's libp2p identity: Ed25519 key pairs from key files or seeds, and peer IDs.

The peer ID is a peer's name on the network; Noise authenticates it on every connection.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

log = logging.getLogger(__name__)

_SEED_DOMAIN = b"p2pfed/libp2p-identity/v1:"
KEY_FILE_BYTES = 32


def identity_from_seed(seed: bytes | int) -> KeyPair:
    """A deterministic Ed25519 key pair: the same peer ID on every run and machine.

    `seed` is 32 raw bytes, or an int hashed (with a domain tag) into 32 bytes. Anyone who knows the
    seed has the private key: seeds are for tests and simulations, key files for real deployments.
    """
    if isinstance(seed, bool) or not isinstance(seed, (bytes, int)):
        raise TypeError(f"seed must be 32 bytes or an int, got {type(seed).__name__}")
    if isinstance(seed, int):
        seed = hashlib.sha256(_SEED_DOMAIN + str(seed).encode()).digest()
    if len(seed) != KEY_FILE_BYTES:
        raise ValueError(f"seed must be exactly {KEY_FILE_BYTES} bytes, got {len(seed)}")
    return create_new_key_pair(seed)


def identity_from_file(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair whose 32-byte Ed25519 seed is stored at `path`; a new random one is created (0600) if absent."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as file:
            file.write(os.urandom(KEY_FILE_BYTES))
        log.info("created a new identity key at %s", path)
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("identity key %s is readable by others (mode %o); chmod 600 it", path, mode & 0o777)
    seed = path.read_bytes()
    if len(seed) != KEY_FILE_BYTES:
        raise ValueError(f"identity key {path} must hold exactly {KEY_FILE_BYTES} bytes, it holds {len(seed)}")
    return create_new_key_pair(seed)


def peer_id_of(key_pair: KeyPair) -> str:
    """The peer ID (base58) of a key pair: the peer's name on the network."""
    return ID.from_pubkey(key_pair.public_key).to_base58()


# A peer ID is a multihash of the public key: "identity" (0x00) for small keys such as Ed25519, else sha2-256.
_MULTIHASH_CODES = (0x00, 0x12)


@functools.lru_cache(maxsize=1024)  # base58 decoding costs ~15 us a send
def parse_peer_id(peer_id: str) -> ID:
    try:
        parsed = ID.from_base58(peer_id)
    except Exception as error:  # base58 raises ValueError; short inputs other things
        raise ValueError(f"{peer_id!r} is not a peer ID: {error}") from error
    # Any base58 text decodes to some bytes: check that they are a multihash as well.
    raw = parsed.to_bytes()
    if len(raw) < 2 or raw[0] not in _MULTIHASH_CODES or len(raw) != 2 + raw[1]:
        raise ValueError(f"{peer_id!r} is not a peer ID: not a multihash of a public key")
    return parsed


def dial_addrs(peer_id: str, addrs: Iterable[str | Multiaddr]) -> list[Multiaddr]:
    """Dialable addresses without a trailing /p2p/<id> (which, if present, must name `peer_id`)."""
    result = []
    for addr in addrs:
        text = str(addr)
        head, sep, tail = text.partition("/p2p/")
        if sep:
            if tail != peer_id:
                raise ValueError(f"address {text} names peer {tail}, not {peer_id}")
            text = head
        result.append(Multiaddr(text))
    return result
