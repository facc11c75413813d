"""A peer's local training between two gossip rounds: plain LoRA, or CoMiGS's bi-level schedule.

Both trainers own their optimizers and batch streams, so that a checkpoint can save them and a
resumed peer continues with the same batches and the same optimizer moments.

The bi-level schedule (docs/algorithms.md, section 2): the experts (every A/B tensor) train on the
training split; every `router_every` expert steps, the routers alone train on the validation
split. BilevelOptimizers and BilevelTrainer run it whatever the model; ExpertTrainer runs it on
a host's expert layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from p2pfed.config import ConfigError, ExpertsConfig, TrainingConfig
from p2pfed.data import PeerData, batches
from p2pfed.experts import is_router, mean_load_balancing_loss
from p2pfed.model import AdapterHost, lm_loss, train_steps
from p2pfed.seeding import generator

Batch = TypeVar("Batch")


class LocalTrainer(Protocol):
    def train(self, steps: int) -> float:
        """`steps` training steps of the peer's adapter; returns the mean training loss."""
        ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def streams(self) -> dict: ...


@dataclass
class LoraTrainer:
    host: AdapterHost
    adapter: Mapping[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    stream: object  # endless training batches

    def train(self, steps: int) -> float:
        return train_steps(self.host, self.adapter, self.optimizer, self.stream, steps)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adapter": self.optimizer}

    def streams(self) -> dict:
        return {"train": self.stream}


# ---------------------------------------------------------------------------
# The bi-level schedule: experts on the training split, the router alone on the validation split.

@dataclass
class BilevelOptimizers:
    experts: torch.optim.Optimizer  # every A/B tensor, stepped on training batches
    router: torch.optim.Optimizer  # every router, stepped on validation batches
    expert_params: list[Tensor]
    router_params: list[Tensor]


def bilevel_optimizers(params: Mapping[str, Tensor], expert_lr: float, router_lr: float,
                       weight_decay: float = 0.0) -> BilevelOptimizers:
    """Two AdamW optimizers over disjoint halves of a peer's tensors, split by `is_router`."""
    expert_params = [t for name, t in params.items() if not is_router(name)]
    router_params = [t for name, t in params.items() if is_router(name)]
    if not expert_params or not router_params:
        raise ValueError("bi-level training needs both expert and router tensors")
    return BilevelOptimizers(
        experts=torch.optim.AdamW(expert_params, lr=expert_lr, weight_decay=weight_decay),
        router=torch.optim.AdamW(router_params, lr=router_lr, weight_decay=weight_decay),
        expert_params=expert_params, router_params=router_params,
    )


@dataclass(frozen=True)
class BilevelStats:
    expert_loss: float  # mean over this round's expert steps
    router_loss: float | None  # mean over its router steps; None when the router did not train
    expert_steps: int
    router_steps: int


@dataclass
class BilevelTrainer:
    """Every `router_every` expert steps, the router alone takes `router_steps` steps.

    No leak between the phases: the other phase's tensors have requires_grad off, so no gradient
    for them is even computed, and every phase switch drops all gradients (set to None, not zero:
    AdamW would still move a tensor with a zero gradient by its momentum).
    """

    optimizers: BilevelOptimizers
    router_every: int
    router_steps: int
    # Counts across rounds: the router's schedule follows expert steps, not rounds.
    expert_steps_done: int = 0

    def __post_init__(self) -> None:
        if self.router_every < 1 or self.router_steps < 0:
            raise ConfigError(f"router_every must be at least 1 and router_steps at least 0, got "
                              f"{self.router_every} and {self.router_steps}")

    def train_round(self, steps: int, expert_loss: Callable[[Batch], Tensor], train_batches: Iterator[Batch],
                    val_batches: Iterator[Batch], router_loss: Callable[[Batch], Tensor] | None = None
                    ) -> BilevelStats:
        """`steps` expert steps on training batches with the router phases they call for.

        The loss callables run the model (pointed at the peer's tensors by the caller);
        `router_loss` defaults to `expert_loss`. Afterwards every tensor trains again and no
        gradient is left over.
        """
        router_loss = router_loss or expert_loss
        opt = self.optimizers
        expert_total, router_losses = 0.0, []
        try:
            self._enter(opt.expert_params, opt.router_params)
            for _ in range(steps):
                expert_total += _step(opt.experts, expert_loss, next(train_batches))
                self.expert_steps_done += 1
                if self.router_steps and self.expert_steps_done % self.router_every == 0:
                    self._enter(opt.router_params, opt.expert_params)
                    router_losses += [_step(opt.router, router_loss, next(val_batches))
                                      for _ in range(self.router_steps)]
                    self._enter(opt.expert_params, opt.router_params)
        finally:
            self._enter([*opt.expert_params, *opt.router_params], [])
        return BilevelStats(
            expert_loss=expert_total / steps if steps else math.nan,
            router_loss=sum(router_losses) / len(router_losses) if router_losses else None,
            expert_steps=steps, router_steps=len(router_losses),
        )

    @staticmethod
    def _enter(trained: Iterable[Tensor], frozen: Iterable[Tensor]) -> None:
        for tensor in frozen:
            tensor.grad = None
            tensor.requires_grad_(False)
        for tensor in trained:
            tensor.grad = None
            tensor.requires_grad_(True)


def _step(optimizer: torch.optim.Optimizer, loss_fn: Callable[[Batch], Tensor], batch: Batch) -> float:
    loss = loss_fn(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@dataclass
class ExpertTrainer:
    """Experts on the training split; every `router_every` expert steps, the router alone on validation."""

    host: AdapterHost
    adapter: Mapping[str, nn.Parameter]
    schedule: BilevelTrainer
    train_stream: object
    val_stream: object
    load_balancing: float

    def train(self, steps: int) -> float:
        with self.host.using(self.adapter) as model:
            def router_loss(batch: torch.Tensor) -> torch.Tensor:
                # The load-balancing loss belongs to the router phase: only routers can act on it (a
                # router's input is detached, so in the expert phase it would have no gradient at all).
                loss = lm_loss(model, batch)
                balance = mean_load_balancing_loss(model)  # None where every token keeps every expert
                return loss if balance is None or not self.load_balancing else loss + self.load_balancing * balance

            stats = self.schedule.train_round(steps, lambda batch: lm_loss(model, batch), self.train_stream,
                                              self.val_stream, router_loss=router_loss)
        return stats.expert_loss

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"experts": self.schedule.optimizers.experts, "router": self.schedule.optimizers.router}

    def streams(self) -> dict:
        return {"train": self.train_stream, "val": self.val_stream}


def make_trainer(host: AdapterHost, adapter: Mapping[str, nn.Parameter], data: PeerData, training: TrainingConfig,
                 experts: ExpertsConfig, seed: int, name: str) -> LocalTrainer:
    train_stream = batches(data.train, training.batch_size, generator(seed, "batches", name))
    if not any(n.endswith(".router") for n in adapter):
        optimizer = torch.optim.AdamW(adapter.values(), lr=training.lr, weight_decay=training.weight_decay)
        return LoraTrainer(host, adapter, optimizer, train_stream)
    optimizers = bilevel_optimizers(adapter, training.lr, experts.router_lr, training.weight_decay)
    schedule = BilevelTrainer(optimizers, experts.router_every, experts.router_steps)
    val_stream = batches(data.val, training.batch_size, generator(seed, "router-batches", name))
    return ExpertTrainer(host, adapter, schedule, train_stream, val_stream, experts.load_balancing)
