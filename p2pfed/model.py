"""The frozen base model and the adapters peers train on it: plain LoRA and CoMiGS expert layers.

In one process every peer shares one frozen base model wrapped once by peft. A peer owns
only its adapter tensors; `AdapterHost.using(adapter)` points the LoRA modules (and the expert
layers of experts.py) at them for the duration of a forward/backward pass. Pointing parameters
costs microseconds, where peft's own adapter switching costs milliseconds (docs/compute.md,
"Pointing parameters instead of switching adapters").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from p2pfed.config import ConfigError, ExpertsConfig, LoraConfig, ModelConfig
from p2pfed.data import ByteTokenizer, load_pretrain_text
from p2pfed.device import module_device, resolve_device, torch_dtype
from p2pfed.experts import (EXPERT_TENSORS, MLP_TARGETS, ExpertLayerConfig, MixtureOfLoraExperts, attach_experts,
                            init_tensor, is_shared)

# LoRA targets that cover attention and MLP linears, per model family.
KNOWN_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

Adapter = dict[str, torch.Tensor]


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer behind the project's two-method interface."""

    inner: object

    @property
    def vocab_size(self) -> int:
        return len(self.inner)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(list(ids))


@dataclass
class BaseModel:
    model: nn.Module  # a causal LM, every parameter frozen
    tokenizer: Tokenizer
    context: int  # longest sequence the model accepts
    family: str


# ---------------------------------------------------------------------------
# Loading the base model.

def default_cache_dir(config: ModelConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("P2PFED_CACHE", Path.home() / ".cache" / "p2pfed"))


def tiny_config(config: ModelConfig, vocab_size: int):
    from transformers import GPT2Config

    # No dropout: it doubles a tiny model's step time and makes trust evaluation noisy.
    # gelu_pytorch_tanh is gelu_new, computed faster.
    return GPT2Config(
        vocab_size=vocab_size, n_positions=config.context, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )


def tiny_model_key(config: ModelConfig, pretrain_text: str) -> str:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("source", "gguf_file", "cache_dir", "device", "dtype")}
    fields["recipe"] = 2  # bump when pretrain_tiny changes, so stale caches are not reused
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    digest.update(hashlib.sha256(pretrain_text.encode()).digest())
    return digest.hexdigest()[:16]


def load_base_model(config: ModelConfig, log=print) -> BaseModel:
    """The frozen base: the pretrained tiny default, a local HF directory, or a GGUF file; on model.device
    in model.dtype (an unavailable device is a ConfigError, before anything loads)."""
    device, dtype = resolve_device(config.device), torch_dtype(config.dtype)
    if config.source == "tiny":
        model, tokenizer = _load_or_pretrain_tiny(config, log)
        family = "gpt2"
    else:
        from p2pfed.local_model import load_local

        model, inner = load_local(config, dtype)
        tokenizer = HFTokenizer(inner)
        family = getattr(model.config, "model_type", "")
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    context = int(getattr(model.config, "n_positions", 0) or getattr(model.config, "max_position_embeddings", 0)
                  or config.context)
    return BaseModel(model=model, tokenizer=tokenizer, context=context, family=family)


def _load_or_pretrain_tiny(config: ModelConfig, log):
    from transformers import GPT2LMHeadModel

    tokenizer = ByteTokenizer()
    text = load_pretrain_text()
    directory = default_cache_dir(config) / f"tiny-{tiny_model_key(config, text)}"
    if (directory / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(directory), tokenizer
    log(f"Pretraining the tiny base model once ({config.pretrain_steps} steps on the built-in generic corpus); "
        f"cached in {directory}")
    model = pretrain_tiny(config, tokenizer.encode(text), tokenizer.vocab_size)
    staging = directory.with_name(directory.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    # Rename last so that a crash never leaves a half-written cache entry behind.
    try:
        staging.rename(directory)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return GPT2LMHeadModel.from_pretrained(directory), tokenizer


def pretrain_tiny(config: ModelConfig, token_ids: Sequence[int], vocab_size: int) -> nn.Module:
    """Train the whole tiny model on generic text, so that LoRA on top of it has something to adapt."""
    from transformers import GPT2LMHeadModel

    tokens = torch.tensor(token_ids, dtype=torch.long)
    span = config.context
    if len(tokens) <= span + 1:
        raise ConfigError("the pretraining corpus is shorter than one context window")
    with torch.random.fork_rng(devices=[]):  # HF initialises from the global RNG; keep ours untouched
        torch.manual_seed(config.pretrain_seed)
        model = GPT2LMHeadModel(tiny_config(config, vocab_size))
    # One thread, whatever the caller uses: float sums depend on the thread count, and the cached
    # base must be the same bytes whichever process happened to pretrain it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pretrain_loop(model, config, tokens)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def _pretrain_loop(model: nn.Module, config: ModelConfig, tokens: torch.Tensor) -> None:
    span = config.context
    generator = torch.Generator().manual_seed(config.pretrain_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.pretrain_lr,
                                                   total_steps=max(config.pretrain_steps, 1), pct_start=0.1)
    model.train()
    for _ in range(config.pretrain_steps):
        starts = torch.randint(0, len(tokens) - span, (config.pretrain_batch_size,), generator=generator)
        batch = torch.stack([tokens[s:s + span] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()


# ---------------------------------------------------------------------------
# Adapters on the shared base: plain LoRA (through peft) and CoMiGS expert layers.

@dataclass(frozen=True)
class AdapterLayout:
    """What one peer's adapter holds: its LoRA rank and, on expert layers, its experts."""

    rank: int
    generalists: int = 0
    specialists: int = 0

    @property
    def has_experts(self) -> bool:
        return self.generalists + self.specialists > 0


@dataclass(frozen=True)
class AdapterSlot:
    """Where one adapter tensor goes: `module._parameters[attr]`, for LoRA and expert tensors alike.

    Slots fix where tensors go, not their shapes: peers of different ranks or numbers of experts
    use the same slots with tensors of their own shapes.
    """

    name: str  # the tensor's name on the wire, e.g. "transformer.h.0.attn.c_attn.lora_A"
    module: nn.Module  # peft's nn.Linear for lora_A/lora_B, a MixtureOfLoraExperts for expert tensors
    attr: str
    kind: str  # lora_A, lora_B, or one of experts.EXPERT_TENSORS
    in_features: int
    out_features: int
    lora_layer: nn.Module | None = None  # the peft LoraLayer whose scaling follows the pointed rank

    def shape(self, layout: AdapterLayout) -> tuple[int, ...]:
        r, g, s = layout.rank, layout.generalists, layout.specialists
        return {
            "lora_A": (r, self.in_features), "lora_B": (self.out_features, r),
            "generalist_A": (g, r, self.in_features), "generalist_B": (g, self.out_features, r),
            "specialist_A": (s, r, self.in_features), "specialist_B": (s, self.out_features, r),
            "router": (g + s, self.in_features),
        }[self.kind]


class AdapterHost:
    """One frozen base model whose adapter tensors can be pointed at any peer's adapter."""

    def __init__(self, model: nn.Module, slots: list[AdapterSlot], lora: LoraConfig, expert_layers: bool = False):
        self.model = model
        self.slots = slots
        self.lora = lora
        self.expert_layers = expert_layers  # whether MLP layers hold experts (the comigs methods' host)

    @property
    def device(self) -> torch.device:
        """Where the base and every adapter pointed into it live (model.device)."""
        return module_device(self.model)

    def place(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` on this host's device: what arrives from the network is decoded on the CPU."""
        device = self.device
        return {name: tensor.to(device) for name, tensor in tensors.items()}

    def layout(self, rank: int | None = None, generalists: int = 0, specialists: int = 0) -> AdapterLayout:
        layout = AdapterLayout(rank or self.lora.rank, generalists, specialists)
        if layout.has_experts != self.expert_layers:
            raise ValueError(f"this host {'has' if self.expert_layers else 'has no'} expert layers; layout {layout}")
        return layout

    def shapes(self, layout: AdapterLayout | None = None) -> dict[str, tuple[int, ...]]:
        layout = layout or self.layout()
        return {slot.name: slot.shape(layout) for slot in self.slots}

    def scale(self, rank: int) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA): alpha is the swarm's, the rank each peer's own."""
        return self.lora.scale(rank)

    def initial_adapter(self, seed: int, layout: AdapterLayout | None = None) -> Adapter:
        """The seeded init: peers with the same seed and layout hold the same adapter.

        A is drawn like peft's kaiming-uniform(a=sqrt(5)) init, B is zero, routers small. Shared
        tensors are drawn first, so that peers holding different numbers of specialists still
        start from the same generalists.
        """
        shapes = self.shapes(layout)
        generator = torch.Generator().manual_seed(seed)
        ordered = [s for s in self.slots if is_shared(s.name)] + [s for s in self.slots if not is_shared(s.name)]
        drawn = {slot.name: init_tensor(slot.kind, shapes[slot.name], generator) for slot in ordered}
        # Drawn on the CPU, whatever the device: the same init on every machine. Always float32 (README, "Devices").
        return self.place({slot.name: drawn[slot.name] for slot in self.slots})

    @contextlib.contextmanager
    def using(self, adapter: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
        """Point every slot at `adapter`'s tensors (no copy) for the duration of the block.

        peft's LoRA scaling follows the rank of the pointed A; expert layers read theirs from
        the tensors at forward time.
        """
        saved = [slot.module._parameters[slot.attr] for slot in self.slots]
        scalings = [(slot.lora_layer, slot.lora_layer.scaling["default"]) for slot in self.slots
                    if slot.lora_layer is not None]
        try:
            for slot in self.slots:
                tensor = adapter[slot.name]
                slot.module._parameters[slot.attr] = tensor
                if slot.lora_layer is not None:
                    slot.lora_layer.scaling["default"] = self.scale(tensor.shape[0])
            yield self.model
        finally:
            for slot, tensor in zip(self.slots, saved):
                slot.module._parameters[slot.attr] = tensor
            for layer, scaling in scalings:
                layer.scaling["default"] = scaling


def structure_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same frozen tensors: each host injects its own adapters into
    its own tree, while every host of a process shares one copy of the base weights."""
    import copy

    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


def attach_lora(base: BaseModel, lora: LoraConfig) -> AdapterHost:
    """A host with plain LoRA on every target layer."""
    return attach_adapters(base, lora, None)


def attach_adapters(base: BaseModel, lora: LoraConfig, experts: ExpertsConfig | None) -> AdapterHost:
    """A host over a structure copy of `base` (whose own modules stay untouched).

    Without `experts`: plain LoRA on every target. With it: expert layers on the experts'
    targets (default: the MLP linears) and plain LoRA on the other targets (attention).
    """
    model = structure_copy(base.model)
    targets: list[str] | Literal["all-linear"] = (list(lora.target_modules) or list(KNOWN_TARGETS.get(base.family, ()))
                                                  or "all-linear")
    expert_paths: list[str] = []
    if experts is not None:
        expert_targets = list(experts.target_modules) or list(MLP_TARGETS.get(base.family, ()))
        if not expert_targets:
            raise ConfigError(f"experts.target_modules: no default for model family {base.family!r}; name them")
        expert_paths = matching_paths(model, expert_targets)
        if not expert_paths:
            raise ConfigError(f"experts.target_modules: no module of the model matches {expert_targets}")
        targets = _lora_paths_outside(model, targets, expert_paths)
    slots = _inject_lora(model, targets, lora, base.family) if targets else []
    inner = model  # peft injects in place; calling the HF model directly skips the peft wrapper's overhead
    if experts is not None:
        layer_config = ExpertLayerConfig(alpha=lora.alpha, rslora=lora.rslora, top_k=experts.top_k)
        slots += _expert_slots(attach_experts(inner, expert_paths, layer_config))
    if not slots:
        raise ConfigError(f"lora.target_modules: no module of the model matches {targets}")
    inner.eval()
    return AdapterHost(model=inner, slots=slots, lora=lora, expert_layers=experts is not None)


def matching_paths(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The paths of `model`'s submodules that `targets` name, in module order.

    A target is a dotted suffix of a path, matched at a dot: "mlp.c_fc" names
    "transformer.h.0.mlp.c_fc", "c_proj" names both GPT-2 projections, "proj" names neither.
    """
    names = tuple(targets)
    return [path for path, _ in model.named_modules()
            if path and any(path == name or path.endswith("." + name) for name in names)]


def _lora_paths_outside(model: nn.Module, targets: list[str] | Literal["all-linear"],
                        expert_paths: Sequence[str]) -> list[str]:
    """Full paths of the LoRA targets that hold no experts (peft's own matching would also take those)."""
    if targets == "all-linear":
        targets = sorted({p.rpartition(".")[2] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
    taken = set(expert_paths)
    return [path for path in matching_paths(model, targets) if path not in taken and not path.endswith("lm_head")]


def _expert_slots(layers: Mapping[str, MixtureOfLoraExperts]) -> list[AdapterSlot]:
    """A slot for every tensor of every expert layer: a layer's tensors are plain `_parameters` entries."""
    return [AdapterSlot(name=f"{path}.{kind}", module=layer, attr=kind, kind=kind,
                        in_features=layer.in_features, out_features=layer.out_features)
            for path, layer in layers.items() for kind in EXPERT_TENSORS]


def _inject_lora(model: nn.Module, targets: list[str] | Literal["all-linear"], lora: LoraConfig,
                 family: str) -> list[AdapterSlot]:
    import warnings

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets,
        use_rslora=lora.rslora, fan_in_fan_out=family == "gpt2", bias="none", task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about Conv1D fan_in_fan_out
        try:
            get_peft_model(model, peft_config)
        except ValueError as error:
            raise ConfigError(f"lora.target_modules: {error}") from error
    slots: list[AdapterSlot] = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        in_features, out_features = a.weight.shape[1], b.weight.shape[0]
        for part, linear in (("lora_A", a), ("lora_B", b)):
            slots.append(AdapterSlot(name=f"{path}.{part}", module=linear, attr="weight", kind=part,
                                     in_features=in_features, out_features=out_features,
                                     lora_layer=module if part == "lora_A" else None))
    return slots


def trainable_copy(adapter: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    return {name: nn.Parameter(tensor.detach().clone().float()) for name, tensor in adapter.items()}


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, length) block of token ids (moved to the model's device)."""
    batch = batch.to(module_device(model))
    logits = model(input_ids=batch).logits.float()  # a bf16 or fp16 base: the loss in float32
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def train_steps(host: AdapterHost, adapter: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                stream: Iterator[torch.Tensor], steps: int) -> float:
    """`steps` optimizer steps of `adapter` on batches from `stream`; returns the mean training loss."""
    total = 0.0
    with host.using(adapter) as model:
        for _ in range(steps):
            loss = lm_loss(model, next(stream))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
    return total / steps
