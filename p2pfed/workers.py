"""Running jobs and telling their owner: a `Listener` in the calling process hears of jobs starting and finishing,
rounds and updates, whether a job runs here (`run_one`) or in a worker process (`WorkerPool`).

Worker processes are spawned (not forked: torch and trio keep threads) and outlive one experiment, so that a
sweep's points share them. A job's config and inputs travel with it; each worker opens a workspace per model
and data and keeps it. A worker's notes come back through a queue, and a job's result is handed on only after
its last note. An error raised in a worker reaches the caller as the exception the worker raised (a workspace
is opened by a job, not by the pool's initializer, so that a bad data folder is that job's error, not a broken
pool). Workers ignore Ctrl-C: the parent stops them at once, and keeps every job that finished.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import threading
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from queue import Empty

import torch

from p2pfed.config import ExperimentConfig
from p2pfed.inputs import JobInputs
from p2pfed.job import JobResult, Workspace, open_workspace
from p2pfed.load import to_dict
from p2pfed.plugins import import_plugins
from p2pfed.records import RoundRecord
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


def quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and notes; our own progress display says what runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def workspace_key(config: ExperimentConfig) -> str:
    """What a workspace depends on: experiments that agree here share one (the model, the tokens, the hosts)."""
    return json.dumps([to_dict(config.model), config.data.source, list(config.data.groups), to_dict(config.lora),
                       to_dict(config.experts)])


# -- worker processes ----------------------------------------------------------------------

_worker_state: dict = {"workspaces": {}}  # one per worker process: its queue and workspaces


class QueueListener(Listener):
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


def _worker_init(queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers itself
    quiet_transformers()
    warnings.simplefilter("ignore", TopologyWarning)  # the parent showed them when it checked the graphs
    _worker_state["queue"] = queue
    _worker_state["torch_threads"] = torch.get_num_threads()  # torch's default here, for jobs with threads = 0


def _worker_job(config: ExperimentConfig, inputs: JobInputs, scheme: str, seed: int) -> JobResult:
    queue, workspaces = _worker_state["queue"], _worker_state["workspaces"]
    # Each job its experiment's count (default 1: two 1-thread workers beat one 2-thread process; docs/compute.md).
    torch.set_num_threads(config.threads or _worker_state["torch_threads"])
    try:
        import_plugins(config.plugins)  # a spawned process: the user's rules are registered from the config
        key = workspace_key(config)
        if key not in workspaces:
            workspaces[key] = open_workspace(config, log=lambda *_: None)
        return run_one(config, workspaces[key], inputs, scheme, seed, QueueListener(queue))
    finally:
        queue.put((_JOB_END, (scheme, seed)))  # after every note of the job: the parent waits for it


_JOB_END = "job_end"  # a worker's last note of a job


class WorkerPool:
    """Up to `workers` spawned processes running jobs; use it with `with` (leaving stops the processes)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._queue = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(terminate=exc_info[1] is not None)

    def wants(self, config: ExperimentConfig, jobs: int) -> bool:
        """Whether `jobs` jobs of `config` run in the pool: only side by side (else they run in the caller)."""
        return config.workers > 1 and jobs > 1

    def close(self, terminate: bool = False) -> None:
        if self._pool is None:
            return
        if terminate:
            _terminate(self._pool)  # Ctrl-C, a stop or a failed job: the other jobs stop now
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queue.close()
        self._queue.cancel_join_thread()
        self._pool = self._queue = None

    def run(self, config: ExperimentConfig, inputs: JobInputs, jobs: list[tuple[str, int]], listener: Listener):
        """Each job's result as it finishes (a generator); a worker's error is raised as the worker raised it."""
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._queue = context.Queue()
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init,
                                             initargs=(self._queue,))
        try:
            with ignoring_ctrl_c():  # processes start as jobs are submitted
                jobs_of = {self._pool.submit(_worker_job, config, inputs, scheme, seed): (scheme, seed)
                           for scheme, seed in jobs}
            pending, ended = set(jobs_of), set()
            while pending:
                # Wake up often enough to show per-round progress while the jobs run.
                finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                self._drain(listener, ended)
                if listener.stop_requested():
                    raise RunStopped("the run was stopped by its owner")
                for future in finished:
                    if future.exception() is None:
                        self._drain(listener, ended, until=jobs_of[future])  # the job's last notes first
                    yield future.result()
        except BaseException:
            self.close(terminate=True)
            raise

    def _drain(self, listener: Listener, ended: set, until: tuple[str, int] | None = None) -> None:
        """Pass the workers' notes on to `listener`; with `until`, wait (a little) for that job's last note."""
        while until is None or until not in ended:
            try:
                name, args = self._queue.get(timeout=5.0) if until is not None else self._queue.get_nowait()
            except Empty:
                return
            if name == _JOB_END:
                ended.add(tuple(args))
            else:
                getattr(listener, name)(*args)


@contextlib.contextmanager
def ignoring_ctrl_c():
    """Processes started in this block (workers, a local Ray instance) inherit an ignored SIGINT: Ctrl-C reaches
    the parent only, which stops them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals belong to the main thread; the initializer ignores SIGINT in the workers anyway
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _terminate(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()
