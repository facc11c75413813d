"""--engine ray (p2pfed.ray_pool) against a local Ray instance: the process pool's per-peer records, live events,
a sweep, and a task's error as the same one line."""

import importlib.util
import json
import sys

import pytest

from p2pfed.api import Swarm
from p2pfed.cli import main
from p2pfed.experiment import Listener
from p2pfed.peer import RoundFinished
from tests.conftest import run_failing_only_in_workers, small_config

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install 'p2pfed[ray]' (make test installs it)")

TINY = ["--set", "num_peers=4", "--set", 'schemes=["local", "fedavg"]', "--set", "seeds=[0]",
        "--set", "training.rounds=1", "--set", "training.local_steps=1", "--set", "data.train_blocks=8",
        "--set", "data.val_blocks=4", "--set", "data.test_blocks=4"]


class _Jobs(Listener):
    def __init__(self):
        self.records = {}

    def job_finished(self, result, resumed):
        self.records[result.scheme, result.seed] = {name: peer.to_json() for name, peer in result.peers.items()}


def _run(engine):
    config = small_config("training.rounds=2", "training.local_steps=2", 'schemes=["local", "validation"]',
                          "seeds=[0]", "workers=2")
    jobs, events = _Jobs(), []
    Swarm(config).run(listener=jobs, on_event=events.append, engine=engine, log=lambda *_: None)
    rounds = sorted((e.scheme, e.seed, e.peer, e.event.record.round) for e in events
                    if isinstance(e.event, RoundFinished))
    return jobs.records, rounds


@needs_ray
@pytest.mark.slow
def test_the_ray_engine_gives_the_process_pools_per_peer_records_and_events():
    import ray

    on_ray, ray_rounds = _run("ray")
    assert not ray.is_initialized()  # the pool shut down the local instance it started
    in_processes, process_rounds = _run("process")
    assert set(on_ray) == {("local", 0), ("validation", 0)}
    assert on_ray == in_processes  # every peer's every round: losses, perplexities, trust rows, bytes
    assert ray_rounds == process_rounds and len(ray_rounds) == 2 * 4 * 3  # each peer's rounds 0..2, as they ran


@needs_ray
@pytest.mark.slow
def test_a_sweep_on_ray_writes_the_same_job_records(tmp_path):
    sweep = ["sweep", "examples/default.toml", *TINY, "--grid", "schemes=[local,fedavg]"]
    assert main([*sweep, "--engine", "ray", "--out", str(tmp_path / "ray")]) == 0
    assert main([*sweep, "--out", str(tmp_path / "here")]) == 0
    files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("jobs/*.json"))
    assert [str(f) for f in files] == ["00-schemes=local/jobs/local-seed0.json",
                                       "01-schemes=fedavg/jobs/fedavg-seed0.json"]
    for name in files:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
    assert len(json.loads((tmp_path / "ray" / "summary.json").read_text())["rows"]) == 2


@needs_ray
@pytest.mark.slow
def test_an_error_in_a_ray_task_is_the_same_one_line(tmp_path, capsys, monkeypatch):
    code = run_failing_only_in_workers(tmp_path, monkeypatch, [*TINY, "--engine", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds no .txt files" in err and "Traceback" not in err, err


def test_the_ray_engine_runs_in_process_jobs_only(tmp_path, capsys):
    code = main(["run", "examples/default.toml", *TINY, "--set", 'runtime="libp2p"', "--engine", "ray",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--engine ray runs jobs in process" in err, err
    assert not (tmp_path / "run").exists()


def test_without_ray_the_engine_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = main(["sweep", "examples/default.toml", *TINY, "--grid", "seeds=[0,1]", "--engine", "ray",
                 "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'p2pfed[ray]'" in err, err
    assert not (tmp_path / "sweep").exists()
