"""Run an experiment: every (scheme, seed) job, side by side in worker processes if asked, into a run folder."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from p2pfed import report
from p2pfed.config import ExperimentConfig
from p2pfed.model import load_base_model
from p2pfed.job import JobResult, Workspace, open_workspace
from p2pfed.records import RoundRecord
from p2pfed.strategies import check_schemes
from p2pfed.swarm import run_job

ProgressCallback = Callable[[str, int], None]  # (job label, rounds advanced)


def quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and notes; our own progress display says what runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def new_run_dir(config: ExperimentConfig, out: str | None = None) -> Path:
    if out:
        path = Path(out)
    else:
        path = Path(config.output_dir) / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def job_label(scheme: str, seed: int) -> str:
    return f"{scheme} seed {seed}"


def run_experiment(config: ExperimentConfig, run_dir: Path, progress: ProgressCallback | None = None,
                   log=print) -> dict:
    """Run every job, write events.jsonl, results.json and the plots to `run_dir`; return the results."""
    started = time.perf_counter()
    check_schemes(config)  # a bad scheme fails here, not in a worker after the model loaded
    # Pretrain (or find in the cache) the base model once, before any worker needs it.
    load_base_model(config.model, log=log)
    jobs = [(scheme, seed) for seed in config.seeds for scheme in config.schemes]
    with open(run_dir / "events.jsonl", "w", encoding="utf-8") as events:
        results = _run_jobs(config, jobs, run_dir, progress, log, lambda result: _write_events(events, result))
    clean = []
    if config.attack and config.compare_clean:
        log("Running the same jobs without the attackers, for comparison")
        clean = _run_jobs(dataclasses.replace(config, attack=()), jobs, run_dir / "clean", None, log, lambda _: None)
    summary = report.summarize(config, results, clean)
    summary["wall_time_s"] = round(time.perf_counter() - started, 2)
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    report.draw_plots(summary, run_dir)
    return summary


def _run_jobs(config: ExperimentConfig, jobs: list[tuple[str, int]], run_dir: Path, progress: ProgressCallback | None,
              log, on_result: Callable[[JobResult], None]) -> list[JobResult]:
    results: list[JobResult] = []
    if config.runtime == "libp2p":
        # Each job is already num_peers processes: jobs run one after another.
        from p2pfed.launch import run_job_libp2p

        workspace = open_workspace(config, log=log)
        for scheme, seed in jobs:
            label = job_label(scheme, seed)
            results.append(run_job_libp2p(
                config, workspace, scheme, seed, run_dir,
                on_peer_done=lambda _name, label=label: progress and progress(label, config.training.rounds)))
            on_result(results[-1])
    elif config.workers == 1:
        torch.set_num_threads(1)
        workspace = open_workspace(config, log=log)
        for scheme, seed in jobs:
            results.append(run_job(config, workspace, scheme, seed, _round_reporter(scheme, seed, progress)))
            on_result(results[-1])
    else:
        for result in _run_in_workers(config, jobs, progress):
            results.append(result)
            on_result(result)
    return results


def _round_reporter(scheme: str, seed: int, progress: ProgressCallback | None):
    if progress is None:
        return None
    label = job_label(scheme, seed)

    def on_round(peer: str, record: RoundRecord) -> None:
        if record.round > 0:
            progress(label, 1)
    return on_round


def _write_events(events, result: JobResult) -> None:
    for peer, peer_result in result.peers.items():
        for record in peer_result.rounds:
            line = {"scheme": result.scheme, "seed": result.seed, "peer": peer, **asdict(record)}
            events.write(json.dumps(line) + "\n")


# -- worker processes ----------------------------------------------------------------------

_worker_state: dict = {}  # one per worker process: its workspace and progress queue


def _worker_init(config: ExperimentConfig, queue) -> None:
    quiet_transformers()
    torch.set_num_threads(1)  # two 1-thread workers beat one 2-thread process (docs/compute.md, "Threads or processes")
    _worker_state["config"] = config
    _worker_state["queue"] = queue
    _worker_state["workspace"] = open_workspace(config, log=lambda *_: None)


def _worker_job(scheme: str, seed: int) -> JobResult:
    queue = _worker_state["queue"]
    workspace: Workspace = _worker_state["workspace"]
    return run_job(_worker_state["config"], workspace, scheme, seed,
                   _round_reporter(scheme, seed, lambda label, n: queue.put((label, n))))


def _run_in_workers(config: ExperimentConfig, jobs, progress: ProgressCallback | None):
    context = multiprocessing.get_context("spawn")
    queue = context.Manager().Queue()
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_worker_init,
                             initargs=(config, queue)) as pool:
        pending = {pool.submit(_worker_job, scheme, seed) for scheme, seed in jobs}
        while pending:
            # Wake up often enough to show per-round progress while the jobs run.
            finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(queue, progress)
            for future in finished:
                yield future.result()


def _drain(queue, progress: ProgressCallback | None) -> None:
    while not queue.empty():
        label, n = queue.get()
        if progress is not None:
            progress(label, n)
