"""Plots that read at any size, groups taken per seed, and `weights` trust that is the same bits whatever order
the updates arrived in."""

from __future__ import annotations

import statistics

import pytest
import torch
from matplotlib.image import imread

from p2pfed import trust
from p2pfed.plots import draw_plots, group_label, trust_matrix
from p2pfed.report import same_group_trust, summarize
from p2pfed.swarm import run_job
from tests.conftest import small_config


def test_groups_and_same_group_trust_are_taken_per_seed_with_a_dirichlet_split(workspace, tmp_path):
    config = small_config('data.split="dirichlet"', "training.rounds=1", "training.local_steps=1",
                          'schemes=["validation"]', "seeds=[0, 2]")
    jobs = [run_job(config, workspace, "validation", seed) for seed in (0, 2)]
    assert jobs[0].groups != jobs[1].groups  # peer0 is English in seed 0, Italian in seed 2
    summary = summarize(config, jobs)
    assert summary["groups_by_seed"] == {"0": jobs[0].groups, "2": jobs[1].groups}
    expected = statistics.fmean(
        sum(w for n, w in peer.final_trust.items() if job.groups[n] == job.groups[name])
        for job in jobs for name, peer in job.peers.items())
    assert same_group_trust(summary, "validation") == pytest.approx(expected, abs=1e-12)
    assert group_label(summary, "peer0") == "english/italian" and group_label(summary, "peer1") == "english"
    assert {p.name for p in draw_plots(summary, tmp_path)} == {"curves.png", "trust_heatmap.png", "topology.png"}


def ring_summary(schemes: int) -> dict:
    names = [f"peer{i}" for i in range(6)]
    edges = [[names[i], names[(i + 1) % 6]] for i in range(6)]
    rows = {n: {n: 0.5, names[(i + 1) % 6]: 0.5} for i, n in enumerate(names)}  # the left neighbour gets 0
    row = {"trust": rows, "curve": {"round": [0, 1, 2], "test_ppl_mean": [20.0, 19.0, 18.5]},
           "per_peer": dict.fromkeys(names, 18.5), "test_ppl_mean": 18.5}
    names_of_schemes = ["validation", "fedavg", "weights", "predictions", "oracle", "flexlora", "comigs-2g"]
    return {"schemes": {name: row for name in names_of_schemes[:schemes]},
            "groups": {n: "english" if i < 3 else "italian" for i, n in enumerate(names)}, "edges": edges,
            "seeds": [0]}


def test_the_trust_heatmap_masks_pairs_that_are_not_neighbours():
    summary = ring_summary(1)
    names = [f"peer{i}" for i in range(6)]
    matrix = trust_matrix(summary, "validation", names)
    assert matrix[0, 1] == 0.5 and matrix[0, 0] == 0.5
    assert not matrix.mask[0, 5] and matrix[0, 5] == 0.0  # a neighbour given no weight: zero trust, drawn
    assert matrix.mask[0, 2] and matrix.mask[0, 3]  # not neighbours: no trust at all, masked


def test_many_schemes_go_in_a_grid_not_one_row(tmp_path):
    draw_plots(ring_summary(7), tmp_path)
    height, width, _ = imread(tmp_path / "trust_heatmap.png").shape
    assert width < 2 * height  # 3 columns by 3 rows, not 7 panels in a row
    height, width, _ = imread(tmp_path / "topology.png").shape
    assert width < 2 * height


def test_trust_rows_are_the_same_bits_whatever_order_the_updates_arrived_in():
    generator = torch.Generator().manual_seed(0)
    adapter = lambda: {f"layer{k}.lora_{m}": torch.randn(8, 16, generator=generator) for k in range(3) for m in "AB"}
    own, reference = adapter(), adapter()
    others = {f"peer{i}": adapter() for i in range(1, 12)}
    shuffled = {name: others[name] for name in sorted(others, key=lambda n: hash(n) % 7)}
    reversed_tensors = {n: dict(reversed(list(t.items()))) for n, t in others.items()}
    first = trust.cosine_scores(own, others, "peer0", reference)
    for variant in (shuffled, reversed_tensors):
        again = trust.cosine_scores(own, variant, "peer0", reference)
        assert list(again.items()) == list(first.items())  # same values, bit for bit, in the same order
    weights = trust.softmax_weights(first, "peer0", 0.1)
    arrived = {"peer0": first["peer0"], **dict(reversed([(n, s) for n, s in first.items() if n != "peer0"]))}
    assert list(trust.softmax_weights(arrived, "peer0", 0.1).items()) == list(weights.items())
    assert list(trust.sanitized_weights(dict(reversed(list(weights.items()))), "peer0").items()) == list(
        weights.items())


def test_weights_trust_is_bit_reproducible(workspace):
    config = small_config("training.rounds=3", "training.local_steps=2")
    rows = [{n: [r.trust for r in p.rounds] for n, p in run_job(config, workspace, "weights", seed=4).peers.items()}
            for _ in range(2)]
    assert rows[0] == rows[1]
