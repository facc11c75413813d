"""Hostile neighbours on demand: an Endpoint wrapper that turns an honest peer's sends into an attack.

An experiment's `[[attack]]` entries name the attacking peers, the kind and the round it starts. The
attacker trains like everyone else (so its own records stay comparable); only what leaves its endpoint
changes, so every runtime (in process, one process per peer over libp2p) runs the same attack:

    noise       Gaussian noise, `factor` times as long as the attacker's honest update
    sign_flip   the honest update reversed: init - (theta - init)
    scale       the honest update times `factor`
    huge        every value 3e38: finite, so only a magnitude check stops it
    other_group an honest adapter trained on another group's data (set up by the job, see job.py)
    free_rider  echoes each neighbour's own last update back to it, contributing nothing
    stale       replays its update of round `from_round` for ever after
    metadata    honest tensors, but claims degree 0 and 2**39 training tokens (within the wire's bound,
                so that it reaches the trust rules' own sanitising)
    garbage     malformed payloads: a nesting bomb, a truncated update, random bytes

Updates are measured from the swarm's shared seeded init, which every peer knows.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from p2pfed.config import AttackConfig
from p2pfed.net import wire
from p2pfed.net.transport import Endpoint
from p2pfed.seeding import generator

HUGE_VALUE = 3e38  # just below float32's largest finite value


@dataclass
class AttackEndpoint:
    """An attacking peer's endpoint: forwards to the real one, rewriting what the peer sends."""

    inner: Endpoint
    attack: AttackConfig
    initial: Mapping[str, Tensor]  # the shared seeded init
    seed: int
    _last_received: dict[str, bytes] = field(default_factory=dict)
    _replayed: bytes | None = None
    _sends: itertools.count = field(default_factory=itertools.count)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    def online(self, round_index: int) -> bool:
        return self.inner.online(round_index)

    async def receive(self) -> tuple[str, bytes]:
        sender, payload = await self.inner.receive()
        self._last_received[sender] = payload
        return sender, payload

    async def send(self, to: str, payload: bytes) -> None:
        await self.inner.send(to, self.rewrite(to, payload))

    def rewrite(self, to: str, payload: bytes) -> bytes:
        """What the attacker sends instead of its honest `payload` to neighbour `to`."""
        honest = wire.decode_update(payload, limits=wire.WireLimits(max_abs_value=float("inf")))
        kind = self.attack.kind
        if honest.round < self.attack.from_round or kind == "other_group":
            return payload  # other_group is honest training on the wrong data
        if kind == "stale":
            if self._replayed is None:
                self._replayed = payload
            replayed = wire.decode_update(self._replayed, limits=wire.WireLimits(max_abs_value=float("inf")))
            return _encode(replace(replayed, round=honest.round))
        if kind == "free_rider":
            echoed = self._echo(to)
            return _encode(replace(honest, tensors=echoed)) if echoed is not None else payload
        if kind == "metadata":
            return _encode(replace(honest, degree=0, num_samples=2**39))
        if kind == "garbage":
            return _garbage(next(self._sends), payload)
        return _encode(replace(honest, tensors=self._tensors(kind, honest.tensors, honest.round)))

    def _tensors(self, kind: str, tensors: Mapping[str, Tensor], round_index: int) -> dict[str, Tensor]:
        update = {n: t - self.initial[n] for n, t in tensors.items()}
        factor = self.attack.factor
        if kind == "scale":
            moved = {n: u * factor for n, u in update.items()}
        elif kind == "sign_flip":
            moved = {n: -u for n, u in update.items()}
        elif kind == "noise":
            draw = generator(self.seed, "attack-noise", self.name, round_index)
            noise = {n: torch.randn(u.shape, generator=draw) for n, u in update.items()}
            ratio = factor * _norm(update) / max(_norm(noise), 1e-12)
            moved = {n: z * ratio for n, z in noise.items()}
        elif kind == "huge":
            return {n: torch.full_like(t, HUGE_VALUE) for n, t in tensors.items()}
        else:
            raise ValueError(f"unknown attack kind {kind!r}")
        return {n: self.initial[n] + m for n, m in moved.items()}

    def _echo(self, to: str) -> dict[str, Tensor] | None:
        last = self._last_received.get(to)
        if last is None:
            return None
        try:
            return wire.decode_update(last).tensors
        except wire.WireError:
            return None


def _norm(tensors: Mapping[str, Tensor]) -> float:
    return float(sum(t.double().square().sum() for t in tensors.values())) ** 0.5


def _encode(message: wire.UpdateMessage) -> bytes:
    return wire.encode_update(message)


def _garbage(number: int, payload: bytes) -> bytes:
    """Malformed payloads in turn: what a broken or hostile implementation might send."""
    choice = number % 3
    if choice == 0:
        return b"\x91" * 100_000 + b"\xc0"  # an array nested 100,000 levels deep
    if choice == 1:
        return payload[: len(payload) // 2]  # truncated
    return torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(number),
                         dtype=torch.uint8).numpy().tobytes()


def attack_of(attacks: tuple[AttackConfig, ...], peer: str) -> AttackConfig | None:
    """The attack `peer` runs, if any (the config allows at most one per peer)."""
    return next((a for a in attacks if peer in a.peers), None)
