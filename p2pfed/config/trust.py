"""The trust section: `[trust]` and its per-scheme temperatures."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from p2pfed.config.checks import check


@dataclass(frozen=True)
class TemperatureConfig:
    # Each score lives on its own scale, so each scheme has its own temperature.
    weights: float = 0.1
    validation: float = 0.05
    predictions: float = 0.05


@dataclass(frozen=True)
class TrustConfig:
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    top_k: int = 0  # keep the k best-scored neighbours (self always kept); 0 keeps all
    threshold: float | None = None  # drop neighbours whose weight falls below it
    fedavg_weights: Literal["uniform", "metropolis_hastings", "data_size"] = "uniform"
    weights_compare: Literal["update", "adapter"] = "update"
    # A neighbour's update (its distance from the shared init) may be at most this many times as long
    # as the peer's own, else it is dropped: a scaled or extreme update never reaches the aggregate.
    # 0 turns the check off.
    max_norm_ratio: float = 10.0
    # The robust baselines (schemes "median", "trimmed-mean", "krum"), which ignore trust:
    trim_fraction: float = 0.2  # trimmed-mean drops this share of the values at each end, per coordinate
    krum_byzantine: int = 1  # Krum's f: attackers assumed among a peer's neighbours
    predictions_top_k: int = 32  # next-token distributions are compared on their top-k tokens
    predictions_distance: Literal["kl", "l1"] = "kl"
    # Validation blocks the "adaptive" rule scores on each round: a window that moves on every round (each
    # block is used in turn), so scoring costs a fraction of a round's training. 0: every block.
    score_blocks: int = 4
    # The "adaptive" rule's candidate rows: softmaxes of its validation scores at each of these temperatures,
    # and the uniform row (FedAvg); it keeps the row whose aggregate has the lowest validation loss.
    adaptive_temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    # The "spread" rule (the default) scores on the first score_tokens tokens of every validation block (0: whole
    # blocks): the peer's whole data mixture, where a window of a few whole blocks may hold mostly one group.
    score_tokens: int = 48
    # Its kernel's width: this many standard deviations of the round's validation scores (over the peer and its
    # neighbours), clamped to [spread_floor, spread_ceiling] (nats of mean loss): the floor for neighbourhoods
    # whose scores differ only by noise, the ceiling against one wild score widening the spread. Measured in
    # seven settings: README, "Trust in seven settings".
    spread_width: float = 0.5
    spread_floor: float = 0.02
    spread_ceiling: float = 0.1

    def validate(self) -> None:
        for scheme, tau in dataclasses.asdict(self.temperature).items():
            check(tau > 0, f"trust.temperature.{scheme}", "must be positive")
        check(all(t > 0 for t in self.adaptive_temperatures), "trust.adaptive_temperatures", "must all be positive")
        check(self.spread_width > 0, "trust.spread_width", "must be positive")
        check(0 < self.spread_floor <= self.spread_ceiling, "trust.spread_floor",
              "must be positive and at most trust.spread_ceiling")
        check(self.score_tokens >= 0, "trust.score_tokens", "must not be negative (0 scores whole blocks)")
        check(self.score_blocks >= 0, "trust.score_blocks", "must not be negative (0 scores on every block)")
        check(self.top_k >= 0, "trust.top_k", "must not be negative")
        check(self.threshold is None or 0 <= self.threshold < 1, "trust.threshold", "must be in [0, 1)")
        check(self.predictions_top_k >= 1, "trust.predictions_top_k", "must be at least 1")
        check(self.max_norm_ratio >= 0, "trust.max_norm_ratio", "must not be negative (0 turns it off)")
        check(0 <= self.trim_fraction < 0.5, "trust.trim_fraction", "must be in [0, 0.5)")
        check(self.krum_byzantine >= 0, "trust.krum_byzantine", "must not be negative")
