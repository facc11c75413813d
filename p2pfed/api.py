"""Experiments from a script: `Swarm` runs what `p2pfed run` runs, with a graph, data and events of your own.

    from p2pfed import Swarm

    swarm = Swarm("examples/default.toml", num_peers=4, schemes=["local", "validation"], seeds=[0],
                  topology=nx.cycle_graph(4), training={"rounds": 3})
    result = swarm.run(out="runs/ring")            # blocking; a SwarmResult, results.json typed

    async with Swarm(texts=[Path("a"), Path("b"), "some text", ("news", Path("c.txt"))]) as run:
        async for event in run.events():           # SwarmEvent(scheme, seed, peer, event): the Peer's events
            ...
        result = await run.result()

The config is an ExperimentConfig, an experiment file or None (the defaults), with keyword overrides of any key
(`training={"rounds": 3}` or `**{"training.rounds": 3}`). `topology` is a networkx.Graph (nodes 0..n-1 or peer
names), a function round -> Graph (a graph per round), a TopologyConfig, a table, a topologies/*.toml path or a
generator name ("ring"). `texts` gives each peer its own text instead of the config's data split
(p2pfed.inputs.peer_texts: folders, files or strings). `p2pfed run` is this class with a progress display.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from p2pfed.config import ConfigError, ExperimentConfig, TopologyConfig
from p2pfed.experiment import Listener, RunStopped, check_engine, quiet_transformers, run_experiment
from p2pfed.inputs import JobInputs, peer_texts, static_graph
from p2pfed.load import TOPOLOGIES, from_dict, load_experiment, resolve_topology, to_dict
from p2pfed.peer import PeerEvent, RoundFinished, TrustChanged, UpdateReceived
from p2pfed.preflight import check_experiment
from p2pfed.records import RoundRecord
from p2pfed.results import SwarmResult
from p2pfed.runfolder import RunFolder
from p2pfed.strategies import check_schemes
from p2pfed.topology import GENERATORS


@dataclass(frozen=True)
class SwarmEvent:
    """What one peer of one job reported: `event` is what the embedded Peer emits (UpdateReceived, TrustChanged,
    RoundFinished)."""

    scheme: str
    seed: int
    peer: str
    event: PeerEvent


class Swarm:
    """An experiment to run from Python. The constructor checks the config; nothing runs or loads until `run()`,
    `start()` or `async with`."""

    def __init__(self, config: ExperimentConfig | str | os.PathLike | None = None, *, topology: Any = None,
                 texts: Any = None, **keys: Any):
        base = config if isinstance(config, ExperimentConfig) else load_experiment(config)
        plain = to_dict(base)
        for key, value in keys.items():
            _merge(plain, key.split("."), to_dict(value) if hasattr(value, "__dataclass_fields__") else value)
        graph = None
        if isinstance(topology, nx.Graph):
            graph = static_graph(topology, keys.get("num_peers"))
            plain["num_peers"] = graph.number_of_nodes()
        elif callable(topology) and not isinstance(topology, TopologyConfig):
            graph = topology
        elif topology is not None:
            plain["topology"] = _topology_table(topology)
        if texts is not None and "num_peers" not in keys and graph is None:
            plain["num_peers"] = len(texts)
        self.config: ExperimentConfig = from_dict(ExperimentConfig, plain).validate()
        check_schemes(self.config)
        self.graph = graph
        self.texts = texts  # read when the swarm runs: a constructor touches no disk
        self._running: RunningSwarm | None = None
        self._checked: tuple | None = None  # what check() found, for the run() that follows it

    def __repr__(self) -> str:
        return f"Swarm({self.config.name!r}, {self.config.num_peers} peers, schemes {list(self.config.schemes)})"

    @classmethod
    def resume(cls, run_dir: str | os.PathLike) -> Swarm:
        """The swarm of a run folder, to finish it with `run(out=run_dir, resume=True)`."""
        folder = RunFolder(run_dir)
        if not folder.path.is_dir():
            raise ConfigError(f"--resume {run_dir}: no such folder")
        if folder.saved_fingerprint() is not None:
            raise ConfigError(f"{run_dir} was run from a script with its own graph or texts: resume it from that "
                              f"script, Swarm(...).run(out=..., resume=True)")
        return cls(folder.saved_config())

    def inputs(self) -> JobInputs:
        """The graph and the peers' texts for the jobs (reads the text folders)."""
        texts = peer_texts(self.texts, self.config.num_peers) if self.texts is not None else None
        return JobInputs(graph=self.graph, texts=texts)

    def check(self, out: str | os.PathLike | None = None, *, resume: bool = False, force: bool = False,
              log: Callable[..., None] = print) -> None:
        """Everything that can fail before work starts (the folder's use, the model, the data, each seed's graph
        and split): raises ConfigError or OSError, and makes nothing. `run` checks first unless done already."""
        config = self.config
        quiet_transformers()  # no loading bars of transformers' own in the middle of the run's output
        inputs = self.inputs()
        fingerprint = inputs.fingerprint(config.training.rounds)
        if out is not None:
            RunFolder(out).check(config, resume=resume, force=force, fingerprint=fingerprint)
        workspace = check_experiment(config, inputs, log)
        self._checked = ((out, resume, force), inputs, workspace, fingerprint)

    def run(self, out: str | os.PathLike | None = None, *, resume: bool = False, force: bool = False,
            on_event: Callable[[SwarmEvent], None] | None = None, listener: Listener | None = None,
            log: Callable[..., None] = print, engine: str = "process") -> SwarmResult:
        """Run every job (with `out`, into that run folder; without, in memory) and return the results.

        `out` must be new or empty, unless `resume` (run only the jobs it does not hold yet) or `force` (start
        afresh). Everything checkable is checked before the folder is made. `on_event` gets every SwarmEvent, in
        this process, as the jobs run (from worker processes and Ray tasks too). `engine="ray"` runs the jobs
        as Ray tasks (p2pfed.ray_pool: RAY_ADDRESS's cluster, or a local Ray instance)."""
        check_engine(engine, self.config)
        if self._checked is None or self._checked[0] != (out, resume, force):
            self.check(out, resume=resume, force=force, log=log)
        _, inputs, workspace, fingerprint = self._checked
        self._checked = None  # a later run checks again: the folder has changed
        folder = RunFolder(out) if out is not None else None
        if folder is not None:
            folder.make(self.config, force=force, fingerprint=fingerprint)
        summary = run_experiment(self.config, folder, _EventListener(on_event, listener), log, inputs=inputs,
                                 workspace=workspace, engine=engine)
        return SwarmResult.from_json(summary, folder.path if folder is not None else None)

    def start(self, out: str | os.PathLike | None = None, *, resume: bool = False, force: bool = False,
              log: Callable[..., None] = print, engine: str = "process") -> RunningSwarm:
        """Run in a background thread of this process; returns at once. Use the handle with `with` or `async with`
        (asyncio or trio): leaving the block stops a run that has not finished."""
        run = functools.partial(self.run, out, resume=resume, force=force, log=log, engine=engine)
        return RunningSwarm(self, run).start()

    async def __aenter__(self) -> RunningSwarm:
        self._running = self.start()
        return await self._running.__aenter__()

    async def __aexit__(self, *exc_info) -> None:
        await self._running.__aexit__(*exc_info)


def _merge(plain: dict, path: list[str], value: Any) -> None:
    node = plain
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a table")
        node = child
    key = path[-1]
    # Sections merge key by key; a topology (or its params) is replaced whole, or stale parameters would stay.
    if isinstance(value, dict) and isinstance(node.get(key), dict) and key not in ("topology", "params"):
        for inner, inner_value in value.items():
            _merge(node[key], [inner], inner_value)
    else:
        node[key] = list(value) if isinstance(value, tuple) else value


def _topology_table(topology: Any) -> dict:
    if isinstance(topology, TopologyConfig):
        return to_dict(topology)
    if isinstance(topology, dict):
        return topology
    if isinstance(topology, (str, os.PathLike)):  # a shipped topology's name ("ring") or a file's path
        if str(topology) in GENERATORS and not (TOPOLOGIES / f"{topology}.toml").is_file():
            return {"generator": str(topology)}
        return resolve_topology(str(topology), Path.cwd())
    raise ConfigError(f"topology: expected a networkx.Graph, a function round -> Graph, a TopologyConfig, a table, "
                      f"a file or a generator name, got {type(topology).__name__}")


class _EventListener(Listener):
    """The run's listener for a Swarm: the Peer's events to `on_event`; everything also to `inner` (progress)."""

    def __init__(self, on_event: Callable[[SwarmEvent], None] | None, inner: Listener | None):
        self.on_event = on_event
        self.inner = inner or Listener()
        self._last_trust: dict[tuple[str, int, str], dict[str, float]] = {}

    def job_started(self, scheme: str, seed: int) -> None:
        self.inner.job_started(scheme, seed)

    def progress(self, scheme: str, seed: int, rounds: int) -> None:
        self.inner.progress(scheme, seed, rounds)

    def round_finished(self, scheme: str, seed: int, peer: str, record: RoundRecord) -> None:
        self.inner.round_finished(scheme, seed, peer, record)
        if self.on_event is None:
            return
        last = self._last_trust.get((scheme, seed, peer), {})
        if record.trust and not _close(record.trust, last):  # as the Peer does: only when the row changed
            self._last_trust[scheme, seed, peer] = dict(record.trust)
            self.on_event(SwarmEvent(scheme, seed, peer, TrustChanged(round=record.round, weights=dict(record.trust))))
        self.on_event(SwarmEvent(scheme, seed, peer, RoundFinished(record=record)))

    def update_received(self, scheme: str, seed: int, peer: str, sender: str, round_index: int) -> None:
        self.inner.update_received(scheme, seed, peer, sender, round_index)
        if self.on_event is not None:
            self.on_event(SwarmEvent(scheme, seed, peer, UpdateReceived(sender=sender, round=round_index)))

    def job_finished(self, result, resumed: bool) -> None:
        self.inner.job_finished(result, resumed)

    def stop_requested(self) -> bool:
        return self.inner.stop_requested()


def _close(a: dict[str, float], b: dict[str, float], tolerance: float = 1e-9) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], abs_tol=tolerance) for k in a)


# -- a swarm in a background thread ---------------------------------------------------------------

class _Feed:
    """Every event of a run, kept, so that each reader sees all of them from the start, whenever it begins."""

    def __init__(self):
        self._events: list[SwarmEvent] = []
        self._ended = False
        self._changed = threading.Condition()

    def put(self, event: SwarmEvent) -> None:
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def after(self, index: int, timeout: float | None) -> tuple[SwarmEvent | None, bool]:
        """The event at `index` once there is one (None after `timeout`), and whether the feed has ended."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._events) > index or self._ended, timeout)
            return (self._events[index] if len(self._events) > index else None), self._ended


class SwarmEvents(Iterator[SwarmEvent]):
    """A run's events from its start: `for` blocks (any thread); `async for` does not block the loop (asyncio or
    trio). It ends when the run ends."""

    def __init__(self, feed: _Feed):
        self._feed, self._index = feed, 0

    def __next__(self) -> SwarmEvent:
        event, _ = self._feed.after(self._index, None)
        if event is None:
            raise StopIteration
        self._index += 1
        return event

    def __aiter__(self) -> SwarmEvents:
        return self

    async def __anext__(self) -> SwarmEvent:
        while True:
            event, ended = self._feed.after(self._index, 0)
            if event is not None:
                self._index += 1
                return event
            if ended:
                raise StopAsyncIteration
            await _in_thread(self._feed.after, self._index, 0.25)


async def _in_thread(function: Callable, *args):
    """Wait for `function` in a worker thread without blocking the caller's event loop (asyncio or trio)."""
    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        return await trio.to_thread.run_sync(functools.partial(function, *args), abandon_on_cancel=True)
    import asyncio

    return await asyncio.to_thread(function, *args)


class RunningSwarm:
    """A Swarm running in a background thread: its events, its result, and a way to stop it."""

    def __init__(self, swarm: Swarm, run: Callable[..., SwarmResult]):
        self.swarm = swarm
        self._run = run
        self._feed = _Feed()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._result: SwarmResult | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RunningSwarm:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="p2pfed-swarm", daemon=True)
            self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self._result = self._run(on_event=self._feed.put, listener=_StopWhen(self._stop))
        except BaseException as error:
            self._error = error
        finally:
            self._feed.end()
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def events(self) -> SwarmEvents:
        """Every event of the run from its start (SwarmEvent), for `for` or `async for`."""
        return SwarmEvents(self._feed)

    def wait(self, timeout: float | None = None) -> SwarmResult:
        """The result once the run has finished; raises what stopped it (RunStopped after stop())."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the swarm did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    async def result(self) -> SwarmResult:
        """wait() for async code: the result, without blocking the event loop."""
        while not self._finished.is_set():
            await _in_thread(self._finished.wait, 0.25)
        return self.wait()

    def stop(self) -> None:
        """Stop the run (at the next round of a job) and wait for its thread; finished jobs stay in the folder."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> RunningSwarm:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        self._raise_failure(exc_info[1])

    async def __aenter__(self) -> RunningSwarm:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._stop.set()
        while not self._finished.is_set():
            await _in_thread(self._finished.wait, 0.25)
        self._raise_failure(exc_info[1])

    def _raise_failure(self, pending: BaseException | None) -> None:
        # A run stopped because the block was left is what was asked for; any other failure is raised, unless
        # the block is leaving with an exception of its own.
        if self._error is not None and not isinstance(self._error, RunStopped) and pending is None:
            raise self._error


class _StopWhen(Listener):
    def __init__(self, stop: threading.Event):
        self.stop = stop

    def stop_requested(self) -> bool:
        return self.stop.is_set()
