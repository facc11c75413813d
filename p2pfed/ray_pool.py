"""Jobs as Ray tasks on a Ray cluster: `p2pfed run X.toml --engine ray` (Ray is an extra: pip install 'p2pfed[ray]').

`RayPool` has WorkerPool's interface (p2pfed.workers): `run(config, inputs, jobs, listener)` yields each job's
result as it finishes, after the job's notes to `listener`. Each job is one Ray task of one CPU, torch on one
thread as in a worker process, so the results are the process pool's; the cluster's CPUs decide how many jobs
run at once (`workers` is the process pool's). A task is a Ray generator: it runs the job in a thread and sends
its notes (rounds, updates) back in batches every quarter second, then the result, so progress bars and a
Swarm's events are live.

Where the tasks run: RAY_ADDRESS names a running cluster (`ray start --head` on one machine, `ray start
--address=HEAD:6379` on the others; "auto" is the one started on this machine). Without it, a local Ray instance
is started on first use and shut down when the pool closes. To a cluster, p2pfed's own code travels with the run
(runtime_env py_modules): its nodes need p2pfed's dependencies, and data folders or model directories at the
same path. A Ray that the caller's script initialized already is used as it is, and left running.

Per-worker cache: a Ray worker process keeps the workspaces (model and tokens) it opened in `_workspaces`, keyed
by workspace_key, for its next jobs, as a WorkerPool process does. It is this module's only state, and only Ray
worker processes fill it.

Errors: a job's exception is raised in the caller as the task raised it, not in Ray's wrapper, so a ConfigError
is the same one line; a worker that died (killed, out of memory, its node lost) is a BrokenProcessPool, as with
worker processes. Tasks are not retried: a job is deterministic, and `--resume` runs what is missing.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from p2pfed.config import ConfigError, ExperimentConfig
from p2pfed.inputs import JobInputs
from p2pfed.job import JobResult, Workspace, open_workspace
from p2pfed.plugins import import_plugins
from p2pfed.topology import TopologyWarning
from p2pfed.workers import Listener, QueueListener, RunStopped, ignoring_ctrl_c, quiet_transformers, run_one, \
    workspace_key

ENGINES = ("process", "ray")
NOTE_INTERVAL_S = 0.25  # how often a task sends its notes, and the caller looks at the tasks
PACKAGE = Path(__file__).resolve().parent  # what a cluster gets of p2pfed (runtime_env py_modules)

_workspaces: dict[str, Workspace] = {}  # per Ray worker process: see the module's docstring


def check_engine(engine: str, config: ExperimentConfig) -> None:
    """A ConfigError for an engine that cannot run `config`'s jobs: before anything is drawn or made."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine != "ray":
        return
    if config.runtime != "inprocess":
        raise ConfigError(f'--engine ray runs jobs in process (runtime = "inprocess"), not runtime = '
                          f'"{config.runtime}": its peers are processes on this machine')
    try:
        import ray  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"--engine ray needs Ray: pip install 'p2pfed[ray]' ({error})") from None


def ray_address() -> str | None:
    """The cluster that RAY_ADDRESS names, or None: a local Ray instance."""
    return os.environ.get("RAY_ADDRESS") or None


class RayPool:
    """Jobs as Ray tasks; use it with `with` (leaving cancels the tasks still running and shuts down a Ray
    instance the pool started). Nothing connects before the first `run`."""

    def __init__(self, address: str | None = None):
        self.address = address  # None: RAY_ADDRESS, else a local instance
        self._started = False  # this pool called ray.init, so it calls ray.shutdown
        self._tasks: dict = {}  # the running tasks' streams -> (scheme, seed)

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(terminate=exc_info[1] is not None)

    def wants(self, config: ExperimentConfig, jobs: int) -> bool:
        """Every job goes to Ray, one too: the caller chose the cluster."""
        return jobs > 0

    def close(self, terminate: bool = False) -> None:
        if not self._tasks and not self._started:
            return
        import ray

        if terminate:
            for stream in self._tasks:
                ray.cancel(stream, force=True)  # Ctrl-C, a stop or a failed job: the other jobs stop now
        self._tasks = {}
        if self._started:
            ray.shutdown()
            self._started = False

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return  # this pool's own, or the caller's (a script's ray.init): used as it is
        address = self.address or ray_address()
        options: dict = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address is None:
            options["include_dashboard"] = False
        else:  # a cluster gets this p2pfed, whatever its nodes hold
            options["runtime_env"] = {"py_modules": [str(PACKAGE)], "excludes": ["__pycache__"]}
        with ignoring_ctrl_c():  # Ray's processes started here leave Ctrl-C to this one, which stops them
            ray.init(address=address or "local", **options)
        self._started = True

    def run(self, config: ExperimentConfig, inputs: JobInputs, jobs: list[tuple[str, int]],
            listener: Listener) -> Iterator[JobResult]:
        """Each job's result as it finishes (a generator); a job's error is raised as the task raised it."""
        import ray

        try:
            self._connect()
            task = ray.remote(_job_task).options(num_cpus=1, max_retries=0)
            shared = ray.put((config, inputs))  # sent once, for every task
            self._tasks = {task.remote(shared, scheme, seed): (scheme, seed) for scheme, seed in jobs}
            while self._tasks:
                ready, _ = ray.wait(list(self._tasks), num_returns=len(self._tasks), timeout=NOTE_INTERVAL_S)
                if listener.stop_requested():
                    raise RunStopped("the run was stopped by its owner")
                for stream in ready:
                    result = _read(stream, listener)
                    if result is not None:
                        del self._tasks[stream]
                        yield result
        except BaseException:
            self.close(terminate=True)
            raise


def _read(stream, listener: Listener) -> JobResult | None:
    """Pass on what a task has sent so far: its notes to `listener`; its result once it comes (None before)."""
    import ray

    while True:
        kind, value = _got(next(stream))
        if kind == "result":
            return value
        for name, args in value:
            getattr(listener, name)(*args)
        if not ray.wait([stream], timeout=0)[0]:
            return None


def _got(ref):
    """ray.get, with a task's own exception raised as itself, and a dead worker as BrokenProcessPool."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as error:
        raise error.cause from error  # Ray's wrapper, with the task's traceback, stays as its cause
    except RayError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BrokenProcessPool(f"a Ray worker died: {first_line}") from error


# -- in a Ray worker process ---------------------------------------------------------------------

def _job_task(shared: tuple[ExperimentConfig, JobInputs], scheme: str, seed: int):
    """One job in a Ray worker (a Ray generator): ("notes", [(method, args), ...]) as it runs, then
    ("result", JobResult). The job runs in a thread, so that this generator can send its notes meanwhile."""
    config, inputs = shared
    quiet_transformers()
    warnings.simplefilter("ignore", TopologyWarning)  # the caller showed them when it checked the graphs
    torch.set_num_threads(1)  # one CPU per task, and the numbers of a worker process
    notes: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict = {}

    def work() -> None:
        try:
            import_plugins(config.plugins)  # the user's rules, in this Ray worker too (a file at the same path)
            outcome["result"] = run_one(config, _workspace(config), inputs, scheme, seed, QueueListener(notes))
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=work, name=f"p2pfed-{scheme}-seed{seed}", daemon=True)
    thread.start()
    while True:
        thread.join(NOTE_INTERVAL_S)
        batch = []
        while not notes.empty():
            batch.append(notes.get())
        if batch:
            yield "notes", batch
        if not thread.is_alive():
            break
    if "error" in outcome:
        raise outcome["error"]
    yield "result", outcome["result"]


def _workspace(config: ExperimentConfig) -> Workspace:
    key = workspace_key(config)
    if key not in _workspaces:
        _workspaces[key] = open_workspace(config, log=lambda *_: None)
    return _workspaces[key]
