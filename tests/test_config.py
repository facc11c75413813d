import pytest

from p2pfed.config import ConfigError, ExperimentConfig, load_experiment, parse_override


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
    ('schemes=["local", "magic"]', r"schemes\[1\]: 'magic' is not one of"),
    ('schemes=["local", "local"]', r"schemes: lists a scheme twice"),
    ("data.split=\"random\"", r"data\.split: 'random' is not one of"),
    ("trust.temperature.validation=0", r"trust\.temperature\.validation: must be positive"),
    ("network.drop_prob=1.0", r"network\.drop_prob: must be in \[0, 1\)"),
    ("model.n_embd=65", r"model\.n_embd: must be a multiple of model\.n_head"),
    ("lora=3", r"lora: expected a table"),
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
