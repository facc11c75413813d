"""A peer file's addresses and peer IDs (listen, neighbours, bootstrap): configuration errors before any work."""

from __future__ import annotations

from p2pfed.config import ConfigError, PeerConfig


def check_addresses(config: PeerConfig, own_id: str) -> None:
    """Listen addresses, neighbours' and bootstrap peers' IDs and addresses: configuration errors before any work
    starts (`own_id` is this peer's ID)."""
    from multiaddr import Multiaddr

    from p2pfed.net.identity import dial_addrs, parse_peer_id
    from p2pfed.net.member_records import DIALABLE

    for i, addr in enumerate(config.listen):
        try:
            protocols = tuple(p.name for p in Multiaddr(addr).protocols())
        except Exception as error:
            raise ConfigError(f"listen[{i}]: {addr!r} is not a multiaddr ({error})") from error
        if config.swarm and protocols not in DIALABLE:
            # A member's record lists its listen addresses, and members take only these (member_records).
            raise ConfigError(f"listen[{i}]: {addr!r}: a swarm member listens on /ip4 or /ip6 with /tcp/PORT")
    seen: set[str] = set()
    for i, neighbour in enumerate(config.neighbours):
        where = f"neighbours[{i}] ({neighbour.name})"
        try:
            parse_peer_id(neighbour.peer_id)
        except ValueError as error:
            raise ConfigError(f"{where}.peer_id: {neighbour.peer_id!r} is not a libp2p peer ID "
                              f"(`p2pfed id PEER.toml` prints a peer's ID)") from error
        if neighbour.peer_id == own_id:
            raise ConfigError(f"{where}.peer_id: {own_id} is this peer's own ID")
        if neighbour.peer_id in seen:
            raise ConfigError(f"{where}.peer_id: {neighbour.peer_id} is listed for two neighbours")
        seen.add(neighbour.peer_id)
        try:
            dial_addrs(neighbour.peer_id, neighbour.addrs)
        except Exception as error:
            raise ConfigError(f"{where}.addrs: {error}") from error
    for i, addr in enumerate(config.bootstrap):
        peer_id = addr.partition("/p2p/")[2]
        try:
            parse_peer_id(peer_id)
            dial_addrs(peer_id, [addr])
        except Exception as error:
            raise ConfigError(f"bootstrap[{i}]: {addr!r} is not a multiaddr ending in /p2p/PEER_ID ({error})") from error
