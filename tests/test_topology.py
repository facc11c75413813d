import random
import warnings
from dataclasses import replace
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed.config import ConfigError, TopologyConfig, peer_index, peer_name
from p2pfed.load import load_topology
from p2pfed.trust import metropolis_hastings_weights
from p2pfed.topology import (
    TopologyWarning,
    build_graph,
    graph_at_round,
    mixing_weights,
    neighbours,
)

TOPOLOGIES = Path(__file__).resolve().parents[1] / "topologies"
SHIPPED = sorted(p.stem for p in TOPOLOGIES.glob("*.toml"))
RANDOM = ["random_regular", "erdos_renyi", "watts_strogatz", "barabasi_albert"]


def edges(graph: nx.Graph) -> list[tuple[int, int]]:
    return sorted(graph.edges())


def quiet_build(config: TopologyConfig, num_peers: int = 8, seed: int = 0) -> nx.Graph:
    # For graphs whose connectivity depends on the draw; the warning has its own test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TopologyWarning)
        return build_graph(config, num_peers, seed)


# ---------------------------------------------------------------------------
# Shipped topology files.

def test_every_named_topology_is_shipped():
    expected = {"ring", "complete", "random_regular", "erdos_renyi", "watts_strogatz",
                "barabasi_albert", "torus", "star", "edge_list"}
    assert expected <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_topology_builds_for_8_peers(name):
    config = load_topology(TOPOLOGIES / f"{name}.toml")
    assert (TOPOLOGIES / f"{name}.toml").read_text().startswith("# ")
    graph = quiet_build(config)
    assert sorted(graph.nodes()) == list(range(8))
    assert nx.number_of_selfloops(graph) == 0
    if name != "erdos_renyi":  # G(n, p) may come out disconnected; that case only warns
        assert nx.is_connected(graph)


def test_edge_list_path_resolves_against_the_toml_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path must not depend on the working directory
    config = load_topology(TOPOLOGIES / "edge_list.toml")
    assert Path(config.path) == (TOPOLOGIES / "two_cliques.edges").resolve()
    graph = build_graph(config, 8, 0)
    clique_a = [(u, v) for u in range(4) for v in range(u + 1, 4)]
    clique_b = [(u, v) for u in range(4, 8) for v in range(u + 1, 8)]
    assert edges(graph) == sorted(clique_a + clique_b + [(3, 4)])


def test_load_topology_checks_keys_and_generator(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text('generator = "ring"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match=r"topology\.colour: unknown key"):
        load_topology(bad_key)
    bad_generator = tmp_path / "bad_generator.toml"
    bad_generator.write_text('generator = "hypercube"\n')
    with pytest.raises(ConfigError, match="unknown generator 'hypercube'"):
        load_topology(bad_generator)
    with pytest.raises(ConfigError, match="no such file"):
        load_topology(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------
# Seeds.

@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_graph_different_seed_different_graph(name):
    config = load_topology(TOPOLOGIES / f"{name}.toml")
    first = quiet_build(config, seed=1)
    assert edges(first) == edges(quiet_build(config, seed=1))
    assert any(edges(first) != edges(quiet_build(config, seed=s)) for s in (2, 3, 4))


def test_config_seed_overrides_the_experiment_seed():
    config = TopologyConfig(generator="random_regular", params={"d": 3}, seed=7)
    assert edges(build_graph(config, 8, 0)) == edges(build_graph(config, 8, 1))
    assert edges(build_graph(config, 8, 0)) == edges(build_graph(replace(config, seed=None), 8, 7))


def test_building_leaves_the_global_random_state_alone():
    state = random.getstate()
    for name in RANDOM:
        quiet_build(load_topology(TOPOLOGIES / f"{name}.toml"))
    assert random.getstate() == state


# ---------------------------------------------------------------------------
# Structure.

def test_ring():
    graph = build_graph(TopologyConfig(generator="ring"), 8, 0)
    assert all(neighbours(graph, i) == sorted({(i - 1) % 8, (i + 1) % 8}) for i in range(8))
    assert edges(build_graph(TopologyConfig(generator="ring"), 2, 0)) == [(0, 1)]
    assert graph.number_of_edges() == 8
    single = build_graph(TopologyConfig(generator="ring"), 1, 0)  # cycle_graph(1) has a self loop
    assert nx.number_of_selfloops(single) == 0 and list(single.nodes()) == [0]


def test_star_hub_is_node_zero():
    graph = build_graph(TopologyConfig(generator="star"), 8, 0)
    assert neighbours(graph, 0) == list(range(1, 8))
    assert all(neighbours(graph, i) == [0] for i in range(1, 8))


def test_complete():
    graph = build_graph(TopologyConfig(generator="complete"), 5, 0)
    assert graph.number_of_edges() == 10


def test_torus_picks_the_most_square_grid_row_major():
    graph = build_graph(TopologyConfig(generator="torus"), 12, 0)  # 3 x 4
    assert all(d == 4 for _, d in graph.degree())
    # node 5 = row 1, col 1: left, right, up, down
    assert neighbours(graph, 5) == [1, 4, 6, 9]
    # node 0 wraps to the end of its row and to the last row
    assert neighbours(graph, 0) == [1, 3, 4, 8]


def test_torus_with_given_rows_and_cols():
    graph = build_graph(TopologyConfig(generator="torus", params={"rows": 4, "cols": 4}), 16, 0)
    assert all(d == 4 for _, d in graph.degree())
    assert neighbours(graph, 0) == [1, 3, 4, 12]
    only_cols = build_graph(TopologyConfig(generator="torus", params={"cols": 6}), 12, 0)  # 2 x 6
    assert neighbours(only_cols, 0) == [1, 5, 6]
    with pytest.raises(ConfigError, match=r"topology\.params\.rows: rows \* cols = 3 \* 3 must equal num_peers = 8"):
        build_graph(TopologyConfig(generator="torus", params={"rows": 3, "cols": 3}), 8, 0)
    with pytest.raises(ConfigError, match=r"topology\.params\.cols: must divide num_peers = 8"):
        build_graph(TopologyConfig(generator="torus", params={"cols": 3}), 8, 0)


def test_torus_of_a_prime_is_a_ring():
    graph = build_graph(TopologyConfig(generator="torus"), 7, 0)
    assert edges(graph) == edges(build_graph(TopologyConfig(generator="ring"), 7, 0))


# ---------------------------------------------------------------------------
# Edge lists.

def edge_list(tmp_path: Path, text: str) -> TopologyConfig:
    path = tmp_path / "graph.edges"
    path.write_text(text)
    return TopologyConfig(generator="edge_list", path=str(path))


def test_edge_list_parsing(tmp_path):
    config = edge_list(tmp_path, "# a path\n0 1   # first\n\n  1 2\n2 1\n")
    graph = build_graph(config, 3, 0)
    assert edges(graph) == [(0, 1), (1, 2)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 1\n1 8\n", r"graph\.edges:2: node 8 is out of range 0\.\.7 for 8 peers"),
        ("0 -1\n", "node -1 is out of range"),
        ("0 1 2\n", r"graph\.edges:1: expected one edge 'u v'"),
        ("0\n", "expected one edge"),
        ("a b\n", "node ids must be integers"),
        ("3 3\n", "self loop on node 3"),
    ],
)
def test_edge_list_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        build_graph(edge_list(tmp_path, text), 8, 0)


def test_edge_list_missing_file_and_missing_path(tmp_path):
    missing = TopologyConfig(generator="edge_list", path=str(tmp_path / "nope.edges"))
    with pytest.raises(ConfigError, match=r"topology\.path: no such file"):
        build_graph(missing, 8, 0)
    with pytest.raises(ConfigError, match=r"topology\.path: required by generator 'edge_list'"):
        build_graph(TopologyConfig(generator="edge_list"), 8, 0)
    with pytest.raises(ConfigError, match=r"topology\.path: only read by generator 'edge_list'"):
        build_graph(TopologyConfig(generator="ring", path="x.edges"), 8, 0)


# ---------------------------------------------------------------------------
# Errors and warnings.

def test_unknown_generator_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown generator 'hypercube'") as error:
        build_graph(TopologyConfig(generator="hypercube"), 8, 0)
    assert "ring" in str(error.value) and "watts_strogatz" in str(error.value)


@pytest.mark.parametrize(
    "generator, params, message",
    [
        ("ring", {"d": 3}, r"topology\.params\.d: unknown parameter for generator 'ring'"),
        ("random_regular", {}, r"topology\.params\.d: required by generator 'random_regular'"),
        ("random_regular", {"d": 3.0}, r"topology\.params\.d: expected an integer"),
        ("random_regular", {"d": True}, r"topology\.params\.d: expected an integer"),
        ("random_regular", {"d": 8}, r"topology\.params\.d: must be in \[0, num_peers\)"),
        ("random_regular", {"d": 3}, r"topology\.params\.d: num_peers \* d must be even"),
        ("erdos_renyi", {"p": 1.5}, r"topology\.params\.p: must be in \[0, 1\]"),
        ("erdos_renyi", {"p": "high"}, r"topology\.params\.p: expected a number"),
        ("watts_strogatz", {"k": 3, "p": 0.1}, r"topology\.params\.k: must be even"),
        ("watts_strogatz", {"k": 4}, r"topology\.params\.p: required"),
        ("barabasi_albert", {"m": 0}, r"topology\.params\.m: must be in \[1, num_peers\)"),
        ("torus", {"rows": 0}, r"topology\.params\.rows: must be at least 1"),
        ("ring", {"resample_every": 0}, r"topology\.params\.resample_every: must be an integer >= 1"),
    ],
)
def test_bad_params_raise_config_error_naming_the_key(generator, params, message):
    num_peers = 7 if params == {"d": 3} else 8
    with pytest.raises(ConfigError, match=message):
        build_graph(TopologyConfig(generator=generator, params=params), num_peers, 0)


def test_bad_num_peers():
    with pytest.raises(ConfigError, match="num_peers"):
        build_graph(TopologyConfig(generator="ring"), 0, 0)


def test_disconnected_graph_warns_with_the_number_of_components():
    with pytest.warns(TopologyWarning, match="8 connected components"):
        graph = build_graph(TopologyConfig(generator="erdos_renyi", params={"p": 0.0}), 8, 0)
    assert graph.number_of_edges() == 0
    assert mixing_weights(graph, 3, "metropolis_hastings") == {3: 1.0}  # an isolated peer keeps itself


def test_connected_graph_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_graph(TopologyConfig(generator="ring"), 8, 0)


# ---------------------------------------------------------------------------
# Peer names.

def test_peer_names_round_trip():
    assert peer_name(3) == "peer3"
    assert all(peer_index(peer_name(i)) == i for i in (0, 1, 10, 123))
    for bad in ("peer", "peer-1", "peer01", "Peer1", "node1", "peer1 ", 1):
        with pytest.raises(ConfigError):
            peer_index(bad)


# ---------------------------------------------------------------------------
# Mixing weights.

def test_metropolis_hastings_on_a_path():
    graph = nx.path_graph(3)  # degrees 1, 2, 1
    assert mixing_weights(graph, 0, "metropolis_hastings") == pytest.approx({0: 2 / 3, 1: 1 / 3})
    assert mixing_weights(graph, 1, "metropolis_hastings") == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    assert mixing_weights(graph, 2, "metropolis_hastings") == pytest.approx({1: 1 / 3, 2: 2 / 3})


def test_metropolis_hastings_on_a_star():
    graph = build_graph(TopologyConfig(generator="star"), 4, 0)  # hub degree 3, leaves degree 1
    assert mixing_weights(graph, 0, "metropolis_hastings") == pytest.approx({0: 1 / 4, 1: 1 / 4, 2: 1 / 4, 3: 1 / 4})
    assert mixing_weights(graph, 1, "metropolis_hastings") == pytest.approx({0: 1 / 4, 1: 3 / 4})


def test_metropolis_hastings_weight_formula():
    assert metropolis_hastings_weights("i", 1, {"j": 2})["j"] == pytest.approx(1 / 3)
    assert metropolis_hastings_weights("i", 5, {"j": 2})["j"] == pytest.approx(1 / 6)
    assert metropolis_hastings_weights("i", 2, {"j": 5})["j"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        metropolis_hastings_weights("i", 2, {"j": 0})


def test_uniform_weights():
    graph = nx.path_graph(3)
    assert mixing_weights(graph, 0, "uniform") == pytest.approx({0: 1 / 2, 1: 1 / 2})
    assert mixing_weights(graph, 1, "uniform") == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    ring = build_graph(TopologyConfig(generator="ring"), 8, 0)
    for node in ring:
        weights = mixing_weights(ring, node, "uniform")
        assert sorted(weights) == sorted([node, *neighbours(ring, node)])
        assert sum(weights.values()) == pytest.approx(1.0)


def test_unknown_mixing_kind_and_node():
    graph = nx.path_graph(3)
    with pytest.raises(ConfigError, match="unknown kind 'average'"):
        mixing_weights(graph, 0, "average")
    with pytest.raises(ValueError, match="not in the graph"):
        mixing_weights(graph, 5, "uniform")


@st.composite
def graphs(draw):
    n = draw(st.integers(min_value=1, max_value=12))
    pairs = [(u, v) for u in range(n) for v in range(u + 1, n)]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else [])
    return graph


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_metropolis_hastings_rows_sum_to_one_non_negative_and_symmetric(graph):
    rows = {i: mixing_weights(graph, i, "metropolis_hastings") for i in graph}
    for i, row in rows.items():
        assert set(row) == {i, *graph.neighbors(i)}
        assert sum(row.values()) == pytest.approx(1.0)
        assert all(w >= 0 for w in row.values())
        for j, w in row.items():
            assert rows[j][i] == w  # symmetric, hence doubly stochastic


# ---------------------------------------------------------------------------
# Time-varying graphs.

def test_graph_at_round_is_static_without_resample_every():
    config = TopologyConfig(generator="random_regular", params={"d": 3})
    static = edges(build_graph(config, 8, 0))
    assert all(edges(graph_at_round(config, 8, 0, r)) == static for r in (0, 1, 5, 100))


def test_graph_at_round_resamples_every_period_and_is_stable_within_one():
    config = TopologyConfig(generator="random_regular", params={"d": 3, "resample_every": 3})
    per_round = [edges(quiet_build_at(config, r)) for r in range(12)]
    for period in range(4):
        assert len({tuple(e) for e in per_round[3 * period: 3 * period + 3]}) == 1
    assert len({tuple(per_round[3 * period]) for period in range(4)}) > 1
    assert per_round == [edges(quiet_build_at(config, r)) for r in range(12)]  # reproducible
    # every drawn graph is still the generator's kind of graph
    assert all(d == 3 for _, d in graph_at_round(config, 8, 0, 7).degree())
    # build_graph accepts the key and gives a valid graph of the same kind
    assert all(d == 3 for _, d in build_graph(config, 8, 0).degree())


def test_graph_at_round_depends_on_the_seed():
    config = TopologyConfig(generator="erdos_renyi", params={"p": 0.5, "resample_every": 1})
    assert edges(quiet_build_at(config, 4, seed=0)) != edges(quiet_build_at(config, 4, seed=1))


def quiet_build_at(config: TopologyConfig, round_index: int, seed: int = 0) -> nx.Graph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TopologyWarning)
        return graph_at_round(config, 8, seed, round_index)
