"""CoMiGS expert layers: a frozen linear with generalist and specialist LoRA experts and a router.

docs/algorithms.md, section 2. Each adapted layer computes

    y = W x + sum_e g_e * s * B_e A_e x,     g = top-k(softmax(router(rms_norm(x))))

Generalists are shared with neighbours; specialists and the router never leave the peer. That
split is declared once, in TENSOR_KINDS; everything else asks `is_shared` / `is_router`.

As with plain LoRA, one frozen base model serves every peer of a process: each expert tensor is
a plain entry of a layer's `_parameters`, so model.AdapterHost points it at a peer's own tensor
for the duration of a pass, through the same slots as LoRA tensors. The layer reads the number
of experts and the rank from the tensors it finds there at forward time, so the layer itself
does not fix them.

Bi-level training (experts on the training split, the router alone on validation) is training.py's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from p2pfed.config import ConfigError, lora_scale

__all__ = [
    "TensorKind", "TENSOR_KINDS", "EXPERT_TENSORS", "MLP_TARGETS", "kind_of", "is_shared", "is_router",
    "ExpertLayerConfig", "Routing", "MixtureOfLoraExperts", "mean_load_balancing_loss", "attach_experts",
    "generalists_only",
    "init_tensor",
]


# ---------------------------------------------------------------------------
# Names: the one declaration of what is shared and which phase trains what.

@dataclass(frozen=True)
class TensorKind:
    shared: bool  # gossiped to neighbours and aggregated; otherwise it never leaves the peer
    phase: Literal["experts", "router"]  # the bi-level phase (and optimizer) that trains it


TENSOR_KINDS: Mapping[str, TensorKind] = MappingProxyType({
    "generalist_A": TensorKind(shared=True, phase="experts"),
    "generalist_B": TensorKind(shared=True, phase="experts"),
    "specialist_A": TensorKind(shared=False, phase="experts"),
    "specialist_B": TensorKind(shared=False, phase="experts"),
    "router": TensorKind(shared=False, phase="router"),
    # CoMiGS puts a plain LoRA on attention (peft's names): it is a generalist.
    "lora_A": TensorKind(shared=True, phase="experts"),
    "lora_B": TensorKind(shared=True, phase="experts"),
})

# The tensors of one MixtureOfLoraExperts, in the order a host's slots list them.
EXPERT_TENSORS = ("generalist_A", "generalist_B", "specialist_A", "specialist_B", "router")

# The MLP linears the paper puts experts on, per model family (dotted suffixes of module paths:
# "c_proj" alone would also catch GPT-2's attention output projection).
MLP_TARGETS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
    "llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "mistral": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "qwen2": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
})


def kind_of(name: str) -> TensorKind:
    """The kind of an adapter tensor, from the last component of its name.

    An unknown name is an error, not a default: guessing "local" would silently stop sharing a
    tensor, guessing "shared" would leak a private one.
    """
    suffix = name.rpartition(".")[2]
    try:
        return TENSOR_KINDS[suffix]
    except KeyError:
        raise ValueError(f"{name!r} is not an adapter tensor name (its last component must be one of "
                         f"{', '.join(TENSOR_KINDS)})") from None


def is_shared(name: str) -> bool:
    return kind_of(name).shared


def is_router(name: str) -> bool:
    return kind_of(name).phase == "router"


# ---------------------------------------------------------------------------
# The layer.

@dataclass(frozen=True)
class ExpertLayerConfig:
    n_generalists: int = 1
    n_specialists: int = 1
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2  # clipped to the number of experts a layer holds
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self) -> None:
        if self.n_generalists < 0 or self.n_specialists < 0 or self.n_experts < 1:
            raise ConfigError(f"experts: need at least one expert and no negative counts, got "
                              f"{self.n_generalists} generalists and {self.n_specialists} specialists")
        if self.rank < 1:
            raise ConfigError(f"experts.rank must be at least 1, got {self.rank}")
        if self.top_k < 1:
            raise ConfigError(f"experts.top_k must be at least 1, got {self.top_k}")

    @property
    def n_experts(self) -> int:
        return self.n_generalists + self.n_specialists


@dataclass(frozen=True)
class Routing:
    """What the router did in a layer's last forward pass."""

    probs: Tensor  # (tokens, E): the router's full softmax, before the top-k cut; carries its graph
    mask: Tensor | None  # (tokens, E): 1 where the expert is among the token's top k; None when k = E
    top_k: int
    gates: Tensor  # (tokens, E): what multiplies each expert's output (0 outside the top k)


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) of a frozen nn.Linear (weight out x in) or a GPT-2 Conv1D (weight in x out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"experts wrap nn.Linear or transformers' Conv1D, not {type(base).__name__}")


class MixtureOfLoraExperts(nn.Module):
    """A frozen base layer plus E = G + S LoRA experts mixed per token by a learned router.

    Parameters (separate tensors, so that the shared/local split is by name):
    generalist_A (G, r, in), generalist_B (G, out, r), specialist_A (S, r, in),
    specialist_B (S, out, r), router (E, in); generalists come first in the expert order.
    G or S may be 0. The router has no bias: a bias would only be a token-independent prior,
    which the load-balancing loss is there to keep flat anyway.

    The constructor only allocates zero placeholders of the config's shape: model.AdapterHost
    points them at a peer's tensors, whose seeded init is AdapterHost.initial_adapter's.

    With k = 1 a token's one expert is scaled by its raw probability (not renormalised to 1), so
    the task loss reaches the router through it.
    """

    def __init__(self, base: nn.Module, config: ExpertLayerConfig):
        super().__init__()
        self.in_features, self.out_features = base_dims(base)
        self.base = base
        self.alpha = config.alpha
        self.rslora = config.rslora
        self.top_k = config.top_k
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        g, s, r = config.n_generalists, config.n_specialists, config.rank
        self.generalist_A = nn.Parameter(torch.zeros(g, r, self.in_features, **like))
        self.generalist_B = nn.Parameter(torch.zeros(g, self.out_features, r, **like))
        self.specialist_A = nn.Parameter(torch.zeros(s, r, self.in_features, **like))
        self.specialist_B = nn.Parameter(torch.zeros(s, self.out_features, r, **like))
        self.router = nn.Parameter(torch.zeros(g + s, self.in_features, **like))
        self.last_routing: Routing | None = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, generalists={self.generalist_A.shape[0]}, "
                f"specialists={self.specialist_A.shape[0]}, rank={self.generalist_A.shape[1]}, "
                f"top_k={self.top_k}, alpha={self.alpha}, rslora={self.rslora}")

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        A = _stack(self.generalist_A, self.specialist_A)  # (E, r, in)
        B = _stack(self.generalist_B, self.specialist_B)  # (E, out, r)
        router = self.router
        n_experts, rank = A.shape[0], A.shape[1]
        if B.shape[0] != n_experts or router.shape[0] != n_experts or B.shape[2] != rank:
            raise ValueError(f"expert tensors disagree: A {tuple(A.shape)}, B {tuple(B.shape)}, "
                             f"router {tuple(router.shape)}")
        flat = x.reshape(-1, self.in_features).to(A.dtype)  # a bf16 or fp16 base: the experts stay float32
        gates = self._route(flat.detach(), router, n_experts)
        # All experts at once, as one LoRA of rank E*r whose r-blocks each token scales by its gate:
        # computing every expert densely beats dispatching tokens to experts here (docs/compute.md, "Expert layers").
        hidden = (flat @ A.reshape(n_experts * rank, self.in_features).t()).view(-1, n_experts, rank)
        hidden = (hidden * gates.unsqueeze(-1)).view(-1, n_experts * rank)
        up = B.transpose(1, 2).reshape(n_experts * rank, self.out_features)
        scale = lora_scale(self.alpha, rank, self.rslora)
        out = torch.addmm(out.reshape(-1, self.out_features).to(A.dtype), hidden, up, alpha=scale)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _route(self, flat: Tensor, router: Tensor, n_experts: int) -> Tensor:
        """The gates (tokens, E) of `flat`, a detached copy of the layer input; keeps last_routing.

        The router sees a detached input: the routing decision is this layer's router's alone, so
        neither the language-model loss nor the load-balancing loss reaches earlier layers' adapters
        through it (the bi-level split stays clean), and the expert phase, whose routers are frozen,
        builds no graph for routing at all (about a fifth of the layer's step at the tiny model).
        The input is RMS-normalised without a learned scale: the scale of a layer's input differs
        from layer to layer and drifts as adapters train, and the logits should not follow it.
        """
        eps = torch.finfo(flat.dtype).eps
        inv_rms = flat.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        probs = torch.softmax(F.linear(flat, router) * inv_rms, dim=-1)
        k = min(self.top_k, n_experts)
        if k == n_experts:
            self.last_routing = Routing(probs=probs, mask=None, top_k=k, gates=probs)
            return probs
        kept, index = probs.topk(k, dim=-1)
        mask = torch.zeros_like(probs).scatter_(-1, index, 1.0)
        # Top-1 keeps the raw probability (as Switch Transformers do): renormalised it would be exactly
        # 1 and the task loss would give the router no gradient. Top-k (k >= 2) renormalises over the kept.
        weights = kept if k == 1 else kept / kept.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, index, weights)
        self.last_routing = Routing(probs=probs, mask=mask, top_k=k, gates=gates)
        return gates

    def load_balancing_loss(self) -> Tensor | None:
        """The Switch-style auxiliary loss of the last forward pass: E * sum_e f_e * P_e.

        f_e is the share of the (token, kept expert) assignments that went to expert e (the top-k
        mask averaged over tokens, divided by k, so that f sums to 1), P_e the router's mean
        probability for e; uniform routing gives 1. Only P carries a gradient, and it reaches the
        routers alone (their input is detached): training.ExpertTrainer adds it in the router phase.

        It describes the last forward pass, whichever peer's tensors the layer pointed at then:
        take it inside the same pass, before the layer runs again.

        Returns None when k = E: every token keeps every expert, f_e = 1/E and the loss is the
        constant 1, so it carries no signal and must not be counted as a feature (docs/algorithms.md,
        section 2, "Load balancing").
        """
        if self.last_routing is None:
            raise RuntimeError("load_balancing_loss needs a forward pass first")
        routing = self.last_routing
        if routing.mask is None:
            return None
        n_experts = routing.probs.shape[-1]
        assigned = routing.mask.mean(0) / routing.top_k
        return n_experts * (assigned * routing.probs.mean(0)).sum()


def _stack(generalists: Tensor, specialists: Tensor) -> Tensor:
    # Skip the copy when one side is empty (comigs-2g / comigs-2s layouts).
    if specialists.shape[0] == 0:
        return generalists
    if generalists.shape[0] == 0:
        return specialists
    return torch.cat([generalists, specialists])


def generalists_only(adapter: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`adapter` with its specialists left out: each expert layer mixes its generalists alone.

    Specialists become empty (0 experts) and each router keeps its generalists' rows, so a layer with
    one generalist runs it as a plain LoRA (its gate is 1). How a trust rule judges a neighbour's
    generalists: beside the judging peer's own specialists, the peer's own generalist, co-trained with
    those specialists, would always look best, and trust would drift to the peer itself.
    A plain LoRA adapter, and a layer without generalists, come back unchanged.
    """
    out = dict(adapter)
    for name, tensor in adapter.items():
        prefix, _, attr = name.rpartition(".")
        generalists = adapter[f"{prefix}.generalist_A"].shape[0] if attr in EXPERT_TENSORS else 0
        if generalists and attr.startswith("specialist_"):
            out[name] = tensor[:0]
        elif generalists and attr == "router":
            out[name] = tensor[:generalists]
    return out


def mean_load_balancing_loss(model: nn.Module) -> Tensor | None:
    """The load-balancing loss averaged over the expert layers where it means something (k < E), or None."""
    losses = [loss for module in model.modules() if isinstance(module, MixtureOfLoraExperts)
              if (loss := module.load_balancing_loss()) is not None]
    return torch.stack(losses).mean() if losses else None


# ---------------------------------------------------------------------------
# Attaching layers to a model.

def attach_experts(model: nn.Module, paths: Sequence[str],
                   config: ExpertLayerConfig) -> dict[str, MixtureOfLoraExperts]:
    """Replace, in place, the submodule at each of `paths` by an expert layer around it.

    The layers hold zero placeholders for model.AdapterHost to point at peers' tensors; the
    model's own parameters are left as they are (load_base_model froze them). Which paths a
    config's targets name is model.matching_paths's business. Returns the layers by path.
    """
    layers: dict[str, MixtureOfLoraExperts] = {}
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, MixtureOfLoraExperts):
            raise ConfigError(f"{path} already holds experts")
        try:
            layer = MixtureOfLoraExperts(base, config)
        except TypeError as error:
            raise ConfigError(f"experts.target_modules: {path}: {error}") from error
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        layers[path] = layer
    return layers


# Router logits start with a standard deviation of about this, whatever the input width (its
# input is RMS-normalised): routing starts near uniform, with the symmetry between experts broken.
ROUTER_INIT_LOGIT_STD = 0.1


def init_tensor(attr: str, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """The init of one tensor: A like peft's kaiming-uniform(a=sqrt(5)), B zero, the router small."""
    fan_in = shape[-1]
    if attr.endswith("_A"):
        return (torch.rand(tuple(shape), generator=generator) * 2 - 1) / math.sqrt(fan_in)
    if attr == "router":
        return torch.randn(tuple(shape), generator=generator) * (ROUTER_INIT_LOGIT_STD / math.sqrt(fan_in))
    return torch.zeros(tuple(shape))
