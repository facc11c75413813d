"""Relative paths in a TOML file are taken from that file's folder, whatever the working directory; named
topologies and profiles come from the repository's topologies/ and peers/ folders."""

import shutil
from pathlib import Path

import pytest

from p2pfed.cli import main
from p2pfed.config import ConfigError
from p2pfed.load import TOPOLOGIES, load_experiment, load_peer, load_topology

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A folder holding copies of the examples, and a working directory that is not it."""
    folder = tmp_path / "copied"
    folder.mkdir()
    for name in ("peer.toml", "default.toml"):
        shutil.copy(EXAMPLES / name, folder / name)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return folder


def test_copied_examples_load_from_another_working_directory(elsewhere, capsys):
    experiment = load_experiment(elsewhere / "default.toml")
    assert experiment.topology.generator == "complete" and experiment.num_peers == 8
    peer = load_peer(elsewhere / "peer.toml")
    assert peer.profile.name == "medium" and peer.profile.rank == 8
    assert peer.state_dir == str(elsewhere / "state" / "peer0")
    assert main(["id", str(elsewhere / "peer.toml")]) == 0  # no key_file: the key is made in state_dir
    assert (elsewhere / "state" / "peer0" / "identity.key").is_file()
    assert capsys.readouterr().out.startswith("12D3KooW")
    assert not any(Path.cwd().iterdir())  # nothing landed in the working directory


def test_every_path_key_resolves_against_the_files_folder(elsewhere):
    (elsewhere / "texts" / "mine").mkdir(parents=True)
    (elsewhere / "texts" / "mine" / "a.txt").write_text("some text\n")
    (elsewhere / "model").mkdir()
    (elsewhere / "graphs").mkdir()
    (elsewhere / "graphs" / "pair.edges").write_text("0 1\n")
    (elsewhere / "graphs" / "pair.toml").write_text('generator = "edge_list"\npath = "pair.edges"\n')
    (elsewhere / "small.toml").write_text("rank = 2\n")
    (elsewhere / "p.toml").write_text(
        'key_file = "keys/p.key"\nstate_dir = "state"\nprofile = "small.toml"\nnum_peers = 2\n'
        'topology = {generator = "edge_list", path = "graphs/pair.edges", params = {resample_every = 2}}\n'
        '[data]\nsource = "texts"\ngroups = ["mine"]\n[model]\nsource = "model"\ncache_dir = "cache"\n')
    peer = load_peer(elsewhere / "p.toml")
    assert peer.key_file == str(elsewhere / "keys" / "p.key") and peer.state_dir == str(elsewhere / "state")
    assert peer.data.source == str(elsewhere / "texts") and peer.model.source == str(elsewhere / "model")
    assert peer.model.cache_dir == str(elsewhere / "cache") and peer.profile.name == "small"
    assert peer.topology.path == str(elsewhere / "graphs" / "pair.edges")
    (elsewhere / "x.toml").write_text('topology = "graphs/pair.toml"\nprofiles = ["small.toml", "low"]\n'
                                      'schemes = ["flexlora"]\noutput_dir = "runs"\n')
    experiment = load_experiment(elsewhere / "x.toml")
    assert experiment.topology.path == str(elsewhere / "graphs" / "pair.edges")
    assert [p.name for p in experiment.profiles] == ["small", "low"]
    assert experiment.output_dir == str(elsewhere / "runs")
    # A path typed with --set is the user's, from the working directory.
    assert load_peer(elsewhere / "p.toml", ['state_dir="here"']).state_dir == str(Path.cwd() / "here")
    # Special values are names, not paths.
    assert load_experiment(None, ['model.source="tiny"', 'data.source="builtin"']).data.source == "builtin"


@pytest.mark.parametrize("line, message", [
    ('[data]\nsource = "nowhere"', r"data\.source: no such file or folder {dir}/nowhere"),
    ('[model]\nsource = "../m"', r"model\.source: no such file or folder {parent}/m"),
    ('topology = "graphs/none.toml"', r"topology: no such file {dir}/graphs/none\.toml"),
    ('topology = "rign"', r"topology: no file named 'rign' \(.*topologies/rign\.toml does not exist; known: .*ring"),
    ('profiles = ["small.toml"]', r"profiles\[0\]: no such file {dir}/small\.toml"),
])
def test_errors_name_the_key_and_the_resolved_path(elsewhere, line, message):
    (elsewhere / "bad.toml").write_text(line + "\n")
    with pytest.raises(ConfigError, match=message.format(dir=elsewhere, parent=elsewhere.parent)):
        load_experiment(elsewhere / "bad.toml")


def test_a_peer_files_missing_profile_names_the_key(elsewhere):
    (elsewhere / "bad.toml").write_text('profile = "nope/medium.toml"\n')
    with pytest.raises(ConfigError, match=rf"profile: no such file {elsewhere}/nope/medium\.toml"):
        load_peer(elsewhere / "bad.toml")


def test_named_topologies_are_the_shipped_files():
    assert TOPOLOGIES.is_dir()
    assert load_topology("ring").generator == "ring"
    assert load_experiment(None, ['topology="erdos_renyi"']).topology.params == {"p": 0.4}
    assert load_experiment(None, ['topology="edge_list"']).topology.path == str(TOPOLOGIES / "two_cliques.edges")
