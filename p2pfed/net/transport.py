"""The one interface a peer uses to reach its neighbours; the runtimes provide its implementations
(`p2pfed.net.memory` in one process, `p2pfed.net.libp2p_endpoint` on the network)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Endpoint(Protocol):
    """A peer's view of the network. `sender` names come from the transport, never from the payload."""

    name: str
    bytes_sent: int

    async def send(self, to: str, payload: bytes) -> None: ...

    async def receive(self) -> tuple[str, bytes]: ...

    def online(self, round_index: int) -> bool: ...


class SendsMany(Protocol):
    """What an Endpoint may add (the loop falls back to `send`, one neighbour after another): one payload to
    several neighbours, concurrently where the transport can (libp2p), in the given order where the order
    matters (in memory, where faults are hashed from per-receiver message numbers)."""

    async def send_many(self, neighbours: Iterable[str], payload: bytes) -> None: ...
