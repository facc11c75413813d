"""A peer's local training between two gossip rounds: plain LoRA, or CoMiGS's bi-level schedule.

Both trainers own their optimizers and batch streams, so that a checkpoint can save them and a
resumed peer continues with the same batches and the same optimizer moments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from p2pfed.config import ExpertsConfig, TrainingConfig
from p2pfed.data import PeerData, batches
from p2pfed.experts import BilevelTrainer, bilevel_optimizers, mean_load_balancing_loss
from p2pfed.model import AdapterHost, lm_loss, train_steps
from p2pfed.seeding import generator


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
            def expert_loss(batch: torch.Tensor) -> torch.Tensor:
                loss = lm_loss(model, batch)
                balance = mean_load_balancing_loss(model)  # None where every token keeps every expert
                return loss if balance is None or not self.load_balancing else loss + self.load_balancing * balance

            stats = self.schedule.train_round(steps, expert_loss, self.train_stream, self.val_stream,
                                              router_loss=lambda batch: lm_loss(model, batch))
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
