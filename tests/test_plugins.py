"""`plugins`: a user's trust rules reach every process that runs jobs or peers, from any working directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from p2pfed.cli import main
from p2pfed.config import ConfigError
from p2pfed.load import load_experiment, load_peer, with_plugins
from p2pfed.plugins import import_plugins, plugin_module_name
from p2pfed.strategies import AGGREGATORS, TRUST_RULES

RULE = '''
from p2pfed.strategies import TrustInputs, trust_rule


@trust_rule("my-rule")
def my_rule(inputs: TrustInputs) -> dict[str, float]:
    """A quarter of the weight on myself, the rest shared by the neighbours that sent."""
    return {inputs.peer: 0.25, **{name: 0.75 / len(inputs.names) for name in inputs.names}}
'''

TINY = '''
plugins = ["my_rule.py"]
num_peers = 2
schemes = ["my-rule", "local"]
seeds = [0]
workers = 2

[training]
rounds = 1
local_steps = 1

[data]
train_blocks = 8
val_blocks = 4
test_blocks = 4
'''


@pytest.fixture
def registry():
    """The registries and plugin modules as they were before the test: a plugin registers once per process."""
    rules, aggregators, modules = set(TRUST_RULES), set(AGGREGATORS), set(sys.modules)
    yield
    _forget(rules, aggregators, modules)


def _forget(rules: set, aggregators: set, modules: set) -> None:
    for table, before in ((TRUST_RULES, rules), (AGGREGATORS, aggregators)):
        for name in set(table) - before:
            del table[name]
    for name in set(sys.modules) - modules:
        if name.startswith("p2pfed_plugin_") or name == "other_rules":  # the plugins only: p2pfed's stay as they are
            del sys.modules[name]


@pytest.fixture
def experiment(tmp_path) -> Path:
    """An experiment file with its plugin beside it, in a folder of their own."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_rule.py").write_text(RULE, encoding="utf-8")
    (folder / "experiment.toml").write_text(TINY, encoding="utf-8")
    return folder / "experiment.toml"


def test_a_run_with_worker_processes_uses_the_plugins_rule_from_another_folder(registry, experiment, tmp_path,
                                                                                monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = set(TRUST_RULES), set(AGGREGATORS), set(sys.modules)
    out = tmp_path / "run"
    assert main(["run", str(experiment), "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert summary["config"]["plugins"] == [str(experiment.parent / "my_rule.py")]
    # The rule ran in the spawned workers, which imported it from the config: peer0 keeps a quarter.
    assert summary["schemes"]["my-rule"]["trust"]["peer0"] == pytest.approx({"peer0": 0.25, "peer1": 0.75})
    _forget(*before)  # as a fresh `p2pfed report` process: it imports the run's plugins itself
    assert "my-rule" not in TRUST_RULES
    assert main(["report", str(out)]) == 0
    assert "my-rule" in TRUST_RULES


def test_a_missing_or_failing_plugin_is_a_config_error_naming_the_entry(registry, experiment, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # --set paths are taken from the working directory
    with pytest.raises(ConfigError, match=r"^plugins\[1\]: cannot import .*nowhere\.py.*FileNotFoundError"):
        load_experiment(experiment, ['plugins=["project/my_rule.py", "nowhere.py"]'])
    with pytest.raises(ConfigError, match=r"^plugins\[0\]: cannot import 'no_such_module_p2pfed'"):
        load_experiment(experiment, ['plugins=["no_such_module_p2pfed"]'])
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written\\nsecond line')\n", encoding="utf-8")
    assert main(["run", str(experiment), "--set", 'plugins=["broken.py"]', "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"p2pfed: configuration error: plugins[0]: cannot import '{tmp_path / 'broken.py'}' " \
                  f"(RuntimeError: half written)\n"
    assert not (tmp_path / "run").exists()
    assert not any(name.startswith("p2pfed_plugin_broken") for name in sys.modules)  # a retry runs it afresh


def test_importing_a_plugin_twice_registers_it_once(registry, experiment, tmp_path, monkeypatch):
    plugin = experiment.parent / "my_rule.py"
    load_experiment(experiment)
    rule = TRUST_RULES["my-rule"]
    load_experiment(experiment)
    import_plugins([str(plugin)])
    monkeypatch.chdir(experiment.parent)
    import_plugins(["my_rule.py", "./my_rule.py"])  # the same file from its folder: the same module
    assert TRUST_RULES["my-rule"] is rule
    assert sys.modules[plugin_module_name(plugin)].my_rule is rule.compute
    (tmp_path / "other_rules.py").write_text(RULE.replace("my-rule", "other-rule"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_plugins(["other_rules", "other_rules"])  # a module name: import's own sys.modules
    assert "other-rule" in TRUST_RULES


def test_plugin_adds_to_the_files_plugins_from_the_working_directory(registry, experiment, tmp_path,
                                                                      monkeypatch):
    (tmp_path / "extra.py").write_text(RULE.replace("my-rule", "extra-rule"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = load_experiment(experiment, with_plugins(experiment, ['schemes=["extra-rule"]'], ["extra.py"]))
    assert config.plugins == (str(experiment.parent / "my_rule.py"), str(tmp_path / "extra.py"))
    assert config.schemes == ("extra-rule",) and "extra-rule" in TRUST_RULES


def test_libp2p_peer_processes_started_elsewhere_use_the_plugins_rule(registry, experiment, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "run"
    # Each peer is a child of a fresh `python -m p2pfed.forkserver`: it knows the rule only from its PEER.toml.
    assert main(["run", str(experiment), "--set", 'runtime="libp2p"', "--set", 'schemes=["my-rule"]',
                 "--set", "network.round_timeout_s=60", "--out", str(out)]) == 0
    peer_file = load_peer(out / "libp2p" / "my-rule-seed0" / "peer0.toml")
    assert peer_file.plugins == (str(experiment.parent / "my_rule.py"),)
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert summary["schemes"]["my-rule"]["trust"]["peer1"] == pytest.approx({"peer0": 0.75, "peer1": 0.25})
