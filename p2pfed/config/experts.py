"""The CoMiGS expert section: `[experts]`."""

from __future__ import annotations

from dataclasses import dataclass

from p2pfed.config.checks import check


@dataclass(frozen=True)
class ExpertsConfig:
    """CoMiGS expert layers (docs/algorithms.md), used by the comigs-* schemes."""

    top_k: int = 2  # experts kept per token (clipped to the layer's number of experts)
    router_every: int = 2  # expert steps between router phases
    router_steps: int = 1  # router-only steps on the validation split per phase
    router_lr: float = 1e-2  # 1e-3 barely moved the gates in 10 rounds (docs/algorithms.md, section 2)
    load_balancing: float = 0.01  # weight of the load-balancing loss (only where top_k < experts)
    # Dotted suffixes of module paths; empty: the model family's MLP linears. Attention keeps a plain LoRA.
    target_modules: tuple[str, ...] = ()

    def validate(self) -> None:
        check(self.top_k >= 1, "experts.top_k", "must be at least 1")
        check(self.router_every >= 1, "experts.router_every", "must be at least 1")
        check(self.router_steps >= 0, "experts.router_steps", "must not be negative")
        check(self.router_lr > 0, "experts.router_lr", "must be positive")
        check(self.load_balancing >= 0, "experts.load_balancing", "must not be negative")
