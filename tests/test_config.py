import pytest

from p2pfed.config import ConfigError, ExperimentConfig
from p2pfed.load import load_experiment, parse_override
from p2pfed.strategies import Scheme, parse_scheme


def test_defaults_validate():
    config = load_experiment(None)
    assert isinstance(config, ExperimentConfig)
    assert config.training.rounds >= 1


def test_default_example_loads_with_its_topology():
    config = load_experiment("examples/default.toml")
    assert config.topology.generator == "complete"
    assert "validation" in config.schemes and "local" in config.schemes


def test_unknown_key_names_its_path(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[training]\nround = 3\n")
    with pytest.raises(ConfigError, match=r"training\.round: unknown key"):
        load_experiment(path)


@pytest.mark.parametrize("assignment, message", [
    ("training.rounds=0", r"training\.rounds: must be at least 1"),
    ("training.rounds=1.5", r"training\.rounds: expected an integer"),
    ("training.rounds=true", r"training\.rounds: expected an integer"),
    ("training.lr=\"fast\"", r"training\.lr: expected a number"),
    ('schemes=["local", "magic"]', r"schemes: unknown scheme 'magic'"),
    ('schemes=["flexlora:magic"]', r"schemes: unknown scheme 'flexlora:magic'"),
    ('schemes=["comigs-1g1s:local"]', r"schemes: unknown scheme"),
    ('profiles=[{rank=4}, {rank=8}]', r"schemes: 'fedavg' averages A and B, which needs one LoRA rank"),
    ('experts.router_every=0', r"experts\.router_every: must be at least 1"),
    ('schemes=["local", "local"]', r"schemes: lists a scheme twice"),
    ("data.split=\"random\"", r"data\.split: 'random' is not one of"),
    ("trust.temperature.validation=0", r"trust\.temperature\.validation: must be positive"),
    ("network.drop_prob=1.0", r"network\.drop_prob: must be in \[0, 1\)"),
    ("model.n_embd=65", r"model\.n_embd: must be a multiple of model\.n_head"),
    ("lora=3", r"lora: expected a table"),
    # Values that used to pass the check and crash (or poison the weights) rounds later:
    ("training.lr=inf", r"training\.lr: must be a finite number"),
    ("trust.temperature.predictions=nan", r"trust\.temperature\.predictions: must be a finite number"),
    ("trust.threshold=nan", r"trust\.threshold: must be a finite number"),
    ("trust.threshold=1.5", r"trust\.threshold: must be in \[0, 1\)"),
    ("training.weight_decay=-0.1", r"training\.weight_decay: must not be negative"),
    ("lora.alpha=0", r"lora\.alpha: must be positive"),
    ("data.dirichlet_alpha=inf", r"data\.dirichlet_alpha: must be a finite number"),
    ('attack=[{peers=["peer1"], factor=nan}]', r"attack\[0\]\.factor: must be a finite number"),
    ('attack=[{peers=["peer9"]}]', r"attack\[0\]\.peers: peer9 is not one of peer0\.\.peer7"),
    ('schemes=["median:validation"]', r"'median' ignores trust"),
])
def test_bad_values_give_clear_errors(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, [assignment])


def test_overrides_parse_toml_values_and_fall_back_to_strings():
    assert parse_override("training.lr=1e-3") == (["training", "lr"], 1e-3)
    assert parse_override('schemes=["local"]') == (["schemes"], ["local"])
    assert parse_override("model.source=/some/dir") == (["model", "source"], "/some/dir")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("no-equals-sign")


def test_override_wins_over_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("num_peers = 4\n[training]\nrounds = 3\n")
    config = load_experiment(path, ["training.rounds=7"])
    assert (config.num_peers, config.training.rounds) == (4, 7)


def test_topology_file_path_resolves_next_to_the_experiment(tmp_path):
    (tmp_path / "ring.toml").write_text('generator = "ring"\n')
    path = tmp_path / "x.toml"
    path.write_text('topology = "ring.toml"\n')
    assert load_experiment(path).topology.generator == "ring"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_experiment(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(bad)


def test_methods_parse_into_trust_aggregation_and_experts():
    assert parse_scheme("fedavg") == Scheme("fedavg", trust="fedavg")
    assert parse_scheme("flexlora") == Scheme("flexlora", trust="fedavg", aggregator="flexlora")
    assert parse_scheme("zero-padded:validation").aggregator == "zero-padded"
    comigs = parse_scheme("comigs-1g1s:predictions")
    assert (comigs.trust, comigs.generalists, comigs.specialists) == ("predictions", 1, 1)
    assert not parse_scheme("comigs-2s").shares_anything  # nothing shared: it never sends
    assert parse_scheme("comigs-2g").shares_anything


def test_mixed_ranks_refuse_expert_methods_and_plain_averaging_but_not_flexlora():
    mixed = ["profiles=[{rank=4}, {rank=16}]"]
    with pytest.raises(ConfigError, match="needs one rank on every peer"):
        load_experiment(None, [*mixed, 'schemes=["comigs-1g1s"]'])
    config = load_experiment(None, [*mixed, 'schemes=["local", "flexlora", "flexlora:predictions", "zero-padded"]'])
    assert [config.rank_of(i) for i in range(4)] == [4, 16, 4, 16]


def test_profiles_load_from_peer_files_named_after_them(tmp_path):
    (tmp_path / "small.toml").write_text("rank = 2\n")
    path = tmp_path / "x.toml"
    path.write_text('num_peers = 3\nprofiles = ["small.toml", {name = "big", rank = 8}]\nschemes = ["flexlora"]\n')
    config = load_experiment(path)
    assert [config.profile_of(i).name for i in range(3)] == ["small", "big", "small"]
    assert [config.rank_of(i) for i in range(3)] == [2, 8, 2]
