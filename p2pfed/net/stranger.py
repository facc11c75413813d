"""Dialling a peer as a stranger: a fresh random identity that runs Noise and tries to go on to Yamux.

For the tests and the benchmark that check what strangers cost a peer (they should get nothing).
"""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader
from multiaddr import Multiaddr


async def dial_as_stranger(addr: str, target: ID, timeout: float = 10.0) -> str:
    """How far one stranger got: "hung up after Noise", "connected", "timed out", or why it failed."""
    upgrader = TransportUpgrader(
        {NOISE_PROTOCOL_ID: NoiseTransport(create_new_key_pair(), create_x25519_key_pair().private_key)},
        {YAMUX_PROTOCOL_ID: Yamux})
    try:
        raw = await TCP().dial(Multiaddr(addr))
    except Exception as error:
        return f"dial failed: {type(error).__name__}"
    try:
        with trio.move_on_after(timeout):
            secured = await upgrader.upgrade_security(raw, True, target)
            try:
                await upgrader.upgrade_connection(secured, target)
            except Exception:
                return "hung up after Noise"
            return "connected"
        return "timed out"
    except Exception as error:
        return f"failed: {type(error).__name__}"
    finally:
        await raw.close()


async def dial_strangers(addr: str, target: ID, count: int, wave: int = 50, timeout: float = 10.0) -> dict[str, int]:
    """`count` strangers, `wave` at a time; how many got how far."""
    outcomes: dict[str, int] = {}

    async def one() -> None:
        outcome = await dial_as_stranger(addr, target, timeout)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    for start in range(0, count, wave):
        async with trio.open_nursery() as nursery:
            for _ in range(min(wave, count - start)):
                nursery.start_soon(one)
    return outcomes
