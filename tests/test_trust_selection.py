"""Issue 13: trust that does not lock onto the peer itself, the adaptive and spread (default) rules, and
best-round selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed import evaluate, trust
from p2pfed.config import ExperimentConfig, NetworkConfig, PeerConfig
from p2pfed.checkpoint import load_checkpoint
from p2pfed.data import batches, make_peer_data
from p2pfed.experts import is_shared
from p2pfed.loop import PeerHooks, PeerLoop, PeerSpec
from p2pfed.model import AdapterLayout, train_steps, trainable_copy
from p2pfed.net import wire
from p2pfed.net.memory import InMemoryNetwork
from p2pfed.seeding import generator
from p2pfed.selection import BestRound
from p2pfed.strategies import TRUST_RULES, TrustInputs, TrustRule, parse_scheme, trust_weights
from tests.conftest import run_peer_fed_by, small_config


def _trained(host, initial, blocks, steps: int, name: str):
    adapter = trainable_copy(initial)
    optimizer = torch.optim.AdamW(adapter.values(), lr=5e-3)
    train_steps(host, adapter, optimizer, batches(blocks, 8, generator(0, "test", name)), steps)
    return {key: p.detach().clone() for key, p in adapter.items()}


def _inputs(workspace, config, own, neighbours, val, merge=None) -> TrustInputs:
    initial = workspace.host.initial_adapter(0, AdapterLayout(rank=config.lora.rank))
    received = {name: wire.UpdateMessage(sender=name, round=1, tensors={k: t for k, t in tensors.items()
                                                                         if is_shared(k)})
                for name, tensors in neighbours.items()}
    return TrustInputs(peer="peer0", own=own, initial=initial, received=received, degree=len(received),
                       train_tokens=1, settings=config.trust, host=workspace.host, val=val, mixed_ranks=False,
                       round=1, merge=merge)


@pytest.fixture(scope="module")
def three_adapters(workspace):
    """peer0 (english) barely trained, peer1 trained much longer on peer0's own data, peer2 on italian."""
    config = small_config()
    data = make_peer_data(workspace.tokens, 4, config.data, seed=0)
    english, italian = data[0], data[2]
    assert english.group != italian.group
    initial = workspace.host.initial_adapter(0, AdapterLayout(rank=config.lora.rank))
    adapters = {"peer0": _trained(workspace.host, initial, english.train, 2, "own"),
                "peer1": _trained(workspace.host, initial, english.train, 40, "good"),
                "peer2": _trained(workspace.host, initial, italian.train, 40, "other")}
    return config, english, adapters


@pytest.mark.parametrize("rule", ["weights", "predictions"])
def test_similarity_trust_does_not_lock_onto_the_peer_when_a_neighbour_is_better_on_its_data(
        workspace, three_adapters, rule):
    config, own_data, adapters = three_adapters
    host = workspace.host
    losses = {name: evaluate.mean_loss(host, adapter, own_data.val) for name, adapter in adapters.items()}
    assert losses["peer1"] < losses["peer0"]  # the premise: the neighbour is better on the peer's own data
    inputs = _inputs(workspace, config, adapters["peer0"], {"peer1": adapters["peer1"]}, own_data.val)
    row = trust_weights(TRUST_RULES[rule], inputs)
    # Before: cosine 1 / distance 0 to itself gave the peer 0.99-1.00 of the weight.
    assert row["peer0"] <= 0.5 + 1e-9 and row["peer1"] >= 0.5 - 1e-9
    both = _inputs(workspace, config, adapters["peer0"], {"peer1": adapters["peer1"], "peer2": adapters["peer2"]},
                   own_data.val)
    row = trust_weights(TRUST_RULES[rule], both)
    assert row["peer1"] > row["peer2"]  # still: its own group's neighbour over the other group's


def test_adaptive_trust_keeps_the_row_whose_aggregate_scores_best(workspace, three_adapters):
    config, own_data, adapters = three_adapters
    host = workspace.host
    kept = {}

    def merge(row):
        merged = {}
        for key in adapters["peer0"]:
            if is_shared(key):
                merged[key] = sum(w * adapters[n][key] for n, w in row.items())
        return merged

    def watching_merge(row):
        merged = merge(row)
        kept[tuple(sorted(row.items()))] = merged
        return merged

    inputs = _inputs(workspace, config, adapters["peer0"], {"peer1": adapters["peer1"], "peer2": adapters["peer2"]},
                     own_data.val, watching_merge)
    row = trust_weights(TRUST_RULES["adaptive"], inputs)
    assert sum(row.values()) == pytest.approx(1.0) and len(kept) == len(config.trust.adaptive_temperatures) + 1
    window = evaluate.score_window(own_data.val, config.trust.score_blocks, 1)
    losses = {rows: evaluate.mean_loss(host, {**adapters["peer0"], **merged}, window) for rows, merged in kept.items()}
    assert tuple(sorted(row.items())) == min(losses, key=losses.get)
    assert row["peer1"] > row["peer2"]


def test_the_default_spread_trust_follows_the_peers_data_not_itself(workspace, three_adapters):
    assert PeerConfig().scheme == "spread" and "spread" in ExperimentConfig().schemes
    config, own_data, adapters = three_adapters
    host = workspace.host
    assert evaluate.mean_loss(host, adapters["peer1"], own_data.val) < evaluate.mean_loss(
        host, adapters["peer0"], own_data.val)  # the premise: the neighbour is better on the peer's own data
    inputs = _inputs(workspace, config, adapters["peer0"], {"peer1": adapters["peer1"], "peer2": adapters["peer2"]},
                     own_data.val)
    row = trust_weights(TRUST_RULES["spread"], inputs)
    assert row["peer1"] > row["peer0"] > row["peer2"] and row["peer0"] < 0.5
    assert math.fsum(row.values()) == pytest.approx(1.0)
    # Stateless: the same inputs give the same row bit for bit, so a peer resumed from a checkpoint (which
    # holds no trust state) weighs its neighbours as it would have without the restart.
    assert trust_weights(TRUST_RULES["spread"], inputs) == row
    # It scores the first trust.score_tokens tokens of every block: the row is the kernel of exactly those.
    prefix = evaluate.score_tokens(own_data.val, config.trust.score_tokens)
    assert prefix.shape == (len(own_data.val), config.trust.score_tokens)
    scores = evaluate.validation_scores(host, inputs.candidates(), prefix)
    settings_ = config.trust
    assert row == trust.spread_weights(scores, "peer0", settings_.spread_width, settings_.spread_floor,
                                       settings_.spread_ceiling)


def test_the_spread_kernel_splits_far_and_close_groups_alike():
    far = {"a": -2.0, "b": -2.01, "c": -2.4, "d": -2.41}
    close = {n: -2.0 + (v + 2.0) / 8 for n, v in far.items()}  # the same groups, 8 times closer
    rows = [trust.spread_weights(s, "a", 0.5, 0.001, 1.0) for s in (far, close)]
    assert rows[0] == pytest.approx(rows[1])
    # Flat within the own group, next to nothing outside it.
    assert rows[0]["b"] > 0.9 * rows[0]["a"] and rows[0]["c"] + rows[0]["d"] < 1e-6
    # The floor: scores that differ by noise only are not magnified into a sharp row; the ceiling: one wild
    # neighbour does not widen the kernel over the other group.
    assert trust.spread_width({"a": -2.0, "b": -2.001}, 0.5, 0.02, 0.1) == 0.02
    noise = trust.spread_weights({"a": -2.0, "b": -2.001}, "a", 0.5, 0.02, 0.1)
    assert noise["b"] > 0.49
    wild = {**far, "e": -40.0}
    assert trust.spread_width(wild, 0.5, 0.02, 0.1) == 0.1
    assert trust.spread_weights(wild, "a", 0.5, 0.02, 0.1)["c"] < 1e-6
    assert evaluate.score_tokens(torch.zeros(3, 8), 0).shape == (3, 8)
    assert evaluate.score_tokens(torch.zeros(3, 8), 5).shape == (3, 5)


@given(st.dictionaries(st.sampled_from(["b", "c", "d", "e"]), st.floats(allow_nan=True, allow_infinity=True),
                       min_size=0, max_size=4),
       st.floats(allow_nan=True, allow_infinity=True), st.floats(1e-3, 10.0), st.floats(1e-4, 1.0),
       st.floats(1.0, 100.0), st.integers(0, 3))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_spread_trust_is_a_finite_probability_vector_for_any_scores(others, own, per_spread, floor, ratio, top_k):
    scores = {"a": own, **others}
    assert floor <= trust.spread_width(scores, per_spread, floor, floor * ratio) <= floor * ratio
    row = trust.spread_weights(scores, "a", per_spread, floor, floor * ratio, top_k)
    assert set(row) == set(scores) and all(math.isfinite(w) and w >= 0 for w in row.values())
    assert math.fsum(row.values()) == pytest.approx(1.0)
    if math.isfinite(own) and all(math.isfinite(v) and v < own for v in others.values()):
        assert row["a"] == max(row.values())  # the best-scored candidate is never weighed below another


def test_the_score_window_moves_through_every_block():
    blocks = torch.arange(10).unsqueeze(1)
    seen = torch.cat([evaluate.score_window(blocks, 4, r) for r in range(5)]).flatten().tolist()
    assert seen[:4] == [0, 1, 2, 3] and seen[4:8] == [4, 5, 6, 7] and seen[8:12] == [8, 9, 0, 1]
    assert set(seen) == set(range(10))
    assert evaluate.score_window(blocks, 0, 3) is blocks and evaluate.score_window(blocks, 12, 3) is blocks


@given(st.dictionaries(st.sampled_from(["b", "c", "d", "e"]), st.floats(allow_nan=True, allow_infinity=True),
                       min_size=1, max_size=4),
       st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["weights", "validation", "predictions"]),
       st.integers(0, 3))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_any_rules_scores_give_a_finite_probability_vector(others, own, temperature, top_k):
    from dataclasses import replace

    from p2pfed.strategies import _self_as_closest

    config = small_config(f"trust.top_k={top_k}")
    scores = {"a": own, **others}
    rule = TrustRule("any", lambda inputs: _self_as_closest(scores, "a"), temperature=temperature)
    inputs = TrustInputs(peer="a", own={}, initial={}, received=dict.fromkeys(others), degree=len(others),
                         train_tokens=1, settings=replace(config.trust), host=None, val=torch.zeros(1, 2),
                         mixed_ranks=False)
    row = trust_weights(rule, inputs)
    assert set(row) == set(scores)
    assert all(math.isfinite(w) and w >= 0 for w in row.values())
    assert math.fsum(row.values()) == pytest.approx(1.0)


def test_best_round_keeps_the_earliest_lowest_loss_and_never_nan():
    best = BestRound()
    for round_index, loss in enumerate([3.0, 1.0, math.nan, 2.0, 1.0]):
        best.offer(round_index, loss, {"x": torch.full((1,), float(round_index))})
    assert (best.round, best.val_loss, float(best.tensors["x"])) == (1, 1.0, 1.0)
    assert BestRound.from_meta(best.to_meta()).round == 1 and BestRound.from_meta(None).tensors is None


def _local_peer(workspace, state_dir=None, on_round=None):
    # Scarce data and a high learning rate: the peer overfits, so its best validation round is an early one.
    config = small_config("data.train_blocks=4", "training.rounds=5", "training.local_steps=10", "training.lr=5e-3")
    host = workspace.host
    data = make_peer_data(workspace.tokens, 4, config.data, seed=0)[0]
    layout = AdapterLayout(rank=config.lora.rank)
    network = InMemoryNetwork(NetworkConfig(), seed=0)
    spec = PeerSpec(name="peer0", neighbours=(), scheme=parse_scheme("local"), layout=layout, seed=0,
                    training=config.training, trust=config.trust, state_dir=state_dir)
    loop = PeerLoop(spec, host, data, network.endpoint("peer0"), host.initial_adapter(0, layout),
                    PeerHooks(on_round=on_round))
    return loop, network, data


async def _nothing():
    return None


def test_selection_returns_the_best_validation_rounds_adapter_and_survives_a_restart(workspace, tmp_path):
    snapshots = {}
    loop, network, data = _local_peer(
        workspace, str(tmp_path), lambda _, record: snapshots.__setitem__(
            record.round, {k: p.detach().clone() for k, p in loop.adapter.items()}))
    result = run_peer_fed_by(network, loop, _nothing)
    losses = {r.round: r.val_loss for r in result.rounds}
    best_round = min(losses, key=lambda r: (losses[r], r))
    assert result.selected.round == best_round
    assert 0 < best_round < 5  # the premise: overfitting makes an early round the best, not the last
    assert result.selected.val_loss == losses[best_round]
    for name, parameter in loop.adapter.items():  # the peer ends with that round's adapter
        assert torch.equal(parameter.detach(), snapshots[best_round][name]), name
    assert result.selected.test_ppl == pytest.approx(evaluate.perplexity(workspace.host, loop.adapter, data.test))
    assert result.selected.test_ppl != result.final_test_ppl

    saved = load_checkpoint(tmp_path).meta["best"]
    assert saved["round"] == best_round and torch.equal(
        saved["tensors"][next(iter(saved["tensors"]))], snapshots[best_round][next(iter(saved["tensors"]))])
    again, network, _ = _local_peer(workspace, str(tmp_path))  # finished before: nothing to run, same choice
    assert run_peer_fed_by(network, again, _nothing).selected == result.selected
