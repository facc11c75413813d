"""The round loop of one peer: train k local steps -> send the shared adapter to neighbours -> take what arrived by the
deadline -> trust -> aggregate -> evaluate. The same code runs in simulation and on the network;
only the endpoint differs.

A peer knows its own data, its neighbours' names and what they sent; never the global graph.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import torch
import trio

from p2pfed import aggregate, evaluate
from p2pfed.checkpoint import CheckpointError, PeerCheckpoint, load_checkpoint, save_checkpoint
from p2pfed.config import ExpertsConfig, NetworkConfig, TrainingConfig, TrustConfig
from p2pfed.data import PeerData
from p2pfed.experts import is_shared
from p2pfed.model import AdapterHost, AdapterLayout, trainable_copy
from p2pfed.net import wire
from p2pfed.net.transport import Endpoint
from p2pfed.records import PeerResult, RoundRecord, Selected
from p2pfed.routing import routing_shares
from p2pfed.selection import BestRound
from p2pfed.strategies import (
    AGGREGATORS,
    TRUST_RULES,
    AggregationInputs,
    Scheme,
    TrustInputs,
    TrustRule,
    trust_weights,
)
from p2pfed.training import LocalTrainer, make_trainer

log = logging.getLogger(__name__)
T = TypeVar("T")


class Schedule(Protocol):
    """Who a peer talks to in each round, and whether it takes part at all (topology.NeighbourSchedule)."""

    def takes_part(self, round_index: int) -> bool: ...

    def neighbours_at(self, round_index: int) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class PeerSpec:
    name: str
    # Everyone this peer may hear from; without a schedule, its neighbours in every round.
    neighbours: tuple[str, ...]
    scheme: Scheme
    layout: AdapterLayout
    seed: int
    training: TrainingConfig
    trust: TrustConfig
    experts: ExpertsConfig = ExpertsConfig()
    network: NetworkConfig = NetworkConfig()  # encoding, round deadline and message size cap
    # Only the oracle baseline may know its neighbours' data mixtures; no real scheme uses them.
    oracle_mixtures: Mapping[str, Mapping[str, float]] | None = None
    # Where the peer checkpoints, every `checkpoint_every` rounds and when stopped between rounds;
    # a peer started with a state folder that holds a checkpoint resumes from it. None: no checkpoints.
    state_dir: str | None = None
    checkpoint_every: int = 1
    # Its neighbours round by round (a time-varying graph, peers joining and leaving); None: `neighbours`.
    schedule: Schedule | None = None

    def takes_part(self, round_index: int) -> bool:
        return self.schedule is None or self.schedule.takes_part(round_index)

    def neighbours_at(self, round_index: int) -> tuple[str, ...]:
        """This peer's neighbours in `round_index`: all the loop knows of the graph."""
        return self.neighbours if self.schedule is None else self.schedule.neighbours_at(round_index)


async def run_inline(work: Callable[[], T]) -> T:
    """Compute on the event loop: the simulation's choice, where every peer shares one thread anyway."""
    return work()


@dataclass(frozen=True)
class PeerHooks:
    """What a peer tells its owner as it runs (the swarm's progress bar, an embedding app's events)."""

    on_round: Callable[[str, RoundRecord], None] | None = None  # (peer, record) after every round
    on_update: Callable[[str, wire.UpdateMessage], None] | None = None  # (peer, update) for each accepted update
    # Runs the model work of a round (training, trust scores, aggregation, evaluation). A networked peer
    # runs it in a worker thread, so that the event loop keeps reading from the network meanwhile.
    compute: Callable[[Callable[[], T]], Awaitable[T]] = run_inline
    # Runs work that does not touch the model (decoding and checking a received update); a networked
    # peer runs it in a worker thread too, without waiting for the model.
    offload: Callable[[Callable[[], T]], Awaitable[T]] = run_inline


class UpdateInbox:
    """Neighbours' updates by round. A fast neighbour's next-round update waits here for the next round
    instead of replacing the one this round needs; an update at most one round stale stands in for a late one.

    What it holds is bounded: at most max_ahead + 2 updates per sender (rounds r-1 to r+max_ahead), senders
    only the peer's possible neighbours (PeerLoop._collect drops others), each update within
    network.max_message_bytes and, unless ranks may differ, exactly the shapes of the peer's own shared tensors.
    """

    def __init__(self, max_ahead: int):
        self.max_ahead = max_ahead
        self._by_sender: dict[str, dict[int, wire.UpdateMessage]] = {}

    def put(self, message: wire.UpdateMessage, current_round: int) -> bool:
        if not current_round - 1 <= message.round <= current_round + self.max_ahead:
            return False  # too old to use, or too far ahead to be honest: do not let it take memory
        self._by_sender.setdefault(message.sender, {})[message.round] = message
        return True

    def has_reached(self, sender: str, round_index: int) -> bool:
        return any(r >= round_index for r in self._by_sender.get(sender, {}))

    def for_round(self, round_index: int) -> dict[str, wire.UpdateMessage]:
        """Each neighbour's newest update from this round or the one before; older ones are forgotten."""
        chosen = {}
        for sender, rounds in self._by_sender.items():
            for old in [r for r in rounds if r < round_index - 1]:
                del rounds[old]
            usable = [r for r in rounds if r <= round_index]
            if usable:
                chosen[sender] = rounds[max(usable)]
        return chosen

    def held(self) -> int:
        """How many updates the inbox holds now."""
        return sum(len(rounds) for rounds in self._by_sender.values())

    def release_before(self, round_index: int) -> None:
        """Forget updates older than `round_index` now: from here on only rounds >= round_index can be used
        (for_round of the next round would drop them too, but only after that round's training and wait)."""
        for rounds in self._by_sender.values():
            for old in [r for r in rounds if r < round_index]:
                del rounds[old]


class PeerLoop:
    """One participant. Construction stores references only; `run()` does the work."""

    def __init__(self, spec: PeerSpec, host: AdapterHost, data: PeerData, endpoint: Endpoint,
                 initial_adapter: Mapping[str, torch.Tensor], hooks: PeerHooks = PeerHooks()):
        self.spec = spec
        self.host = host
        self.data = data
        self.endpoint = endpoint
        self.initial_adapter = initial_adapter
        self.hooks = hooks
        self.adapter: dict[str, torch.nn.Parameter] | None = None  # the live adapter, once run() has started
        self._early: list[tuple[str, bytes]] = []  # received while waiting to hear from the swarm (a newcomer)
        self._caught_up = True  # False after rounds sat out by the schedule, until a neighbour is heard from
        self._best = BestRound()  # training.select_best: the adapter of the lowest validation loss so far

    def communicates(self, round_index: int) -> bool:
        return self.spec.scheme.shares_anything and bool(self.spec.neighbours_at(round_index))

    @property
    def flexible_rank(self) -> bool:
        """Whether neighbours may hold other ranks than this peer (their factors are projected, not averaged)."""
        return self.spec.scheme.mixed_ranks

    def expected_shapes(self, adapter: Mapping[str, torch.Tensor]) -> dict[str, tuple[int | None, ...]]:
        """The shared tensors a neighbour's update must hold; the rank dimension is free when ranks may differ."""
        shapes: dict[str, tuple[int | None, ...]] = {}
        for name, tensor in adapter.items():
            if not is_shared(name):
                continue
            shape: tuple[int | None, ...] = tuple(tensor.shape)
            if self.flexible_rank:
                shape = (None, shape[1]) if name.endswith("lora_A") else (shape[0], None)
            shapes[name] = shape
        return shapes

    async def run(self) -> PeerResult:
        spec, training = self.spec, self.spec.training
        adapter = trainable_copy(self.initial_adapter)
        self.adapter = adapter
        trainer = make_trainer(self.host, adapter, self.data, training, spec.experts, spec.seed, spec.name)
        expected_shapes = self.expected_shapes(adapter)
        inbox = UpdateInbox(max_ahead=2)
        result = PeerResult(spec.name)
        steps, saved_round = 0, 0
        checkpoint = self._load_checkpoint()
        if checkpoint is None:
            test_ppl = await self.hooks.compute(partial(self._test_ppl, adapter))
            val_loss = await self.hooks.compute(partial(self._select, 0, adapter))
            self._record(result, RoundRecord(0, 0, None, test_ppl, {}, (), 0, val_loss=val_loss))
        else:
            steps, saved_round = checkpoint.steps, checkpoint.round
            self._restore(checkpoint, adapter, trainer, result)
        self._early, self._caught_up = [], saved_round == 0 or spec.takes_part(saved_round)
        at_round_end = True
        try:
            for round_index in range(saved_round + 1, training.rounds + 1):
                at_round_end = False
                record = await self._round(round_index, adapter, trainer, inbox, expected_shapes, steps)
                steps = record.steps
                self._record(result, record)
                at_round_end = True
                if spec.state_dir and (round_index % spec.checkpoint_every == 0 or round_index == training.rounds):
                    self._save(adapter, trainer, result, steps)
                    saved_round = round_index
                await trio.sleep(0)  # let other peers and the transport run between rounds
            result.selected = await self.hooks.compute(partial(self._keep_best, adapter))
        finally:
            # Stopped between rounds: keep what the last rounds did. Stopped mid-round: the adapter holds a
            # half-done round, so the last checkpoint (at most checkpoint_every rounds old) stands.
            last = result.rounds[-1].round
            if spec.state_dir and at_round_end and last > saved_round:
                self._save(adapter, trainer, result, steps)
        return result

    async def _round(self, round_index: int, adapter, trainer: LocalTrainer, inbox: "UpdateInbox",
                     expected_shapes, steps: int) -> RoundRecord:
        spec, training = self.spec, self.spec.training
        if not spec.takes_part(round_index):
            # Not joined yet, or left: no training, no messages; nobody waits for it (it is not their neighbour).
            self._caught_up = False
            return RoundRecord(round_index, steps, None, None, {}, (), self.endpoint.bytes_sent, online=False)
        if not self.endpoint.online(round_index):
            # Churn: the device is away for this round; neighbours go on without it.
            return RoundRecord(round_index, steps, None, None, {}, (), self.endpoint.bytes_sent, online=False)
        neighbours = spec.neighbours_at(round_index)
        if self.communicates(round_index) and not self._caught_up:
            await self._hear_from_the_swarm(round_index)
        compute = self.hooks.compute
        train_loss = await compute(partial(trainer.train, training.local_steps))
        steps += training.local_steps
        weights: dict[str, float] = {}
        missing: tuple[str, ...] = ()
        if self.communicates(round_index) and steps > training.warmup_steps:
            await self._send(adapter, round_index, neighbours)
            await self._collect(inbox, round_index, neighbours, expected_shapes, self._norm_bound(adapter))
            # Only this round's neighbours count: a late update from last round's neighbour is not aggregated.
            usable = {n: m for n, m in inbox.for_round(round_index).items() if n in neighbours}
            missing = tuple(n for n in neighbours if n not in usable or usable[n].round != round_index)
            rule = TRUST_RULES[spec.scheme.trust]
            run = compute if rule.runs_model else self.hooks.offload
            weights = await run(partial(self._weights, rule, adapter, usable, len(neighbours), round_index))
            await compute(partial(self._aggregate, adapter, usable, weights))
            inbox.release_before(round_index)  # the updates only this round could use: not held through the next
        evaluate_now = round_index % training.eval_every == 0 or round_index == training.rounds
        test_ppl = await compute(partial(self._test_ppl, adapter)) if evaluate_now else None
        routing = await compute(partial(self._routing, adapter)) if evaluate_now else {}
        val_loss = await compute(partial(self._select, round_index, adapter))
        return RoundRecord(round_index, steps, train_loss, test_ppl, weights, missing, self.endpoint.bytes_sent,
                           neighbours=neighbours, val_loss=val_loss, routing=routing)

    async def _hear_from_the_swarm(self, round_index: int) -> None:
        """A newcomer (it sat rounds out) waits for its first neighbour's update before it trains.

        It skipped the rounds it sat out at once, so it may be far ahead of the swarm: sent now, its update
        would arrive rounds early and be dropped. Nobody sends to it before it is their neighbour, so the
        first message means the swarm has reached this round. The wait is bounded by a deadline per round.
        """
        with trio.move_on_after(self.spec.network.round_timeout_s * round_index):
            self._early.append(await self.endpoint.receive())
        self._caught_up = True

    # -- checkpoints ------------------------------------------------------------------------

    def _identity(self) -> dict:
        spec = self.spec
        # "method" is the key checkpoints of format 1 were written with.
        return {"peer": spec.name, "method": spec.scheme.name, "layout": dataclasses.asdict(spec.layout),
                "seed": spec.seed}

    def _load_checkpoint(self) -> PeerCheckpoint | None:
        if not self.spec.state_dir:
            return None
        checkpoint = load_checkpoint(self.spec.state_dir)
        if checkpoint is not None and checkpoint.meta.get("identity") != self._identity():
            raise CheckpointError(
                f"{self.spec.state_dir} holds the checkpoint of {checkpoint.meta.get('identity')}, not of "
                f"{self._identity()}: give this peer its own state folder (or move that one away to start afresh)")
        return checkpoint

    def _restore(self, checkpoint: PeerCheckpoint, adapter, trainer: LocalTrainer, result: PeerResult) -> None:
        with torch.no_grad():
            for name, parameter in adapter.items():
                parameter.copy_(checkpoint.tensors[name])
        for name, optimizer in trainer.optimizers().items():
            optimizer.load_state_dict(checkpoint.optimizers[name])
        for name, stream in trainer.streams().items():
            stream.restore(checkpoint.streams[name])
        result.rounds.extend(RoundRecord.from_dict(r) for r in checkpoint.history)
        self._best = BestRound.from_meta(checkpoint.meta.get("best"))
        log.info("%s: resumed from %s after round %d", self.spec.name, self.spec.state_dir, checkpoint.round)

    def _save(self, adapter, trainer: LocalTrainer, result: PeerResult, steps: int) -> None:
        save_checkpoint(self.spec.state_dir, PeerCheckpoint(
            round=result.rounds[-1].round, steps=steps,
            tensors={name: p.detach() for name, p in adapter.items()},
            optimizers={name: o.state_dict() for name, o in trainer.optimizers().items()},
            streams={name: s.state() for name, s in trainer.streams().items()},
            trust=dict(result.final_trust), history=result.to_json()["rounds"],
            meta={"identity": self._identity(), "best": self._best.to_meta()},
        ))

    # -- the steps of a round -------------------------------------------------------------

    async def _send(self, adapter, round_index: int, neighbours: tuple[str, ...]) -> None:
        message = wire.UpdateMessage(
            sender=self.spec.name, round=round_index,
            tensors={name: p.detach() for name, p in adapter.items() if is_shared(name)},
            degree=len(neighbours), num_samples=int(self.data.train.numel()),
        )
        payload = wire.encode_update(message, self.spec.network.encoding)
        send_many = getattr(self.endpoint, "send_many", None)  # net.transport.SendsMany, where the endpoint has it
        if send_many is not None:
            await send_many(neighbours, payload)  # on libp2p all at once: a round waits for one ack, not one each
            return
        for neighbour in neighbours:
            await self.endpoint.send(neighbour, payload)

    async def _collect(self, inbox: "UpdateInbox", round_index: int, neighbours: tuple[str, ...],
                       expected_shapes: Mapping[str, tuple[int | None, ...]], norm_bound: float) -> None:
        """Take updates until every neighbour's round update is in, or the deadline passes.

        Updates from any peer this one may hear from are kept (a neighbour of next round may be early)."""
        known = set(self.spec.neighbours)
        with trio.move_on_after(self.spec.network.round_timeout_s):
            while not all(inbox.has_reached(n, round_index) for n in neighbours):
                sender, payload = self._early.pop(0) if self._early else await self.endpoint.receive()
                if sender not in known:
                    log.warning("%s: dropped an update from %s, which is not a neighbour", self.spec.name, sender)
                    continue
                try:
                    message = await self.hooks.offload(partial(self._check, sender, payload, expected_shapes,
                                                               norm_bound))
                except Exception as error:  # whatever a neighbour sends, the peer goes on: one line, no payload
                    log.error("%s: dropped a bad update from %s: %s", self.spec.name, sender, _describe(error))
                    continue
                if not inbox.put(message, round_index):
                    log.warning("%s: dropped an update from %s for round %d (now round %d)", self.spec.name,
                                sender, message.round, round_index)
                elif self.hooks.on_update is not None:
                    self.hooks.on_update(self.spec.name, message)

    def _check(self, sender: str, payload: bytes, expected_shapes, norm_bound: float) -> wire.UpdateMessage:
        """Decode a neighbour's payload and check it; raises (wire.WireError, ValueError) on anything wrong."""
        limits = wire.WireLimits(max_bytes=self.spec.network.max_message_bytes)
        # Its float32 tensors view `payload`, which in-process neighbours share: read-only from here on.
        message = wire.decode_update(payload, expected_shapes, limits)
        message = dataclasses.replace(message, tensors=self.host.place(message.tensors))  # decoded on the CPU
        if message.sender != sender:
            raise ValueError("the update names another sender than the connection it came on")
        norm = self._update_norm(message.tensors)
        if not norm <= norm_bound:
            raise ValueError(f"its update norm {norm:.3g} is over {norm_bound:.3g} "
                             f"(trust.max_norm_ratio={self.spec.trust.max_norm_ratio:g} x this peer's own)")
        return message

    def _update_norm(self, shared: Mapping[str, torch.Tensor]) -> float:
        """How far an adapter's shared tensors moved from the seeded init: the norm of the update.

        Across ranks the factors live in different bases, so it is the norm of the full products s B A
        (B starts at zero, so that product is the update too).
        """
        if self.flexible_rank:
            pairs = aggregate.lora_pairs(shared, self.host.scale)  # also checks that the ranks of A and B agree
            return math.sqrt(sum(aggregate.product_sq_norm(f) for f in pairs.values()))
        total = 0.0
        for name, tensor in shared.items():
            total += float((tensor.double() - self.initial_adapter[name].double()).square().sum())
        return math.sqrt(total)

    def _norm_bound(self, adapter) -> float:
        ratio = self.spec.trust.max_norm_ratio
        if not ratio:
            return math.inf
        own = self._update_norm({n: p.detach() for n, p in adapter.items() if is_shared(n)})
        # An untrained peer has no scale to compare with yet.
        return ratio * own if own > 0 else math.inf

    def _weights(self, rule: TrustRule, adapter, received: Mapping[str, wire.UpdateMessage],
                 degree: int, round_index: int) -> dict[str, float]:
        spec = self.spec
        inputs = TrustInputs(
            peer=spec.name, own={name: p.detach() for name, p in adapter.items()}, initial=self.initial_adapter,
            received=received, degree=degree, train_tokens=int(self.data.train.numel()),
            settings=spec.trust, host=self.host, val=self.data.val, mixed_ranks=self.flexible_rank,
            oracle_mixtures=spec.oracle_mixtures, round=round_index, merge=partial(self._merged, adapter, received))
        return trust_weights(rule, inputs)

    def _merged(self, adapter, received: Mapping[str, wire.UpdateMessage], weights: Mapping[str, float]):
        """The shared tensors this scheme's aggregator makes of the peer's own and `received` under `weights`."""
        own = {name: p.detach() for name, p in adapter.items() if is_shared(name)}
        states = {self.spec.name: own, **{n: m.tensors for n, m in received.items()}}
        return AGGREGATORS[self.spec.scheme.aggregator].merge(AggregationInputs(
            peer=self.spec.name, states=states, weights=weights, scale=self.host.scale, settings=self.spec.trust))

    def _aggregate(self, adapter, received: Mapping[str, wire.UpdateMessage], weights: Mapping[str, float]) -> None:
        merged = self._merged(adapter, received, weights)
        if not all(bool(torch.isfinite(t).all()) for t in merged.values()):
            log.error("%s: the aggregate is not finite; keeping this peer's own adapter this round", self.spec.name)
            return
        with torch.no_grad():
            for name, tensor in merged.items():
                adapter[name].copy_(tensor)  # in place: the optimizer state stays attached and local

    def _test_ppl(self, adapter) -> float:
        return evaluate.perplexity(self.host, adapter, self.data.test)

    def _routing(self, adapter) -> dict[str, dict[str, float]]:
        return routing_shares(self.host, adapter, self.data.test) if self.host.expert_layers else {}

    def _select(self, round_index: int, adapter) -> float | None:
        """training.select_best: the adapter's validation loss, kept as the best if it is the lowest yet."""
        if not self.spec.training.select_best:
            return None
        val_loss = evaluate.mean_loss(self.host, adapter, self.data.val)
        self._best.offer(round_index, val_loss, {name: p.detach() for name, p in adapter.items()})
        return val_loss

    def _keep_best(self, adapter) -> Selected | None:
        """After the last round: the best round's adapter becomes the peer's model, and its test perplexity."""
        best = self._best
        if not self.spec.training.select_best or best.tensors is None:
            return None
        with torch.no_grad():
            for name, parameter in adapter.items():
                parameter.copy_(best.tensors[name])
        return Selected(best.round, best.val_loss, self._test_ppl(adapter))

    def _record(self, result: PeerResult, record: RoundRecord) -> None:
        result.rounds.append(record)
        if self.hooks.on_round is not None:
            self.hooks.on_round(self.spec.name, record)


def _describe(error: Exception) -> str:
    # Our own messages name no payload values; other exceptions may carry anything: their type only.
    if type(error) in (wire.WireError, ValueError):
        return str(error)[:300]
    return f"{type(error).__name__} while decoding"
