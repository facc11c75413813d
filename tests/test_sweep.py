"""`p2pfed sweep`: the product of grids of config values, a run folder per point, summary.json/.csv and a plot."""

from __future__ import annotations

import csv
import json

import pytest

from p2pfed.cli import main
from p2pfed.config import ConfigError
from p2pfed.sweep import parse_grid, plan_sweep

TINY = ["--set", "num_peers=4", "--set", "seeds=[0, 1]", "--set", "training.rounds=1",
        "--set", "training.local_steps=1", "--set", "data.train_blocks=8", "--set", "data.val_blocks=4",
        "--set", "data.test_blocks=4", "--set", "workers=1"]


def test_grids_are_toml_lists_or_bare_words():
    assert parse_grid("topology=[ring, complete]") == ("topology", ["ring", "complete"])
    assert parse_grid('schemes=["local","fedavg:validation"]') == ("schemes", ["local", "fedavg:validation"])
    assert parse_grid("schemes=[[local,fedavg],[validation]]") == ("schemes", [["local", "fedavg"], ["validation"]])
    assert parse_grid("training.lr=[1e-3, 2e-3]") == ("training.lr", [1e-3, 2e-3])
    assert parse_grid("topology=[ring, {generator=\"random_regular\", params={d=2}}]")[1][1] == {
        "generator": "random_regular", "params": {"d": 2}}
    for bad in ("topology", "topology=ring", "topology=[]", "=[1]"):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)


def test_a_point_per_combination_with_single_values_of_list_keys():
    points = plan_sweep("examples/default.toml", ["topology=[ring, star]", "schemes=[local, [fedavg, oracle]]",
                                                  "seeds=[3]"])
    assert [p.config.schemes for p in points] == [("local",), ("fedavg", "oracle")] * 2
    assert [p.config.topology.generator for p in points] == ["ring", "ring", "star", "star"]
    assert all(p.config.seeds == (3,) for p in points)
    assert points[1].name == "01-topology=ring_schemes=fedavg+oracle_seeds=3"
    with pytest.raises(ConfigError, match="given twice"):
        plan_sweep("examples/default.toml", ["seeds=[1]", "seeds=[2]"])
    with pytest.raises(ConfigError, match="no_such_topology"):
        plan_sweep("examples/default.toml", ["topology=[no_such_topology]"])


def test_a_sweep_over_two_topologies_and_two_schemes_writes_a_summary_and_a_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "examples/default.toml", "--grid", "topology=[ring,complete]", "--grid",
            "schemes=[local,fedavg]", *TINY]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grid"] == {"topology": ["ring", "complete"], "schemes": ["local", "fedavg"]}
    assert len(summary["points"]) == 4 and summary["seeds"] == [0, 1]
    for seed in ("0", "1"):  # 4 points per seed, one scheme each
        assert sum(seed in row["per_seed"] for row in summary["rows"]) == 4
    assert [(r["values"]["topology"], r["scheme"]) for r in summary["rows"]] == [
        ("ring", "local"), ("ring", "fedavg"), ("complete", "local"), ("complete", "fedavg")]
    with open(out / "summary.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert len(table) == 4 and {"topology", "scheme", "seed_0", "seed_1", "test_ppl_mean"} <= set(table[0])
    assert float(table[1]["test_ppl_mean"]) == summary["rows"][1]["test_ppl_mean"]
    assert (out / "summary.png").stat().st_size > 0
    for point in summary["points"]:
        results = json.loads((out / point["name"] / "results.json").read_text())
        degree = 2 if point["values"]["topology"] == "ring" else 3
        assert len(results["edges"]) == 4 * degree // 2
    assert "fedavg" in capsys.readouterr().out

    assert main([*args, "--out", str(out)]) == 2  # in use
    assert "not empty" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(out)]) == 0  # nothing left to run: the same summary
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]
