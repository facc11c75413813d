"""The one interface a peer uses to reach its neighbours; the runtimes provide its implementations
(`p2pfed.net.memory` in one process, `p2pfed.net.libp2p_endpoint` on the network)."""

from __future__ import annotations

from typing import Protocol


class Endpoint(Protocol):
    """A peer's view of the network. `sender` names come from the transport, never from the payload."""

    name: str
    bytes_sent: int

    async def send(self, to: str, payload: bytes) -> None: ...

    async def receive(self) -> tuple[str, bytes]: ...

    def online(self, round_index: int) -> bool: ...


