"""The CoMiGS expert layer against one plain LoRA of the same total rank, on a GPT-2-style MLP.

The layer pair: c_fc (Conv1D, n_embd -> 4 n_embd), tanh-GELU, c_proj (Conv1D, 4 n_embd -> n_embd),
frozen, on a batch of 8 x 128 tokens. One training step: forward, mean-square loss, backward,
AdamW on the adapter tensors only. The input requires grad, as in a middle layer whose gradient
must flow on to the adapters before it. Sides, timed interleaved in one run (medians):

    experts        MixtureOfLoraExperts on both linears, 1 generalist + 1 specialist of rank r, top-2,
                   pointed at a peer's tensors by an AdapterHost as the swarm does: an expert-phase
                   step as training.BilevelTrainer runs it (routers frozen, AdamW on A and B)
    lora           a minimal hand-written LoRA of rank 2r on both linears: base(x) + s (x A^T) B^T
    experts_top1   the same expert step with top-1 (dense: every expert is computed, then masked)
    experts_joint  experts and routers trained together in one step (no bi-level split)
    router         a router-phase step (experts frozen, AdamW on the routers)
    peft           peft's LoRA of rank 2r on both linears (what model.py trains for plain LoRA)

The ratio that counts is experts / lora; target at most 1.2x at n_embd 64. Sizes: n_embd 64 (the project's
default tiny model) and 256.

    .venv/bin/python benchmarks/expert_layer.py [--repeats N] [--rank R]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from common import interleaved, median, setup
from p2pfed.config import ExpertsConfig, LoraConfig, lora_scale
from p2pfed.data import ByteTokenizer
from p2pfed.experts import is_router
from p2pfed.model import BaseModel, attach_adapters

SIZES = (64, 256)
BATCH, LENGTH = 8, 128
RANK = 8  # per expert; the plain LoRA gets 2 x RANK
ALPHA = 16.0
TARGET = 1.2
SEED = 0
TARGETS = ("c_fc", "c_proj")


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = Conv1D(4 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, 4 * n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class PlainLora(nn.Module):
    """The least a LoRA layer computes: the frozen base plus s (x A^T) B^T."""

    def __init__(self, base: Conv1D, rank: int, generator: torch.Generator):
        super().__init__()
        n_in, n_out = base.weight.shape
        self.base = base
        self.scale = lora_scale(ALPHA, rank)
        self.A = nn.Parameter((torch.rand(rank, n_in, generator=generator) * 2 - 1) / n_in**0.5)
        self.B = nn.Parameter(torch.randn(n_out, rank, generator=generator) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale


def frozen_mlp(n_embd: int) -> MLP:
    with torch.random.fork_rng(devices=[]):  # Conv1D initialises from the global RNG
        torch.manual_seed(SEED)
        return MLP(n_embd).requires_grad_(False)


def training_step(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        loss = model(x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def expert_side(n_embd: int, rank: int, top_k: int, x: torch.Tensor,
                phase: str = "experts") -> Callable[[], None]:
    """A step of one bi-level phase: "experts" (routers frozen), "router" (experts frozen) or "joint" (all)."""
    # Plain LoRA targets the same linears, so the host holds expert layers only.
    base = BaseModel(model=frozen_mlp(n_embd), tokenizer=ByteTokenizer(), context=LENGTH, family="gpt2")
    host = attach_adapters(base, LoraConfig(rank=rank, alpha=ALPHA, target_modules=TARGETS),
                           ExpertsConfig(top_k=top_k, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(SEED)
    # A peer's own tensors pointed into the shared layers; B nonzero so the router learns.
    state = {name: nn.Parameter(t if not name.endswith("_B") else torch.randn(t.shape, generator=generator) * 0.01)
             for name, t in host.initial_adapter(SEED, host.layout(rank, 1, 1)).items()}
    trained = {"experts": lambda name: not is_router(name), "router": is_router, "joint": lambda name: True}[phase]
    for name, tensor in state.items():
        tensor.requires_grad_(trained(name))  # as BilevelTrainer freezes the other phase's tensors
    step = training_step(host.model, [t for name, t in state.items() if trained(name)], x)

    def pointed() -> None:
        with host.using(state):
            step()

    return pointed


def lora_side(n_embd: int, rank: int, x: torch.Tensor) -> Callable[[], None]:
    model = frozen_mlp(n_embd)
    generator = torch.Generator().manual_seed(SEED)
    model.c_fc = PlainLora(model.c_fc, rank, generator)
    model.c_proj = PlainLora(model.c_proj, rank, generator)
    return training_step(model, [p for p in model.parameters() if p.requires_grad], x)


def peft_side(n_embd: int, rank: int, x: torch.Tensor) -> Callable[[], None]:
    from peft import LoraConfig, inject_adapter_in_model

    model = frozen_mlp(n_embd)
    config = LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["c_fc", "c_proj"],
                        fan_in_fan_out=True, init_lora_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about Conv1D
        model = inject_adapter_in_model(config, model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(SEED)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return training_step(model, [p for p in model.parameters() if p.requires_grad], x)


def main(repeats: int = 25, rank: int = RANK) -> dict:
    setup()
    results: dict = {"rank_per_expert": rank, "plain_rank": 2 * rank, "batch": [BATCH, LENGTH], "target": TARGET}
    for n_embd in SIZES:
        x = torch.randn(BATCH, LENGTH, n_embd, generator=torch.Generator().manual_seed(SEED), requires_grad=True)
        sides = {
            "experts": expert_side(n_embd, rank, 2, x),
            "lora": lora_side(n_embd, 2 * rank, x),
            "experts_top1": expert_side(n_embd, rank, 1, x),
            "experts_joint": expert_side(n_embd, rank, 2, x, "joint"),
            "router": expert_side(n_embd, rank, 2, x, "router"),
            "peft": peft_side(n_embd, 2 * rank, x),
        }
        times = interleaved(sides, repeats, warmup=2)
        ms = {name: median(values) * 1e3 for name, values in times.items()}
        row = {f"{name}_ms": round(value, 3) for name, value in ms.items()}
        row.update({f"ratio_{name}_vs_lora": round(ms[name] / ms["lora"], 3) for name in ms if name != "lora"})
        print(f"n_embd {n_embd}, {BATCH}x{LENGTH} tokens, experts rank {rank}+{rank}, LoRA rank {2 * rank}: "
              f"median step ms and ratio to lora")
        for name, value in ms.items():
            note = f"  (target <= {TARGET}x)" if name == "experts" else ""
            print(f"    {name:14s} {value:8.2f} ms  {value / ms['lora']:5.2f}x{note}")
        results[f"n_embd_{n_embd}"] = row
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--rank", type=int, default=RANK)
    arguments = parser.parse_args()
    main(arguments.repeats, arguments.rank)
