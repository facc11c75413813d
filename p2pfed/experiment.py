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
import multiprocessing
import signal
import tempfile
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime
from pathlib import Path
from queue import Empty

import torch

from p2pfed import plots, report
from p2pfed.config import ExperimentConfig
from p2pfed.inputs import JobInputs
from p2pfed.job import JobResult, Workspace, open_workspace
from p2pfed.preflight import check_experiment
from p2pfed.records import RoundRecord
from p2pfed.runfolder import RunFolder
from p2pfed.swarm import run_job
from p2pfed.topology import TopologyWarning


class RunStopped(Exception):
    """The run's owner asked it to stop before its last job (a script left its `async with` block early)."""


class Listener:
    """What a run tells its owner as it goes; every method runs in the owner's process. The default ignores it."""

    def job_started(self, scheme: str, seed: int) -> None:
        pass

    def progress(self, scheme: str, seed: int, rounds: int) -> None:
        """`rounds` more peer-rounds of the job are done (a job has num_peers x training.rounds)."""

    def round_finished(self, scheme: str, seed: int, peer: str, record: RoundRecord) -> None:
        pass

    def update_received(self, scheme: str, seed: int, peer: str, sender: str, round_index: int) -> None:
        pass

    def job_finished(self, result: JobResult, resumed: bool) -> None:
        """A job is done; `resumed`: it was found finished in the run folder and did not run again."""

    def stop_requested(self) -> bool:
        return False


class _StopOnly(Listener):
    """Passes on only a stop request (for the clean comparison jobs, which have no progress of their own)."""

    def __init__(self, owner: Listener):
        self.owner = owner

    def stop_requested(self) -> bool:
        return self.owner.stop_requested()


def quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and notes; our own progress display says what runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def run_experiment(config: ExperimentConfig, run_dir: RunFolder | str | Path | None = None,
                   listener: Listener | None = None, log=print, *, inputs: JobInputs = JobInputs(),
                   workspace: Workspace | None = None) -> dict:
    """Every job of `config` that `run_dir` does not hold finished yet; then events.jsonl, results.json and
    the plots there. Returns results.json's content.

    A RunFolder is used as is (its owner checked and made it, p2pfed.api); a path is made afresh (what
    p2pfed wrote there before is replaced); None keeps everything in memory. Without `workspace` (from
    preflight.check_experiment), the experiment is checked here first.
    """
    started = time.perf_counter()
    listener = listener or Listener()
    if workspace is None:
        workspace = check_experiment(config, inputs, log)
    folder = run_dir
    if run_dir is not None and not isinstance(run_dir, RunFolder):
        folder = RunFolder(run_dir)
        folder.make(config, force=True, fingerprint=inputs.fingerprint(config.training.rounds))
    jobs = [(scheme, seed) for seed in config.seeds for scheme in config.schemes]
    results = _run_jobs(config, inputs, jobs, folder, listener, log, workspace, clean=False)
    clean = []
    if config.attack and config.compare_clean:
        log("Running the same jobs without the attackers, for comparison")
        clean = _run_jobs(dataclasses.replace(config, attack=()), inputs, jobs, folder, _StopOnly(listener), log,
                          workspace, clean=True)
    summary = report.summarize(config, results, clean)
    summary["wall_time_s"] = round(time.perf_counter() - started, 2)
    if folder is not None:
        folder.write_events(results)
        folder.write_results(summary)
        plots.draw_plots(summary, folder.path)
    return summary


def _run_jobs(config: ExperimentConfig, inputs: JobInputs, jobs: list[tuple[str, int]], folder: RunFolder | None,
              listener: Listener, log, workspace: Workspace, clean: bool) -> list[JobResult]:
    done: dict[tuple[str, int], JobResult] = {}
    for scheme, seed in jobs:
        found = folder.load_job(scheme, seed, clean) if folder is not None else None
        if found is not None:
            done[scheme, seed] = found
            listener.job_finished(found, resumed=True)
    todo = [job for job in jobs if job not in done]
    if config.runtime == "libp2p":
        results = _run_libp2p(config, todo, folder, listener, workspace)
    elif config.workers == 1 or len(todo) <= 1:
        results = _run_here(config, inputs, todo, listener, workspace)
    else:
        results = _run_in_workers(config, inputs, todo, listener)
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
    torch.set_num_threads(1)  # the swarm runs single-threaded, as in worker processes: the same numbers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TopologyWarning)  # shown once already, when the graphs were checked
            for scheme, seed in jobs:
                yield run_one(config, workspace, inputs, scheme, seed, listener)
    finally:
        torch.set_num_threads(threads)


def run_one(config: ExperimentConfig, workspace: Workspace, inputs: JobInputs, scheme: str, seed: int,
            listener: Listener) -> JobResult:
    """One job in this process, its rounds and updates told to `listener` (which may stop it)."""
    listener.job_started(scheme, seed)

    def on_round(peer: str, record: RoundRecord) -> None:
        if listener.stop_requested():
            raise RunStopped("the run was stopped by its owner")
        if record.round > 0:
            listener.progress(scheme, seed, 1)
        listener.round_finished(scheme, seed, peer, record)

    def on_update(peer: str, message) -> None:
        listener.update_received(scheme, seed, peer, message.sender, message.round)

    data = inputs.data_for(workspace.base.tokenizer.encode, config.data, seed)
    return run_job(config, workspace, scheme, seed, on_round, graph=inputs.graph, data=data, on_update=on_update)


# -- worker processes ----------------------------------------------------------------------

_worker_state: dict = {}  # one per worker process: the experiment, its inputs, its workspace, the queue


class _QueueListener(Listener):
    """A worker's listener: each call goes to the parent through the queue, as (method name, arguments)."""

    def __init__(self, queue):
        self.queue = queue

    def job_started(self, *args) -> None:
        self.queue.put(("job_started", args))

    def progress(self, *args) -> None:
        self.queue.put(("progress", args))

    def round_finished(self, *args) -> None:
        self.queue.put(("round_finished", args))

    def update_received(self, *args) -> None:
        self.queue.put(("update_received", args))


def _worker_init(config: ExperimentConfig, inputs: JobInputs, queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers itself
    quiet_transformers()
    warnings.simplefilter("ignore", TopologyWarning)  # the parent showed them when it checked the graphs
    torch.set_num_threads(1)  # two 1-thread workers beat one 2-thread process (docs/compute.md, "Threads or processes")
    _worker_state.update(config=config, inputs=inputs, queue=queue)


def _worker_job(scheme: str, seed: int) -> JobResult:
    state = _worker_state
    if "workspace" not in state:
        # Opened by the first job, not by the initializer: an error here then reaches the parent as this job's
        # error (the same exception as in process), not as a broken pool.
        state["workspace"] = open_workspace(state["config"], log=lambda *_: None)
    try:
        return run_one(state["config"], state["workspace"], state["inputs"], scheme, seed,
                       _QueueListener(state["queue"]))
    finally:
        state["queue"].put((_JOB_END, (scheme, seed)))  # after every note of the job: the parent waits for it


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Worker processes started in this block inherit an ignored SIGINT: Ctrl-C reaches the parent only."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals belong to the main thread; the initializer ignores SIGINT in the workers anyway
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_in_workers(config: ExperimentConfig, inputs: JobInputs, jobs, listener: Listener):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    pool = ProcessPoolExecutor(min(config.workers, len(jobs)), mp_context=context, initializer=_worker_init,
                               initargs=(config, inputs, queue))
    try:
        with _workers_ignore_ctrl_c():
            jobs_of = {pool.submit(_worker_job, scheme, seed): (scheme, seed) for scheme, seed in jobs}
        pending, ended = set(jobs_of), set()
        while pending:
            # Wake up often enough to show per-round progress while the jobs run.
            finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(queue, listener, ended)
            if listener.stop_requested():
                raise RunStopped("the run was stopped by its owner")
            for future in finished:
                if future.exception() is None:
                    _drain(queue, listener, ended, until=jobs_of[future])  # the job's last notes come first
                yield future.result()  # a worker's error is raised here, as the worker raised it
    except BaseException:
        _terminate(pool)  # Ctrl-C, a stop or a failed job: the other jobs stop now, not when they finish
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        queue.close()
        queue.cancel_join_thread()


def _terminate(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


_JOB_END = "job_end"  # a worker's last note of a job


def _drain(queue, listener: Listener, ended: set, until: tuple[str, int] | None = None) -> None:
    """Pass the workers' notes on to `listener`; with `until`, wait (a little) for that job's last note."""
    while until is None or until not in ended:
        try:
            name, args = queue.get(timeout=5.0) if until is not None else queue.get_nowait()
        except Empty:
            return
        if name == _JOB_END:
            ended.add(tuple(args))
        else:
            getattr(listener, name)(*args)
