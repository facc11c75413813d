"""An in-memory network: many peers in one process, each with its own Endpoint.

A peer only ever calls `send` and `receive` on its own endpoint; it never sees the network object.
The network delivers within one process, with message drop, delay and churn as plain knobs.
Fault decisions are hashed from (seed, sender, receiver, message number), never drawn in call order,
so they do not depend on how trio happens to schedule the peers, nor on which process hosts which peer: a job
spread over processes (p2pfed.swarm_workers) gives each process a network of its own peers, with `remote`
taking what they send to the others after the same drop and delay decisions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pfed.config import NetworkConfig
from p2pfed.seeding import uniform

log = logging.getLogger(__name__)


@dataclass
class InMemoryEndpoint:
    name: str
    network: "InMemoryNetwork"
    inbox_send: trio.MemorySendChannel
    inbox_receive: trio.MemoryReceiveChannel
    bytes_sent: int = 0
    sent_count: dict[str, int] = field(default_factory=dict)

    async def send(self, to: str, payload: bytes) -> None:
        number = self.sent_count.get(to, 0)
        self.sent_count[to] = number + 1
        self.bytes_sent += len(payload)
        await self.network.deliver(self.name, to, number, payload)

    async def send_many(self, neighbours: Iterable[str], payload: bytes) -> None:
        """`send` to each neighbour in the given order, one after another: the drop and delay decisions hash the
        per-receiver message number, and trio does not promise the order concurrent tasks start in."""
        for to in neighbours:
            await self.send(to, payload)

    async def receive(self) -> tuple[str, bytes]:
        return await self.inbox_receive.receive()

    def online(self, round_index: int) -> bool:
        return self.network.online(self.name, round_index)


class RemotePeers(Protocol):
    """The peers of a job that live in other processes: messages to them leave through `put`."""

    def __contains__(self, name: object) -> bool: ...

    def put(self, sender: str, to: str, payload: bytes) -> None: ...


class InMemoryNetwork:
    """Peers in one process. Use inside `async with network.running():` (delayed deliveries need a nursery)."""

    def __init__(self, faults: NetworkConfig, seed: int, remote: RemotePeers | None = None):
        self.faults = faults
        self.seed = seed
        self.remote = remote
        self._endpoints: dict[str, InMemoryEndpoint] = {}
        self._nursery: trio.Nursery | None = None

    def endpoint(self, name: str) -> InMemoryEndpoint:
        if name not in self._endpoints:
            send, receive = trio.open_memory_channel(float("inf"))
            self._endpoints[name] = InMemoryEndpoint(name=name, network=self, inbox_send=send, inbox_receive=receive)
        return self._endpoints[name]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["InMemoryNetwork"]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()  # undelivered delayed messages are simply lost
                self._nursery = None

    def online(self, name: str, round_index: int) -> bool:
        return self.faults.churn_prob == 0 or uniform(self.seed, "churn", name, round_index) >= self.faults.churn_prob

    async def deliver(self, sender: str, to: str, number: int, payload: bytes) -> None:
        if to not in self._endpoints and (self.remote is None or to not in self.remote):
            log.warning("%s sent to unknown peer %s; dropped", sender, to)
            return
        if self.faults.drop_prob and uniform(self.seed, "drop", sender, to, number) < self.faults.drop_prob:
            return
        if self.faults.delay_prob and uniform(self.seed, "delay", sender, to, number) < self.faults.delay_prob:
            if self._nursery is None:
                raise RuntimeError("delayed delivery needs `async with network.running():`")
            self._nursery.start_soon(self._deliver_later, sender, to, payload)
            return
        self.put(sender, to, payload)

    def put(self, sender: str, to: str, payload: bytes) -> None:
        """Hand a message that survived the faults to its receiver: here, or to the process that hosts it."""
        target = self._endpoints.get(to)
        if target is not None:
            target.inbox_send.send_nowait((sender, payload))
        elif self.remote is not None:
            self.remote.put(sender, to, payload)

    async def _deliver_later(self, sender: str, to: str, payload: bytes) -> None:
        await trio.sleep(self.faults.delay_s)
        self.put(sender, to, payload)
