"""The model, LoRA, data and training sections, and the peer profiles of peers/*.toml."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from p2pfed.config.checks import check


@dataclass(frozen=True)
class ModelConfig:
    # "tiny": a small GPT-2-style model built from this config and pretrained once on the
    # built-in generic corpus (cached); otherwise a local Hugging Face directory or a .gguf file.
    source: str = "tiny"
    gguf_file: str = ""
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    context: int = 128
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 1234
    cache_dir: str = ""  # empty: $P2PFED_CACHE or ~/.cache/p2pfed
    # Where the base model and the adapters live: "auto" (CUDA when torch sees a GPU, else the CPU), "cpu",
    # "cuda", "cuda:N" or "mps". Whether it exists is checked when the model loads (p2pfed.device).
    device: str = "auto"
    # The frozen base's dtype; adapters and their optimizer state stay float32 (see README, "Devices").
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def validate(self) -> None:
        check(self.context >= 8, "model.context", "must be at least 8")
        check(self.device in ("auto", "cpu", "cuda", "mps") or _is_cuda_index(self.device), "model.device",
              f"must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        check(self.dtype in ("fp32", "bf16", "fp16"), "model.dtype", f"must be fp32, bf16 or fp16, not {self.dtype!r}")
        check(self.n_embd % self.n_head == 0, "model.n_embd", "must be a multiple of model.n_head")
        check(self.pretrain_lr > 0, "model.pretrain_lr", "must be positive")


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The LoRA scale s of Delta W = s B A: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    # Empty: every attention and MLP linear the model family is known to have.
    target_modules: tuple[str, ...] = ()
    rslora: bool = False

    def scale(self, rank: int) -> float:
        """s for a peer of `rank`: alpha is the swarm's, the rank each peer's own."""
        return lora_scale(self.alpha, rank, self.rslora)


    def validate(self) -> None:
        check(self.rank >= 1, "lora.rank", "must be at least 1")
        check(self.alpha > 0, "lora.alpha", "must be positive (0 would switch every adapter off)")


@dataclass(frozen=True)
class DataConfig:
    # "builtin" or a folder holding one sub-folder (or one .txt file) of text per group.
    source: str = "builtin"
    groups: tuple[str, ...] = ("english", "italian")
    split: Literal["specific", "mixed", "dirichlet"] = "specific"
    own_fraction: float = 0.75  # "mixed": share of a peer's blocks drawn from its own group
    dirichlet_alpha: float = 0.5
    block_len: int = 128
    train_blocks: int = 48
    val_blocks: int = 16
    test_blocks: int = 24


    def validate(self, model: ModelConfig) -> None:
        check(len(self.groups) >= 1, "data.groups", "needs at least one group")
        check(0.0 < self.own_fraction <= 1.0, "data.own_fraction", "must be in (0, 1]")
        check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be positive")
        check(2 <= self.block_len <= model.context + 1 or model.source != "tiny",
              "data.block_len", f"must be in [2, model.context + 1 = {model.context + 1}]")
        for name in ("train_blocks", "val_blocks", "test_blocks"):
            check(getattr(self, name) >= 1, f"data.{name}", "must be at least 1")


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int = 10
    local_steps: int = 10
    warmup_steps: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    eval_every: int = 1  # rounds between test-perplexity evaluations (the last round always)
    # Keep the adapter of the round with the lowest validation loss (early stopping) as the peer's final
    # model; results report it beside the last round's. Costs one pass over the validation blocks a round.
    select_best: bool = True

    def validate(self) -> None:
        check(self.rounds >= 1, "training.rounds", "must be at least 1")
        check(self.local_steps >= 1, "training.local_steps", "must be at least 1")
        check(self.warmup_steps >= 0, "training.warmup_steps", "must not be negative")
        check(self.batch_size >= 1, "training.batch_size", "must be at least 1")
        check(self.lr > 0, "training.lr", "must be positive")
        check(self.weight_decay >= 0, "training.weight_decay", "must not be negative")
        check(self.eval_every >= 1, "training.eval_every", "must be at least 1")


@dataclass(frozen=True)
class PeerProfile:
    """What one kind of peer can afford: peers/*.toml. Unset fields take the experiment's values."""

    name: str = "default"
    rank: int | None = None  # LoRA rank (also the rank of its experts); None: lora.rank
    specialists: int | None = None  # specialist experts under comigs methods that have any; None: the method's

