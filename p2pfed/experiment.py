"""Run an experiment: every (scheme, seed) job, side by side in worker processes if asked, into a run folder
that keeps each job's records as the job finishes (p2pfed.runfolder).

What a run reports as it goes (jobs starting and finishing, rounds, updates) reaches a `Listener` in the
calling process, from worker processes too; the CLI draws progress bars from it and p2pfed.api turns it into
the embedded Peer's events. An error in a worker reaches the caller as the same exception it would raise in
process; Ctrl-C (KeyboardInterrupt) stops the workers at once and keeps every finished job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

from p2pfed import plots, report
from p2pfed.config import ExperimentConfig
from p2pfed.inputs import JobInputs
from p2pfed.job import JobResult, Workspace
from p2pfed.preflight import check_experiment
from p2pfed.ray_pool import RayPool, check_engine
from p2pfed.runfolder import RunFolder
from p2pfed.topology import TopologyWarning
from p2pfed.workers import Listener, RunStopped, WorkerPool, quiet_transformers, run_one

__all__ = ["Listener", "RayPool", "RunStopped", "WorkerPool", "check_engine", "default_run_dir", "job_label",
           "pool_for", "quiet_transformers", "run_experiment"]

Pool = WorkerPool | RayPool


class _StopOnly(Listener):
    """Passes on only a stop request (for the clean comparison jobs, which have no progress of their own)."""

    def __init__(self, owner: Listener):
        self.owner = owner

    def stop_requested(self) -> bool:
        return self.owner.stop_requested()


def default_run_dir(config: ExperimentConfig) -> Path:
    """OUTPUT_DIR/NAME-TIMESTAMP, one that does not exist yet (not created here)."""
    path = Path(config.output_dir) / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def job_label(scheme: str, seed: int) -> str:
    return f"{scheme} seed {seed}"


def pool_for(engine: str, workers: int) -> Pool:
    """Where jobs run beside the caller: "process", `workers` worker processes; "ray", Ray tasks (p2pfed.ray_pool)."""
    return RayPool() if engine == "ray" else WorkerPool(workers)


def run_experiment(config: ExperimentConfig, run_dir: RunFolder | str | Path | None = None,
                   listener: Listener | None = None, log=print, *, inputs: JobInputs = JobInputs(),
                   workspace: Workspace | None = None, pool: Pool | None = None, engine: str = "process") -> dict:
    """Every job of `config` that `run_dir` does not hold finished yet; then events.jsonl, results.json and
    the plots there. Returns results.json's content.

    A RunFolder is used as is (its owner checked and made it, p2pfed.api); a path is made afresh (what
    p2pfed wrote there before is replaced); None keeps everything in memory. Without `workspace` (from
    preflight.check_experiment), the experiment is checked here first. The jobs run in `pool` (a sweep's points
    share one) or in a pool of their own for `engine`: with the process engine only when workers > 1, with
    "ray" always as Ray tasks.
    """
    started = time.perf_counter()
    check_engine(engine, config)
    listener = listener or Listener()
    if workspace is None:
        workspace = check_experiment(config, inputs, log)
    folder = run_dir
    if run_dir is not None and not isinstance(run_dir, RunFolder):
        folder = RunFolder(run_dir)
        folder.make(config, force=True, fingerprint=inputs.fingerprint(config.training.rounds))
    jobs = [(scheme, seed) for seed in config.seeds for scheme in config.schemes]
    with contextlib.ExitStack() as stack:
        if pool is None and config.runtime == "inprocess" and (config.workers > 1 or engine != "process"):
            pool = stack.enter_context(pool_for(engine, config.workers))
        results = _run_jobs(config, inputs, jobs, folder, listener, workspace, pool, clean=False)
        clean = []
        if config.attack and config.compare_clean:
            log("Running the same jobs without the attackers, for comparison")
            clean = _run_jobs(dataclasses.replace(config, attack=()), inputs, jobs, folder, _StopOnly(listener),
                              workspace, pool, clean=True)
    summary = report.summarize(config, results, clean)
    summary["wall_time_s"] = round(time.perf_counter() - started, 2)
    if folder is not None:
        folder.write_events(results)
        folder.write_results(summary)
        plots.draw_plots(summary, folder.path)
    return summary


def _run_jobs(config: ExperimentConfig, inputs: JobInputs, jobs: list[tuple[str, int]], folder: RunFolder | None,
              listener: Listener, workspace: Workspace, pool: Pool | None, clean: bool) -> list[JobResult]:
    done: dict[tuple[str, int], JobResult] = {}
    for scheme, seed in jobs:
        found = folder.load_job(scheme, seed, clean) if folder is not None else None
        if found is not None:
            done[scheme, seed] = found
            listener.job_finished(found, resumed=True)
    todo = [job for job in jobs if job not in done]
    if config.runtime == "libp2p":
        results = _run_libp2p(config, todo, folder, listener, workspace)
    elif pool is None or not pool.wants(config, len(todo)):
        results = _run_here(config, inputs, todo, listener, workspace)
    else:
        results = pool.run(config, inputs, todo, listener)
    for result in results:
        if folder is not None:
            folder.save_job(result, clean)  # written as it finishes: an interrupted run keeps it
        done[result.scheme, result.seed] = result
        listener.job_finished(result, resumed=False)
    return [done[job] for job in jobs]


def _run_libp2p(config: ExperimentConfig, jobs, folder: RunFolder | None, listener: Listener, workspace: Workspace):
    # Each job is already num_peers processes: jobs run one after another.
    from p2pfed.launch import run_job_libp2p

    with contextlib.ExitStack() as stack:
        root = folder.path if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for scheme, seed in jobs:
            listener.job_started(scheme, seed)
            yield run_job_libp2p(config, workspace, scheme, seed, root, on_peer_done=lambda _name, s=scheme, k=seed:
                                 listener.progress(s, k, config.training.rounds))


def _run_here(config: ExperimentConfig, inputs: JobInputs, jobs, listener: Listener, workspace: Workspace):
    threads = torch.get_num_threads()
    # As in worker processes (`threads`, default 1): the same numbers; 0 keeps the caller's setting.
    torch.set_num_threads(config.threads or threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TopologyWarning)  # shown once already, when the graphs were checked
            for scheme, seed in jobs:
                yield run_one(config, workspace, inputs, scheme, seed, listener)
    finally:
        torch.set_num_threads(threads)
