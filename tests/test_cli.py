"""`p2pfed run` and `p2pfed report` end to end on a tiny experiment."""

import json

import pytest

from p2pfed.cli import main
from p2pfed.strategies import parse_scheme
from tests.conftest import run_failing_only_in_workers


def test_run_writes_results_and_plots_then_report_redraws(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main([
        "run", "examples/default.toml", "--out", str(run_dir),
        "--set", "num_peers=4", "--set", 'schemes=["local", "validation"]', "--set", "seeds=[3]",
        "--set", "workers=1", "--set", "training.rounds=2", "--set", "training.local_steps=2",
        "--set", "data.train_blocks=8", "--set", "data.val_blocks=4", "--set", "data.test_blocks=4",
    ])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["seeds"] == [3]
    assert results["config"]["num_peers"] == 4
    for scheme in ("local", "validation"):
        row = results["schemes"][scheme]
        assert row["test_ppl_mean"] > 1 and row["test_ppl_std"] >= 0
        assert set(row["per_peer"]) == {"peer0", "peer1", "peer2", "peer3"}
        assert isinstance(row["bytes_sent"], int)
    assert results["schemes"]["local"]["bytes_sent"] == 0
    assert results["schemes"]["validation"]["bytes_sent"] > 0
    validation_trust = results["schemes"]["validation"]["trust"]
    assert all(abs(sum(row.values()) - 1) < 1e-6 for row in validation_trust.values())
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 4 * 3  # schemes x peers x (round 0 + 2 rounds)
    for name in ("curves.png", "trust_heatmap.png", "topology.png"):
        (run_dir / name).unlink()
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "validation" in out and "local" in out
    assert all((run_dir / name).is_file() for name in ("curves.png", "trust_heatmap.png", "topology.png"))


def test_config_errors_exit_2_with_the_key(tmp_path, capsys):
    assert main(["run", "examples/default.toml", "--set", "training.rounds=-1"]) == 2
    assert "training.rounds" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_the_peer_example_loads_and_id_prints_a_stable_peer_id(tmp_path, capsys):
    from p2pfed.load import load_peer

    example = load_peer("examples/peer.toml")
    assert parse_scheme(example.scheme).trust == "spread" and example.profile.name == "medium" and example.neighbours
    key_file = tmp_path / "peer.key"
    assert main(["id", "examples/peer.toml", "--set", f'key_file="{key_file}"']) == 0
    first = capsys.readouterr().out.strip()
    assert main(["id", "examples/peer.toml", "--set", f'key_file="{key_file}"']) == 0
    assert capsys.readouterr().out.strip() == first and first.startswith("12D3KooW")


def test_a_bad_peer_config_is_a_clear_error(capsys):
    assert main(["peer", "examples/peer.toml", "--set", 'name="peer7"']) == 2
    assert "name: must be one of peer0..peer1" in capsys.readouterr().err


def test_an_error_inside_the_peers_nurseries_is_one_line(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(["peer", "examples/peer.toml", "--set", f'state_dir="{not_a_folder}"']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "File exists" in err and "Traceback" not in err


def test_an_address_in_use_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["peer", "examples/peer.toml", "--set", f'state_dir="{tmp_path}"',
                     "--set", f'listen=["/ip4/127.0.0.1/tcp/{port}"]'])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on /ip4/127.0.0.1/tcp/{port}" in err and "Traceback" not in err


@pytest.mark.slow
def test_run_with_the_libp2p_runtime_writes_the_same_kind_of_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    code = main([
        "run", "examples/default.toml", "--out", str(run_dir), "--set", 'runtime="libp2p"',
        "--set", "num_peers=2", "--set", 'schemes=["validation"]', "--set", "seeds=[0]",
        "--set", "training.rounds=1", "--set", "training.local_steps=1",
        "--set", "data.train_blocks=8", "--set", "data.val_blocks=4", "--set", "data.test_blocks=4",
    ])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    row = results["schemes"]["validation"]
    assert set(row["per_peer"]) == {"peer0", "peer1"} and row["bytes_sent"] > 0 and row["missing_updates"] == 0
    assert all(set(weights) == {"peer0", "peer1"} for weights in row["trust"].values())
    assert (run_dir / "curves.png").is_file() and (run_dir / "trust_heatmap.png").is_file()
    assert sorted(p.name for p in (run_dir / "libp2p" / "validation-seed0").glob("*.toml")) == ["peer0.toml",
                                                                                                "peer1.toml"]


TINY = ["--set", "num_peers=4", "--set", 'schemes=["local", "fedavg"]', "--set", "seeds=[0]",
        "--set", "training.rounds=1", "--set", "training.local_steps=1", "--set", "data.train_blocks=8",
        "--set", "data.val_blocks=4", "--set", "data.test_blocks=4"]


def _mistake(kind: str, folder):
    """--set assignments that only a worker would have found out about, before the checks in the parent."""
    (folder / "data" / "english").mkdir(parents=True)
    (folder / "data" / "italian.txt").write_text("ciao, come stai? " * 400)
    return {
        "data folder without .txt files": [f'data.source="{folder / "data"}"'],
        "unknown built-in group": ['data.groups=["english", "klingon"]'],
        "unknown group in a folder": [f'data.source="{folder / "data"}"', 'data.groups=["italian", "klingon"]'],
        "topology out of range": ['topology={generator="random_regular", params={d=5}}'],
        "not enough text": ["data.train_blocks=100000"],
        "LoRA targets": ['lora.target_modules=["no_such_module"]'],
        "attack needs a second group": ['data.groups=["english"]', 'attack=[{peers=["peer0"], kind="other_group"}]'],
    }[kind]


@pytest.mark.parametrize("kind", ["data folder without .txt files", "unknown built-in group",
                                  "unknown group in a folder", "topology out of range", "not enough text",
                                  "LoRA targets", "attack needs a second group"])
def test_worker_side_mistakes_are_one_line_exit_2_and_no_run_folder(tmp_path, capsys, kind):
    out = tmp_path / "run"
    sets = [arg for assignment in _mistake(kind, tmp_path) for arg in ("--set", assignment)]
    assert main(["run", "examples/default.toml", *TINY, "--set", "workers=2", *sets, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("p2pfed: configuration error: ") and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.slow
def test_an_error_met_only_in_a_worker_process_is_the_same_one_line(tmp_path, capsys, monkeypatch):
    code = run_failing_only_in_workers(tmp_path, monkeypatch, [*TINY, "--set", "workers=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds no .txt files" in err and "Traceback" not in err, err
