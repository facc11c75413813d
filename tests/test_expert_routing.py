"""The routers of CoMiGS expert layers learn: top-1 gets a task gradient, the load-balancing loss trains the
routers (and only them), routing does not reach back into the layer input, and routing shares are reported."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from p2pfed.config import ExpertsConfig, LoraConfig
from p2pfed.experts import ExpertLayerConfig, MixtureOfLoraExperts, generalists_only, is_router
from p2pfed.model import attach_adapters
from p2pfed.routing import layer_kind, routing_shares
from p2pfed.training import BilevelTrainer, ExpertTrainer, bilevel_optimizers
from tests.test_experts import gen, gpt2_base, host_over, linear, randomise


def test_top1_router_learns_from_the_task_loss():
    layer = randomise(MixtureOfLoraExperts(linear(5, 4, 0), ExpertLayerConfig(1, 1, rank=2, top_k=1)), 1)
    x = torch.randn(16, 5, generator=gen(2))
    layer(x).pow(2).sum().backward()
    # A renormalised top-1 gate is exactly 1 and would leave this gradient zero.
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    gates = layer.last_routing.gates
    assert torch.equal((gates > 0).sum(-1), torch.ones(16, dtype=torch.long))
    assert torch.all(gates.max(-1).values < 1)  # the raw probability, not 1


def test_routing_does_not_reach_back_into_the_layer_input():
    layer = randomise(MixtureOfLoraExperts(linear(5, 4, 0, torch.float64),
                                           ExpertLayerConfig(1, 2, rank=2, alpha=4.0, top_k=2)), 3)
    x = torch.randn(8, 5, generator=gen(4), dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    gates = layer.last_routing.gates.detach()  # the same gates, held constant
    A = torch.cat([layer.generalist_A, layer.specialist_A]).detach()
    B = torch.cat([layer.generalist_B, layer.specialist_B]).detach()
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer.base(x_ref) + 2.0 * torch.einsum("te,eor,eri,ti->to", gates, B, A, x_ref)
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.router.grad.abs().sum() > 0  # the router still learns through the gates


def _trainer(load_balancing: float, seed: int = 0):
    base = gpt2_base()
    host = attach_adapters(base, LoraConfig(rank=4, alpha=8.0), ExpertsConfig(top_k=1))
    adapter = {n: nn.Parameter(t) for n, t in host.initial_adapter(seed, host.layout(4, 1, 2)).items()}
    for name, tensor in adapter.items():  # nonzero B, so the experts differ and routing matters
        if name.endswith("_B"):
            with torch.no_grad():
                tensor.copy_(torch.randn(tensor.shape, generator=gen(7)) * 0.1)
    schedule = BilevelTrainer(bilevel_optimizers(adapter, 1e-2, 1e-1), router_every=1, router_steps=1)

    def stream(seed):
        g = gen(seed)
        return iter(lambda: torch.randint(0, 64, (4, 16), generator=g), None)

    return adapter, ExpertTrainer(host, adapter, schedule, stream(1), stream(2), load_balancing)


def test_the_load_balancing_loss_trains_the_routers_and_only_them():
    plain, plain_trainer = _trainer(0.0)
    balanced, balanced_trainer = _trainer(10.0)
    plain_trainer.train(1)  # one expert step, then one router step
    balanced_trainer.train(1)
    for name in plain:
        if is_router(name):
            assert not torch.equal(plain[name], balanced[name]), name
        else:  # the expert step ran before any router step and never sees the load-balancing loss
            assert torch.equal(plain[name], balanced[name]), name


def test_routing_shares_are_the_mean_gates_per_layer_kind():
    base = gpt2_base()
    host = attach_adapters(base, LoraConfig(rank=4, alpha=8.0), ExpertsConfig(top_k=2))
    adapter = host.initial_adapter(0, host.layout(4, 1, 2))
    adapter = {n: t * 30 if is_router(n) else t for n, t in adapter.items()}  # routers with preferences
    blocks = torch.randint(0, 64, (5, 16), generator=gen(3))
    shares = routing_shares(host, adapter, blocks, batch_size=2)
    assert set(shares) == {"mlp.c_fc", "mlp.c_proj"}
    with torch.no_grad(), host.using(adapter) as model:
        model(input_ids=blocks)
        layer = model.get_submodule("transformer.h.0.mlp.c_fc")
        expected = layer.last_routing.gates.sum(0) / layer.last_routing.gates.sum()
    assert list(shares["mlp.c_fc"]) == ["g1", "s1", "s2"]
    torch.testing.assert_close(torch.tensor(list(shares["mlp.c_fc"].values())), expected, atol=1e-4, rtol=0)
    assert max(shares["mlp.c_fc"].values()) > 0.4  # far from uniform: the shares follow the router
    assert abs(sum(shares["mlp.c_proj"].values()) - 1) < 1e-3
    plain = attach_adapters(gpt2_base(), LoraConfig(rank=4, alpha=8.0), None)
    assert routing_shares(plain, plain.initial_adapter(0), blocks) == {}


def test_layer_kind_drops_the_block():
    assert layer_kind("transformer.h.11.mlp.c_fc") == "mlp.c_fc"
    assert layer_kind("model.layers.0.mlp.down_proj") == "mlp.down_proj"
    assert layer_kind("0") == "0" and layer_kind("c_fc") == "c_fc"


def test_generalists_only_runs_the_generalist_as_a_plain_lora():
    host = host_over(nn.Sequential(linear(6, 5, 0)), ("0",), rank=2, top_k=2)
    adapter = {n: torch.randn(t.shape, generator=gen(i)) for i, (n, t)
               in enumerate(host.initial_adapter(0, host.layout(2, 1, 2)).items())}
    view = generalists_only(adapter)
    assert view["0.specialist_A"].shape[0] == 0 and view["0.specialist_B"].shape[0] == 0
    assert torch.equal(view["0.router"], adapter["0.router"][:1])
    assert torch.equal(view["0.generalist_B"], adapter["0.generalist_B"])
    x = torch.randn(7, 6, generator=gen(9))
    with torch.no_grad(), host.using(view) as model:
        A, B = adapter["0.generalist_A"][0], adapter["0.generalist_B"][0]
        expected = model[0].base(x) + host.scale(2) * x @ A.t() @ B.t()
        torch.testing.assert_close(model(x), expected)
    no_generalists = host.initial_adapter(0, host.layout(2, 0, 2))
    assert all(torch.equal(t, no_generalists[n]) for n, t in generalists_only(no_generalists).items())
    plain = {"h.0.attn.lora_A": torch.ones(2, 3), "h.0.attn.lora_B": torch.zeros(3, 2)}
    assert generalists_only(plain) == plain


def test_the_report_shows_the_specialists_share_by_group():
    from rich.console import Console

    from p2pfed.records import PeerResult, RoundRecord
    from p2pfed.report import print_table, summarize
    from p2pfed.results import SchemeResult

    def peer(name, share):
        routing = {"mlp.c_fc": {"g1": 1 - share, "s1": share}}
        return PeerResult(name, [RoundRecord(0, 0, None, 20.0, {}, (), 0),
                                 RoundRecord(1, 5, 3.0, 18.0, {}, (), 9, routing=routing)])

    class Job:
        scheme, seed, graph_edges = "comigs-1g1s", 0, []
        profiles = {"peer0": "default", "peer1": "default", "peer2": "default"}
        groups = {"peer0": "english", "peer1": "english", "peer2": "italian"}
        peers = {"peer0": peer("peer0", 0.2), "peer1": peer("peer1", 0.4), "peer2": peer("peer2", 0.7)}

    summary = summarize(None, [Job()])
    routing = summary["schemes"]["comigs-1g1s"]["routing"]
    assert routing["english"]["mlp.c_fc"] == pytest.approx({"mean": 0.3, "min": 0.2, "max": 0.4})
    assert routing["italian"]["mlp.c_fc"]["mean"] == pytest.approx(0.7)
    assert SchemeResult.from_json(summary["schemes"]["comigs-1g1s"]).routing == routing
    console = Console(record=True, width=200)
    print_table(summary, console)
    assert "0.30 [0.20, 0.40]" in console.export_text()


def test_a_comigs_job_records_each_peers_routing(workspace):
    from p2pfed.swarm import run_job
    from tests.conftest import small_config

    config = small_config("training.rounds=2", "training.local_steps=2", "profiles=[{}, {specialists=2}]")
    result = run_job(config, workspace, "comigs-1g1s", seed=0)
    for name, peer in result.peers.items():
        assert peer.rounds[0].routing == {}  # before training: not recorded
        last = peer.rounds[-1].routing
        assert set(last) == {"mlp.c_fc", "mlp.c_proj"}
        labels = ["g1", "s1"] if name in ("peer0", "peer2") else ["g1", "s1", "s2"]  # profiles alternate
        for shares in last.values():
            assert list(shares) == labels and abs(sum(shares.values()) - 1) < 1e-3
