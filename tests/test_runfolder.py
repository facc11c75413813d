"""Run folders that lose nothing: --out refuses a folder in use, each job is kept as it finishes, Ctrl-C stops with
one line, a resumed run gives the same results.json as an uninterrupted one, a worker's error is the same error as
in process, and `p2pfed report` reads the state folders of a swarm run by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pfed.cli import main
from p2pfed.config import ConfigError
from p2pfed.experiment import Listener, WorkerPool
from p2pfed.inputs import JobInputs
from p2pfed.job import open_workspace
from p2pfed.swarm import run_job
from tests.conftest import small_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", "num_peers=4", "--set", 'schemes=["local", "fedavg"]', "--set", "seeds=[0, 1]",
        "--set", "training.rounds=2", "--set", "training.local_steps=1", "--set", "data.train_blocks=8",
        "--set", "data.val_blocks=4", "--set", "data.test_blocks=4", "--set", "workers=1"]


def results_without_time(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("wall_time_s")
    return results


def test_out_refuses_a_folder_in_use_unless_resume_or_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", "examples/default.toml", *TINY, "--out", str(out)]) == 2
    assert "the folder is not empty; --resume" in capsys.readouterr().err
    assert main(["run", "examples/default.toml", *TINY, "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --force clears only what p2pfed wrote
    assert sorted(p.name for p in (out / "jobs").iterdir()) == ["fedavg-seed0.json", "fedavg-seed1.json",
                                                                "local-seed0.json", "local-seed1.json"]
    first = results_without_time(out)
    capsys.readouterr()
    assert main(["run", "examples/default.toml", *TINY, "--set", "training.lr=0.01", "--out", str(out),
                 "--resume"]) == 2
    assert "training.lr: " in capsys.readouterr().err
    # A finished run resumed runs nothing and writes the same results (workers may change).
    assert main(["run", "--resume", str(out), "--set", "workers=2"]) == 0
    again = results_without_time(out)
    assert again.pop("config")["workers"] == 2 and first.pop("config")["workers"] == 1
    assert again == first
    assert main(["run", "--resume", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_after_the_first_job_keeps_it_and_a_resumed_run_gives_the_same_results(tmp_path, workers):
    args = ["run", "examples/default.toml", *TINY, "--set", f"workers={workers}", "--set", "training.rounds=3",
            "--set", "training.local_steps=3"]
    stopped = tmp_path / "stopped"
    # A new session, as a terminal's process group: Ctrl-C reaches the run and its worker processes alike.
    process = subprocess.Popen([sys.executable, "-m", "p2pfed", *args, "--out", str(stopped)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((stopped / "jobs").glob("*.json")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no job finished in 5 minutes"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 130, err.decode()
    assert len(lines) == 1 and lines[0].startswith("p2pfed: stopped;") and f"--resume {stopped}" in lines[0], lines
    kept = sorted(p.name for p in (stopped / "jobs").glob("*.json"))
    assert 1 <= len(kept) < 4 and not (stopped / "results.json").exists()

    assert main(["run", "--resume", str(stopped)]) == 0
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole)]) == 0
    assert results_without_time(stopped) == results_without_time(whole)
    assert (stopped / "events.jsonl").read_text() == (whole / "events.jsonl").read_text()


@pytest.mark.slow
def test_an_error_in_a_worker_process_is_the_same_exception_as_in_process(tmp_path):
    (tmp_path / "english").mkdir()  # a group folder without .txt files
    (tmp_path / "italian.txt").write_text("ciao, come stai? " * 400)
    config = small_config(f'data.source="{tmp_path}"', "workers=2")
    with pytest.raises(ConfigError) as in_process:
        open_workspace(config, log=lambda *_: None)
    with pytest.raises(ConfigError) as in_worker, WorkerPool(2) as pool:  # past the parent's checks: the workers
        list(pool.run(config, JobInputs(), [("local", 0), ("local", 1)], Listener()))  # meet it themselves
    assert str(in_worker.value) == str(in_process.value) and "holds no .txt files" in str(in_worker.value)


def test_report_reads_the_state_folders_of_a_swarm_run_by_hand(workspace, tmp_path, capsys):
    config = small_config("training.rounds=2", "training.local_steps=1")
    swarm = tmp_path / "swarm"
    job = run_job(config, workspace, "validation", seed=3, state_root=swarm)  # as `p2pfed peer` leaves them:
    for name, peer in job.peers.items():  # a checkpoint and result.json per state folder
        (swarm / name / "result.json").write_text(json.dumps(peer.to_json()))
    assert main(["report", str(swarm)]) == 0
    assert "validation" in capsys.readouterr().out
    results = json.loads((swarm / "results.json").read_text())
    assert list(results["schemes"]) == ["validation"] and results["seeds"] == [3] and results["config"] is None
    row = results["schemes"]["validation"]
    assert row["per_peer"] == {name: peer.final_test_ppl for name, peer in job.peers.items()}
    assert row["trust"]["peer0"] == job.peers["peer0"].final_trust
    assert sorted(map(tuple, results["edges"])) == sorted(job.graph_edges)  # the graph the peers heard
    assert (swarm / "trust_heatmap.png").is_file() and (swarm / "topology.png").is_file()
    folders = [str(swarm / f"peer{i}") for i in range(4)]
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "results.json").read_text())["schemes"] == results["schemes"]
