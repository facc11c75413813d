"""The method families in the swarm: CoMiGS expert layers (what is shared, what never leaves) and
mixed LoRA ranks (FlexLoRA projection, zero-padded baseline, trust across ranks)."""

from __future__ import annotations

import logging

import pytest
import torch

from p2pfed import aggregate, trust
from p2pfed.net import wire
from p2pfed.config import NetworkConfig
from p2pfed.strategies import parse_scheme
from p2pfed.data import make_peer_data
from p2pfed.experts import is_shared
from p2pfed.model import AdapterLayout
from p2pfed.job import job_setup, peer_specs
from p2pfed.loop import PeerLoop, PeerSpec
from p2pfed.swarm import run_job
from p2pfed.net.memory import InMemoryNetwork
from tests.conftest import run_peer_fed_by, small_config


@pytest.fixture
def sent_payloads(monkeypatch):
    """Every payload any in-memory endpoint hands to the network, as (sender, receiver, bytes)."""
    sent = []
    deliver = InMemoryNetwork.deliver

    async def spy(self, sender, to, number, payload):
        sent.append((sender, to, payload))
        await deliver(self, sender, to, number, payload)

    monkeypatch.setattr(InMemoryNetwork, "deliver", spy)
    return sent


def test_no_specialist_or_router_tensor_reaches_the_transport(workspace, sent_payloads):
    config = small_config("training.rounds=2", "training.local_steps=2", "profiles=[{}, {specialists=2}]")
    graph, data = job_setup(config, workspace, seed=0)
    layouts = [spec.layout for spec in peer_specs(config, graph, data, "comigs-1g1s", seed=0)]
    assert [layout.specialists for layout in layouts] == [1, 2, 1, 2]  # a profile's own number of specialists

    result = run_job(config, workspace, "comigs-1g1s", seed=0)
    assert len(sent_payloads) == 4 * 3 * 2  # every peer, every neighbour, every round
    names = set()
    for _, _, payload in sent_payloads:
        names |= set(wire.decode_update(payload).tensors)
    assert all(is_shared(name) for name in names)
    assert not any("specialist" in name or "router" in name for name in names)
    assert any(name.endswith("generalist_A") for name in names) and any(name.endswith("lora_A") for name in names)
    assert all(p.final_test_ppl > 1 for p in result.peers.values())


def test_comigs_2s_sends_nothing_and_1g1s_sends_less_than_2g(workspace, sent_payloads):
    config = small_config("training.rounds=1", "training.local_steps=1")
    sent = {scheme: run_job(config, workspace, scheme, seed=0).peers["peer0"].bytes_sent
            for scheme in ("comigs-2s", "comigs-1g1s", "comigs-2g")}
    assert sent["comigs-2s"] == 0
    # The MLP experts dominate; the attention LoRA is sent by both.
    assert sent["comigs-1g1s"] < 0.75 * sent["comigs-2g"]


@pytest.mark.slow
def test_comigs_1g1s_beats_fedavg_on_a_heterogeneous_split(workspace):
    config = small_config("training.rounds=4", "training.local_steps=10")
    ppl = {scheme: sum(p.final_test_ppl for p in run_job(config, workspace, scheme, seed=0).peers.values()) / 4
           for scheme in ("fedavg", "comigs-1g1s")}
    assert ppl["comigs-1g1s"] < ppl["fedavg"]


# -- mixed ranks -------------------------------------------------------------------------

def test_a_peers_lora_scale_follows_the_rank_of_the_adapter_it_points_at(workspace):
    """A rank-2 adapter and the same adapter zero-padded to rank 8 (B rescaled by s2/s8) predict the same."""
    host = workspace.host
    small = host.initial_adapter(1, host.layout(rank=2))
    small = {n: t if n.endswith("lora_A") else torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) * 0.1
             for n, t in small.items()}
    ratio = host.scale(2) / host.scale(8)
    padded = {}
    for name, tensor in small.items():
        if name.endswith("lora_A"):
            padded[name] = torch.cat([tensor, torch.zeros(6, tensor.shape[1])])
        else:
            padded[name] = torch.cat([tensor * ratio, torch.zeros(tensor.shape[0], 6)], dim=1)
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with host.using(small) as model:
            a = model(input_ids=batch).logits
        with host.using(padded) as model:
            b = model(input_ids=batch).logits
        with host.using(host.initial_adapter(0)) as model:
            base = model(input_ids=batch).logits  # B = 0: the frozen model
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-3)


def test_projecting_whole_adapters_keeps_each_peers_rank_and_the_exact_average_when_it_fits():
    gen = torch.Generator().manual_seed(0)

    def adapter(rank):
        return {"m.lora_A": torch.randn(rank, 6, generator=gen), "m.lora_B": torch.randn(5, rank, generator=gen)}

    def scale(rank):
        return 16.0 / rank

    states = {"a": adapter(2), "b": adapter(3), "c": adapter(1)}
    weights = {"a": 0.5, "b": 0.25, "c": 0.25}
    target = sum(w * scale(states[p]["m.lora_A"].shape[0]) * states[p]["m.lora_B"] @ states[p]["m.lora_A"]
                 for p, w in weights.items())
    states["big"] = adapter(6)  # rank 6 >= 2 + 3 + 1: the projection loses nothing
    merged = aggregate.project_adapter(states, {**weights, "big": 0.0}, "big", scale)
    assert merged["m.lora_A"].shape == (6, 6) and merged["m.lora_B"].shape == (5, 6)
    assert torch.allclose(scale(6) * merged["m.lora_B"] @ merged["m.lora_A"], target, atol=1e-4)
    small = aggregate.project_adapter(states, {**weights, "big": 0.0}, "c", scale)
    assert small["m.lora_A"].shape == (1, 6)  # the low-resource peer keeps its own rank
    padded = aggregate.project_adapter(states, {**weights, "big": 0.0}, "big", scale, method="zero_padded")
    assert not torch.allclose(scale(6) * padded["m.lora_B"] @ padded["m.lora_A"], target, atol=1e-2)
    with pytest.raises(ValueError, match="come together"):
        aggregate.lora_pairs({"m.lora_A": torch.zeros(2, 6)}, scale)
    with pytest.raises(ValueError, match="expected A"):
        aggregate.lora_pairs({"m.lora_A": torch.zeros(2, 6), "m.lora_B": torch.zeros(5, 3)}, scale)


def test_weight_similarity_across_ranks_is_the_cosine_of_the_full_updates():
    gen = torch.Generator().manual_seed(4)

    def factors(rank, scale):
        return {layer: aggregate.LoraFactors(torch.randn(rank, 7, generator=gen), torch.randn(4, rank, generator=gen),
                                             scale) for layer in ("x", "y")}

    own, other = factors(2, 8.0), factors(5, 3.2)
    dense_own = torch.cat([f.delta().flatten() for f in own.values()]).double()
    dense_other = torch.cat([f.delta().flatten() for f in other.values()]).double()
    expected = float(dense_own @ dense_other / (dense_own.norm() * dense_other.norm()))
    scores = trust.product_cosine_scores(own, {"n": other, "same": own}, "me")
    assert scores["n"] == pytest.approx(expected, abs=1e-6)  # the dense reference is float32
    assert scores["same"] == pytest.approx(1.0) and scores["me"] == 1.0


def test_wire_leaves_the_rank_free_only_where_asked():
    message = wire.encode_update(wire.UpdateMessage("p", 1, {"m.lora_A": torch.zeros(4, 6),
                                                              "m.lora_B": torch.zeros(5, 4)}))
    assert wire.decode_update(message, {"m.lora_A": (None, 6), "m.lora_B": (5, None)}).tensors["m.lora_A"].shape[0] == 4
    with pytest.raises(wire.WireError, match="shape"):
        wire.decode_update(message, {"m.lora_A": (None, 7), "m.lora_B": (5, None)})
    with pytest.raises(wire.WireError, match="shape"):
        wire.decode_update(message, {"m.lora_A": (8, 6), "m.lora_B": (5, 8)})


@pytest.mark.parametrize("scheme", ["flexlora", "zero-padded", "flexlora:weights", "flexlora:validation",
                                    "flexlora:predictions"])
def test_mixed_ranks_run_with_every_trust_scheme(workspace, scheme):
    config = small_config("training.rounds=2", "training.local_steps=3", "profiles=[{rank=2}, {rank=8}]",
                          f'schemes=["{scheme}"]')
    result = run_job(config, workspace, scheme, seed=0)
    for name, peer in result.peers.items():
        last = peer.rounds[-1]
        assert last.missing == () and len(last.trust) == 4, name  # every neighbour's update was decoded and used
        assert 1 < peer.final_test_ppl < 1e4
    if scheme.endswith(("validation", "predictions")):
        # Rank-2 peers trust their own group most, whatever their neighbours' ranks.
        trust_row = result.peers["peer0"].final_trust
        assert trust_row["peer1"] > max(trust_row["peer2"], trust_row["peer3"])


def test_a_neighbour_whose_factors_disagree_in_rank_is_dropped(workspace, caplog):
    config = small_config("training.rounds=1", "training.local_steps=1")
    host = workspace.host
    data = make_peer_data(workspace.tokens, 4, config.data, seed=0)[0]
    layout = AdapterLayout(rank=4)
    initial = host.initial_adapter(0, layout)
    network = InMemoryNetwork(NetworkConfig(), seed=0)
    spec = PeerSpec(name="peer0", neighbours=("peer1",), scheme=parse_scheme("flexlora"), layout=layout, seed=0,
                    training=config.training, trust=config.trust)
    peer = PeerLoop(spec, host, data, network.endpoint("peer0"), initial)
    neighbour = network.endpoint("peer1")
    good = host.initial_adapter(1, AdapterLayout(rank=2))
    a_name = next(n for n in good if n.endswith("lora_A"))
    skewed = dict(good, **{a_name: torch.zeros(3, good[a_name].shape[1])})  # A of rank 3, B of rank 2

    def message(tensors):
        return wire.encode_update(wire.UpdateMessage(sender="peer1", round=1, tensors=tensors))

    async def feed():
        await neighbour.send("peer0", message(skewed))
        await neighbour.send("peer0", message(good))  # rank 2 to a rank-4 peer: fine under FlexLoRA

    with caplog.at_level(logging.WARNING, logger="p2pfed.loop"):
        result = run_peer_fed_by(network, peer, feed)
    assert "dropped a bad update from peer1" in caplog.text and "expected A" in caplog.text
    assert result.rounds[1].trust == {"peer0": 0.5, "peer1": 0.5}


def test_the_report_breaks_results_down_by_peer_profile(workspace, capsys):
    from p2pfed.report import print_table, summarize

    config = small_config("training.rounds=1", "training.local_steps=1",
                          'profiles=[{name="small", rank=2}, {name="big", rank=8}]', 'schemes=["local", "flexlora"]')
    jobs = [run_job(config, workspace, scheme, seed=0) for scheme in config.schemes]
    summary = summarize(config, jobs)
    assert summary["profiles"] == {"peer0": "small", "peer1": "big", "peer2": "small", "peer3": "big"}
    for scheme in config.schemes:
        rows = summary["schemes"][scheme]["by_profile"]
        assert list(rows) == ["small", "big"] and all(row["peers"] == 2 for row in rows.values())
        small = [jobs[config.schemes.index(scheme)].peers[p].final_test_ppl for p in ("peer0", "peer2")]
        assert rows["small"]["test_ppl_mean"] == pytest.approx(sum(small) / 2)
    print_table(summary)
    assert "by peer profile" in capsys.readouterr().out
