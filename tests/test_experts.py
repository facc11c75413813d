"""The CoMiGS expert layer: routing math, layouts, hosting on a base model and the no-leak property of
bi-level training.

Layer math is checked on MixtureOfLoraExperts itself; everything about a peer's tensors (seeded init,
pointing, shapes per layout) goes through the one hosting mechanism, model.AdapterHost.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from p2pfed.config import ConfigError, ExpertsConfig, LoraConfig
from p2pfed.data import ByteTokenizer
from p2pfed.experts import (
    EXPERT_TENSORS,
    ExpertLayerConfig,
    MixtureOfLoraExperts,
    attach_experts,
    is_router,
    is_shared,
    mean_load_balancing_loss,
)
from p2pfed.model import AdapterHost, BaseModel, attach_adapters
from p2pfed.training import BilevelTrainer, bilevel_optimizers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear(n_in: int, n_out: int, seed: int, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=gen(seed), dtype=dtype))
        layer.bias.copy_(torch.randn(n_out, generator=gen(seed + 1), dtype=dtype))
    return layer.requires_grad_(False)


def randomise(layer: MixtureOfLoraExperts, seed: int) -> MixtureOfLoraExperts:
    """Nonzero values in every expert tensor (B included) and a router with visible preferences."""
    g = gen(seed)
    with torch.no_grad():
        for name in ("generalist_A", "generalist_B", "specialist_A", "specialist_B", "router"):
            tensor = getattr(layer, name)
            tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=tensor.dtype))
    return layer


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):  # HF initialises from the global RNG
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model.eval().requires_grad_(False)


def gpt2_base() -> BaseModel:
    return BaseModel(model=tiny_gpt2(), tokenizer=ByteTokenizer(), context=32, family="gpt2")


def gpt2_host(top_k: int = 2) -> tuple[BaseModel, AdapterHost]:
    """The comigs host of the tiny GPT-2: experts on the MLP linears, plain LoRA on attention."""
    base = gpt2_base()
    return base, attach_adapters(base, LoraConfig(rank=4, alpha=8.0), ExpertsConfig(top_k=top_k))


def host_over(module: nn.Module, targets: tuple[str, ...], rank: int, top_k: int) -> AdapterHost:
    """A host whose only adapters are expert layers on `targets` (its LoRA targets are the same modules)."""
    base = BaseModel(model=module, tokenizer=ByteTokenizer(), context=0, family="")
    return attach_adapters(base, LoraConfig(rank=rank, target_modules=targets),
                           ExpertsConfig(top_k=top_k, target_modules=targets))


def lm_loss(model, batch):
    logits = model(input_ids=batch).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------
# Routing math.

def test_hand_case_two_experts_top1_and_top2():
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    W, b = [[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5]
    R = [[1.0, 0.0], [0.0, 1.0]]
    A = [[[1.0, 0.0]], [[0.0, 1.0]]]  # (E, r=1, in)
    Bm = [[[1.0], [0.0]], [[0.0], [2.0]]]  # (E, out, r=1)
    alpha, rank = 2.0, 1
    s = alpha / rank
    xs = [[3.0, 4.0], [4.0, -3.0]]  # expert 1 wins the first token, expert 0 the second

    def by_hand(top_k: int):
        outputs, probabilities = [], []
        for x in xs:
            rms = math.sqrt(sum(v * v for v in x) / len(x) + torch.finfo(torch.float32).eps)
            logits = [sum(R[e][i] * x[i] / rms for i in range(2)) for e in range(2)]
            exps = [math.exp(v) for v in logits]
            p = [v / sum(exps) for v in exps]
            probabilities.append(p)
            kept = sorted(range(2), key=lambda e: -p[e])[:top_k]
            # Top-1 keeps the raw probability (so the router learns from the task loss); top-k renormalises.
            norm = 1.0 if top_k == 1 else sum(p[k] for k in kept)
            gate = [p[e] / norm if e in kept else 0.0 for e in range(2)]
            y = []
            for o in range(2):
                value = sum(W[o][i] * x[i] for i in range(2)) + b[o]
                for e in range(2):
                    ax = sum(A[e][0][i] * x[i] for i in range(2))
                    value += gate[e] * s * Bm[e][o][0] * ax
                y.append(value)
            outputs.append(y)
        return torch.tensor(outputs), torch.tensor(probabilities)

    for top_k in (1, 2):
        layer = MixtureOfLoraExperts(base, ExpertLayerConfig(1, 1, rank=1, alpha=alpha, top_k=top_k))
        with torch.no_grad():
            layer.generalist_A.copy_(torch.tensor(A[:1]))
            layer.specialist_A.copy_(torch.tensor(A[1:]))
            layer.generalist_B.copy_(torch.tensor(Bm[:1]))
            layer.specialist_B.copy_(torch.tensor(Bm[1:]))
            layer.router.copy_(torch.tensor(R))
            y = layer(torch.tensor(xs))
        expected, p = by_hand(top_k)
        torch.testing.assert_close(layer.last_routing.probs, p)
        torch.testing.assert_close(y, expected)
    # The hand case really separates the two: top-1 keeps expert 1 for token 0, expert 0 for token 1.
    assert not torch.allclose(by_hand(1)[0], by_hand(2)[0])


def naive(layer: MixtureOfLoraExperts, x: torch.Tensor) -> torch.Tensor:
    """The layer computed token by token and expert by expert."""
    A = torch.cat([layer.generalist_A, layer.specialist_A])
    B = torch.cat([layer.generalist_B, layer.specialist_B])
    n_experts, rank = A.shape[0], A.shape[1]
    s = layer.alpha / (math.sqrt(rank) if layer.rslora else rank)
    k = min(layer.top_k, n_experts)
    eps = torch.finfo(x.dtype).eps
    flat = x.reshape(-1, x.shape[-1])
    rows = []
    for token in flat:
        normed = token / torch.sqrt(token.pow(2).mean() + eps)
        p = torch.softmax(layer.router @ normed, dim=0)
        kept = torch.argsort(p, descending=True)[:k].tolist()
        y = layer.base(token)
        for e in kept:
            norm = 1.0 if k == 1 else p[kept].sum()
            y = y + p[e] / norm * s * (B[e] @ (A[e] @ token))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k,rslora", [(2, False), (5, True), (1, False)])
def test_batched_layer_equals_a_per_expert_loop(top_k, rslora):
    layer = randomise(MixtureOfLoraExperts(linear(5, 4, 0, torch.float64),
                                           ExpertLayerConfig(2, 3, rank=3, alpha=6.0, top_k=top_k, rslora=rslora)), 1)
    x = torch.randn(2, 7, 5, generator=gen(2), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive(layer, x))


@pytest.mark.parametrize("generalists,specialists", [(2, 0), (0, 2)])
def test_generalists_only_and_specialists_only(generalists, specialists):
    layer = randomise(MixtureOfLoraExperts(linear(5, 4, 0, torch.float64),
                                           ExpertLayerConfig(generalists, specialists, rank=2, top_k=1)), 3)
    x = torch.randn(6, 5, generator=gen(4), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive(layer, x))
    # Through a host (whose layers hold 1 + 1 placeholders): the missing part is held as empty tensors.
    host = host_over(nn.Sequential(linear(5, 4, 0, torch.float64)), ("0",), rank=2, top_k=1)
    layout = host.layout(2, generalists, specialists)
    held = {name for name, t in host.initial_adapter(0, layout).items() if t.numel() > 0}
    assert held == ({"0.generalist_A", "0.generalist_B", "0.router"} if specialists == 0
                    else {"0.specialist_A", "0.specialist_B", "0.router"})
    adapter = {name: torch.randn(shape, generator=gen(5), dtype=torch.float64)
               for name, shape in host.shapes(layout).items()}
    with torch.no_grad(), host.using(adapter) as model:
        torch.testing.assert_close(model(x), naive(model[0], x))


def test_linear_and_conv1d_bases_agree():
    from transformers.pytorch_utils import Conv1D

    lin = linear(6, 3, 0)
    conv = Conv1D(3, 6)  # nf = out, nx = in; weight in x out
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    config = ExpertLayerConfig(1, 2, rank=2, top_k=2)
    a = randomise(MixtureOfLoraExperts(lin, config), 5)
    b = MixtureOfLoraExperts(conv, config)
    with torch.no_grad():
        for name in ("generalist_A", "generalist_B", "specialist_A", "specialist_B", "router"):
            getattr(b, name).copy_(getattr(a, name))
    x = torch.randn(2, 4, 6, generator=gen(6))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert b.generalist_B.shape == (1, 3, 2) and b.router.shape == (3, 6)


def test_zero_b_is_the_base_layer():
    host = host_over(nn.Sequential(linear(6, 3, 0)), ("0",), rank=4, top_k=1)
    adapter = host.initial_adapter(0, host.layout(4, 1, 1))
    assert adapter["0.generalist_A"].abs().sum() > 0 and adapter["0.router"].abs().sum() > 0
    x = torch.randn(3, 6, generator=gen(1))
    with torch.no_grad(), host.using(adapter) as model:
        assert torch.equal(model(x), model[0].base(x))


def test_top_k_masks_the_other_experts():
    layer = randomise(MixtureOfLoraExperts(linear(5, 4, 0, torch.float64), ExpertLayerConfig(1, 4, rank=2, top_k=2)), 7)
    x = torch.randn(9, 5, generator=gen(8), dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        mask = layer.last_routing.mask
        assert torch.equal(mask.sum(-1), torch.full((9,), 2.0, dtype=torch.float64))
        dropped = int(torch.nonzero(mask[0] == 0)[0])  # an expert that token 0 does not keep
        if dropped == 0:
            layer.generalist_B.mul_(100)
        else:
            layer.specialist_B[dropped - 1].mul_(100)
        after = layer(x)
    torch.testing.assert_close(after[0], before[0])
    changed = mask[:, dropped] == 1
    assert torch.allclose(after[~changed], before[~changed])
    if changed.any():
        assert not torch.allclose(after[changed], before[changed])


def test_load_balancing_loss_only_when_k_below_e():
    x = torch.randn(16, 5, generator=gen(1))
    full = randomise(MixtureOfLoraExperts(linear(5, 4, 0), ExpertLayerConfig(1, 2, rank=2, top_k=3)), 2)
    with pytest.raises(RuntimeError):
        full.load_balancing_loss()
    full(x)
    assert full.load_balancing_loss() is None
    sparse = randomise(MixtureOfLoraExperts(linear(5, 4, 0), ExpertLayerConfig(1, 2, rank=2, top_k=2)), 2)
    sparse(x)
    loss = sparse.load_balancing_loss()
    routing = sparse.last_routing
    expected = 3 * sum(routing.mask[:, e].mean() / 2 * routing.probs[:, e].mean() for e in range(3))
    torch.testing.assert_close(loss, expected)
    uniform = MixtureOfLoraExperts(linear(5, 4, 0), ExpertLayerConfig(1, 2, rank=2, top_k=2))  # router all zero
    uniform(x)
    torch.testing.assert_close(uniform.load_balancing_loss(), torch.tensor(1.0))
    loss.backward()
    assert sparse.router.grad is not None and sparse.router.grad.abs().sum() > 0
    model = nn.Sequential(full, nn.Identity(), sparse)
    assert torch.equal(mean_load_balancing_loss(model), loss)
    assert mean_load_balancing_loss(nn.Sequential(full)) is None


def test_one_layer_serves_states_with_different_numbers_of_specialists():
    # A host built for one layout runs a peer that holds another: the layer reads E from the tensors.
    host = host_over(nn.Sequential(linear(5, 4, 0)), ("0",), rank=2, top_k=2)
    assert host.model[0].router.shape == (2, 5)  # 1 + 1 placeholders
    other = randomise(MixtureOfLoraExperts(linear(5, 4, 0), ExpertLayerConfig(1, 3, rank=2, top_k=2)), 3)
    state = {f"0.{kind}": getattr(other, kind).detach() for kind in EXPERT_TENSORS}
    x = torch.randn(4, 5, generator=gen(4))
    with torch.no_grad(), host.using(state) as model:
        torch.testing.assert_close(model(x), other(x))


# ---------------------------------------------------------------------------
# Names, hosting and state.

def test_is_shared_by_name():
    assert is_shared("transformer.h.0.mlp.c_fc.generalist_A")
    assert is_shared("transformer.h.0.mlp.c_proj.generalist_B")
    assert is_shared("transformer.h.0.attn.c_attn.lora_A")
    assert not is_shared("transformer.h.0.mlp.c_fc.specialist_A")
    assert not is_shared("transformer.h.0.mlp.c_fc.specialist_B")
    assert not is_shared("transformer.h.0.mlp.c_fc.router")
    assert is_router("transformer.h.0.mlp.c_fc.router") and not is_router("x.generalist_A")
    for bad in ("transformer.h.0.mlp.c_fc.weight", "generalist", "router.bias"):
        with pytest.raises(ValueError):
            is_shared(bad)


def test_expert_host_on_tiny_gpt2():
    base, host = gpt2_host()
    batch = torch.randint(0, 64, (2, 16), generator=gen(0))
    with torch.no_grad():
        before = base.model(input_ids=batch).logits
    replaced = {path for path, m in host.model.named_modules() if isinstance(m, MixtureOfLoraExperts)}
    assert replaced == {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    assert not any(isinstance(m, MixtureOfLoraExperts) for m in base.model.modules())  # the base's tree is untouched
    assert type(host.model.transformer.h[0].attn.c_proj.base_layer).__name__ == "Conv1D"  # attention: plain LoRA
    assert [s.name for s in host.slots if s.kind in EXPERT_TENSORS] == [
        f"transformer.h.0.mlp.{layer}.{attr}" for layer in ("c_fc", "c_proj") for attr in EXPERT_TENSORS]
    assert [s.name for s in host.slots if s.kind not in EXPERT_TENSORS] == [
        f"transformer.h.0.attn.{layer}.{part}" for layer in ("c_attn", "c_proj") for part in ("lora_A", "lora_B")]
    assert host.expert_layers
    with pytest.raises(ValueError):
        host.layout(4)  # an expert host runs expert layouts only
    layout = host.layout(4, 1, 1)
    adapter = {n: nn.Parameter(t) for n, t in host.initial_adapter(1, layout).items()}
    fc = "transformer.h.0.mlp.c_fc."
    assert adapter[fc + "generalist_A"].shape == (1, 4, 32) and adapter[fc + "generalist_B"].shape == (1, 128, 4)
    assert adapter[fc + "router"].shape == (2, 32)
    assert host.shapes(layout) == {n: tuple(t.shape) for n, t in adapter.items()}
    # Seeded init: B = 0, so the model is the base model; and it trains.
    with host.using(adapter) as model:
        torch.testing.assert_close(model(input_ids=batch).logits, before)
        lm_loss(model, batch).backward()
        frozen = [p for n, p in model.named_parameters()
                  if "lora_" not in n and n.rpartition(".")[2] not in EXPERT_TENSORS]
    assert adapter[fc + "generalist_B"].grad.abs().sum() > 0 and adapter[fc + "specialist_B"].grad.abs().sum() > 0
    assert frozen and all(not p.requires_grad for p in frozen)


def test_attach_errors():
    base, host = gpt2_host()
    with pytest.raises(ConfigError, match="already holds experts"):
        attach_experts(host.model, ["transformer.h.0.mlp.c_fc"], ExpertLayerConfig())
    with pytest.raises(ConfigError, match="no module of the model matches"):
        attach_adapters(base, LoraConfig(), ExpertsConfig(target_modules=("mlp.nothing",)))
    with pytest.raises(ConfigError, match="no default for model family"):
        attach_adapters(dataclasses.replace(base, family="bert"), LoraConfig(), ExpertsConfig())
    with pytest.raises(ConfigError, match="experts wrap nn.Linear"):
        attach_adapters(base, LoraConfig(), ExpertsConfig(target_modules=("mlp.act",)))


def test_pointing_the_host_at_another_adapter_changes_outputs():
    base, host = gpt2_host(top_k=1)
    placeholders = [s.module._parameters[s.attr] for s in host.slots]
    batch = torch.randint(0, 64, (2, 16), generator=gen(0))
    first = host.initial_adapter(1, host.layout(4, 1, 1))
    second = {n: (t + 0.1 * torch.randn(t.shape, generator=gen(2)) if n.endswith("_B") else t)
              for n, t in first.items()}
    with torch.no_grad():
        base_logits = base.model(input_ids=batch).logits
        with host.using(first) as model:
            first_logits = model(input_ids=batch).logits
        with host.using(second) as model:
            second_logits = model(input_ids=batch).logits
    torch.testing.assert_close(first_logits, base_logits)
    assert not torch.allclose(second_logits, first_logits)
    assert all(s.module._parameters[s.attr] is p for s, p in zip(host.slots, placeholders))
    with pytest.raises(KeyError):
        with host.using({}):
            pass
    assert all(s.module._parameters[s.attr] is p for s, p in zip(host.slots, placeholders))


def test_initial_adapter_is_seeded_and_generalists_do_not_depend_on_specialists():
    _, host = gpt2_host()

    def adapter(specialists: int, seed: int):
        return host.initial_adapter(seed, host.layout(4, 1, specialists))

    def shared(state):
        return {n for n in state if is_shared(n)}

    one, again, two, other = adapter(1, 7), adapter(1, 7), adapter(2, 7), adapter(1, 8)
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert shared(one) == shared(two)
    assert all(torch.equal(one[n], two[n]) for n in shared(one))
    assert any(not torch.equal(one[n], other[n]) for n in one if n.endswith("_A"))
    assert all(not one[n].any() for n in one if n.endswith("_B"))
    local = set(one) - shared(one)
    assert all(n.endswith(("generalist_A", "generalist_B", "lora_A", "lora_B")) for n in shared(one))
    assert local and all(n.endswith(("specialist_A", "specialist_B", "router")) for n in local)


def test_an_adapter_round_trips_through_safetensors(tmp_path):
    _, host = gpt2_host()
    state = {n: nn.Parameter(t + 1) for n, t in host.initial_adapter(3, host.layout(3, 1, 2)).items()}
    save_file({n: t.detach().contiguous() for n, t in state.items()}, str(tmp_path / "state.safetensors"))
    loaded = load_file(str(tmp_path / "state.safetensors"))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], state[n].detach()) and loaded[n].dtype == state[n].dtype for n in state)


# ---------------------------------------------------------------------------
# Bi-level training.

def test_bilevel_training_does_not_leak_between_phases():
    host = host_over(nn.Sequential(linear(6, 6, 0), nn.GELU(), linear(6, 6, 2)), ("0", "2"), rank=2, top_k=2)
    params = {n: nn.Parameter(t) for n, t in host.initial_adapter(0, host.layout(2, 1, 2)).items()}
    router_params = [t for n, t in params.items() if is_router(n)]
    expert_params = [t for n, t in params.items() if not is_router(n)]
    optimizers = bilevel_optimizers(params, expert_lr=1e-2, router_lr=1e-2, weight_decay=0.1)
    in_experts = {id(t) for group in optimizers.experts.param_groups for t in group["params"]}
    in_router = {id(t) for group in optimizers.router.param_groups for t in group["params"]}
    assert in_experts == {id(t) for t in expert_params} and in_router == {id(t) for t in router_params}
    trainer = BilevelTrainer(optimizers, router_every=2, router_steps=3)
    x = torch.randn(64, 6, generator=gen(1))
    target = torch.randn(64, 6, generator=gen(2))

    def batches(offset):
        for i in itertools.count():
            rows = torch.arange(8) + (8 * i + offset) % 56
            yield x[rows], target[rows]

    calls = []  # (phase, router values, expert values, all grads None) at every loss call

    def recorder(model, phase):
        def loss_fn(batch):
            calls.append((phase, [t.detach().clone() for t in router_params],
                          [t.detach().clone() for t in expert_params], all(t.grad is None for t in params.values())))
            inputs, wanted = batch
            loss = F.mse_loss(model(inputs), wanted)
            aux = mean_load_balancing_loss(model)
            return loss + 0.01 * aux if phase == "E" and aux is not None else loss
        return loss_fn

    for tensor in router_params:  # a stale router gradient from elsewhere must not survive
        tensor.grad = torch.ones_like(tensor)
    with host.using(params) as model:
        first = trainer.train_round(5, recorder(model, "E"), batches(0), batches(3), router_loss=recorder(model, "R"))
        second = trainer.train_round(1, recorder(model, "E"), batches(5), batches(7), router_loss=recorder(model, "R"))

    assert "".join(c[0] for c in calls) == "EERRREERRRE" + "ERRR"
    assert (first.expert_steps, first.router_steps, second.router_steps) == (5, 6, 3)
    assert trainer.expert_steps_done == 6
    calls.append(("end", [t.detach().clone() for t in router_params], [t.detach().clone() for t in expert_params],
                  True))
    for (phase, routers, experts, clean), (_, next_routers, next_experts, _) in zip(calls, calls[1:]):
        if phase == "E":  # an expert step leaves the router alone
            assert all(torch.equal(a, b) for a, b in zip(routers, next_routers))
            assert any(not torch.equal(a, b) for a, b in zip(experts, next_experts))
        else:  # a router step leaves the experts alone
            assert all(torch.equal(a, b) for a, b in zip(experts, next_experts))
            assert any(not torch.equal(a, b) for a, b in zip(routers, next_routers))
    for previous, call in zip(calls, calls[1:-1]):
        if call[0] != previous[0]:  # the first step of a phase finds no gradient from the other
            assert call[3]
    assert calls[0][3]  # the stale gradient was dropped before the first step
    assert all(t.requires_grad and t.grad is None for t in params.values())


def test_bilevel_optimizers_need_both_halves():
    with pytest.raises(ValueError):
        bilevel_optimizers({"a.generalist_A": nn.Parameter(torch.zeros(1, 1, 1))}, 1e-3, 1e-3)
    with pytest.raises(ConfigError):
        BilevelTrainer(bilevel_optimizers({"a.generalist_A": nn.Parameter(torch.zeros(1)),
                                           "a.router": nn.Parameter(torch.zeros(1))}, 1e-3, 1e-3),
                       router_every=0, router_steps=1)
