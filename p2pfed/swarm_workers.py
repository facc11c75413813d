"""One in-process job on several cores: its peers spread over worker processes, the same records as one process.

The one-process swarm runs every peer as a trio task on a virtual clock that jumps whenever every peer waits,
so model work costs no virtual time and only deadlines and delays move the clock. Spread over processes, the
same virtual time is kept in step: each worker runs its peers on its own virtual clock (it never jumps by
itself) and an in-memory network of its own peers, until every one of them waits. It then reports what they
sent to peers of other workers (after the drop and delay decisions, which are hashed from the seed and never
depend on who hosts whom), the round notes, and how far away its next deadline is. The parent hands the
messages on; workers that received some run again at the same virtual time; once no message is under way the
parent moves every clock by the nearest deadline of all workers, exactly the jump the single clock would make.
Between two such exchanges the workers train, score and aggregate at the same time, on their own cores.

Worker processes come from a fork server that imports torch, transformers and p2pfed once (forking a process
that already runs torch's or trio's threads is unsafe), and load the frozen base themselves. They ignore
Ctrl-C: the parent stops them. What crosses processes is pickled, so only this user's processes can reach it:
the parent talks to each worker over an anonymous socket pair, and the fork server's socket is used only
where it is private to this user (`forkserver_is_private`; spawn otherwise).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio.lowlevel
import trio.testing

from p2pfed.config import ExperimentConfig
from p2pfed.data import PeerData
from p2pfed.errors import first_error
from p2pfed.job import Workspace, peer_loops
from p2pfed.loop import PeerHooks, PeerLoop, PeerSpec, run_inline
from p2pfed.model import load_base_model
from p2pfed.net import wire
from p2pfed.net.memory import InMemoryNetwork
from p2pfed.plugins import import_plugins
from p2pfed.records import PeerResult, RoundRecord
from p2pfed.seeding import derive_seed

# What a worker's children need already imported: what p2pfed imports, and the default model's code.
PRELOAD = ["p2pfed.swarm_workers", "transformers", "transformers.models.gpt2.modeling_gpt2", "peft"]

Message = tuple[str, str, bytes]  # (sender, receiver, payload)


def split(count: int, parts: int) -> list[range]:
    """Peers 0..count-1 in at most `parts` contiguous, nearly equal blocks (neighbours on a ring or a
    lattice mostly share a process)."""
    parts = max(1, min(parts, count))
    return [range(count * k // parts, count * (k + 1) // parts) for k in range(parts)]


@dataclass(frozen=True)
class WorkerShare:
    """What one worker process gets: its peers' specs and data, and the names of the job's other peers."""

    config: ExperimentConfig
    seed: int
    specs: list[PeerSpec]
    data: list[PeerData]
    elsewhere: frozenset[str]
    compute: Callable = run_inline  # PeerHooks.compute of each peer (a module-level function: it is pickled)


@dataclass
class Outbox:
    """Messages for peers in other processes (InMemoryNetwork's `remote`), kept until the next exchange."""

    names: frozenset[str]
    messages: list[Message] = field(default_factory=list)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def put(self, sender: str, to: str, payload: bytes) -> None:
        self.messages.append((sender, to, payload))

    def take(self) -> list[Message]:
        taken, self.messages = self.messages, []
        return taken


def run_spread(config: ExperimentConfig, seed: int, specs: list[PeerSpec], data: list[PeerData],
               on_round: Callable[[str, RoundRecord], None] | None = None,
               on_update: Callable[[str, wire.UpdateMessage], None] | None = None,
               compute: Callable = run_inline) -> dict[str, PeerResult]:
    """Every peer's result, its peers run by `config.job_workers` processes. `on_round` and `on_update` run
    here, as the workers report; the update handed to `on_update` carries its sender and round, not its tensors."""
    names = frozenset(spec.name for spec in specs)
    context = _context()
    processes, connections, home = [], [], {}
    try:
        for index, block in enumerate(split(len(specs), config.job_workers)):
            mine = [specs[i] for i in block]
            home.update({spec.name: index for spec in mine})
            share = WorkerShare(config, seed, mine, [data[i] for i in block],
                                names - {spec.name for spec in mine}, compute)
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(theirs, share), daemon=True,
                                      name=f"p2pfed-job-worker-{index}")
            process.start()
            theirs.close()
            processes.append(process)
            connections.append(ours)
        return _drive(connections, processes, home, on_round, on_update)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        for connection in connections:
            connection.close()


def _context():
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() and forkserver_is_private() \
        else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(PRELOAD)  # read when the server first starts; later calls change nothing
    return context


def forkserver_is_private() -> bool:
    """Whether multiprocessing's fork server would listen where only this user can connect. It unpickles what
    a client sends (and runs it in the child it forks), so its socket must not be reachable by anyone else:
    from Python 3.11.1 (CVE-2022-42919) it is a file of mode 0600 in a 0700 directory; before, on Linux, it
    was in the abstract namespace, where any local user could connect. There: spawn instead."""
    from multiprocessing import connection, util

    return not util.is_abstract_socket_namespace(connection.arbitrary_address("AF_UNIX"))


def _drive(connections, processes, home: dict[str, int], on_round, on_update) -> dict[str, PeerResult]:
    """The parent's side: run every worker until its peers wait, hand messages on, then move the clocks."""
    inbound: list[list[Message]] = [[] for _ in connections]
    jump = 0.0
    while True:
        for connection, messages in zip(connections, inbound):
            connection.send(("run", jump, messages))
        inbound, jump = [[] for _ in connections], 0.0
        nearest, finished = float("inf"), True
        for index, connection in enumerate(connections):
            notes, outbox, seconds, done = _reply(connection, processes[index], "ran")
            _tell(notes, on_round, on_update)
            for message in outbox:
                inbound[home[message[1]]].append(message)
            nearest, finished = min(nearest, seconds), finished and done
        if any(inbound):
            continue  # messages under way at this virtual time: their receivers run before the clock moves
        if finished:
            break
        if nearest == float("inf"):
            raise RuntimeError("every peer of the job waits with no deadline: the job cannot end")
        jump = nearest
    for connection in connections:
        connection.send(("stop",))
    results: dict[str, PeerResult] = {}
    for connection, process in zip(connections, processes):
        results.update(_reply(connection, process, "done")[0])
    return results


def _reply(connection, process, expected: str) -> tuple:
    try:
        kind, *body = connection.recv()
    except EOFError:
        process.join(timeout=5)
        raise RuntimeError(f"job worker {process.name} died (exit code {process.exitcode})") from None
    if kind == "error":
        raise body[0]
    assert kind == expected, (kind, expected)
    return tuple(body)


def _tell(notes: list[tuple], on_round, on_update) -> None:
    for note in notes:
        if note[0] == "round" and on_round is not None:
            on_round(note[1], note[2])
        elif note[0] == "update" and on_update is not None:
            on_update(note[1], wire.UpdateMessage(sender=note[2], round=note[3], tensors={}))


# -- a worker process ----------------------------------------------------------------------------

def serve(connection, share: WorkerShare) -> None:
    """A worker's life: load the base, run its peers exchange by exchange, send back their results."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    try:
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(1)  # one thread per process, like every simulated job (the same numbers)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        results = _serve(connection, share)
    except BaseException as error:  # noqa: BLE001 - every failure goes to the parent, which raises it
        _send_error(connection, error)
        return
    connection.send(("done", results))


def _serve(connection, share: WorkerShare) -> dict[str, PeerResult]:
    config = share.config
    import_plugins(config.plugins)  # a forked or spawned process: the user's rules, registered from the config
    workspace = Workspace(config=config, base=load_base_model(config.model, log=lambda *_: None), tokens={})
    host = workspace.host_for(share.specs[0].scheme)
    outbox = Outbox(share.elsewhere)
    network = InMemoryNetwork(config.network, derive_seed(share.seed, "net"), remote=outbox)
    notes: list[tuple] = []
    hooks = PeerHooks(on_round=lambda peer, record: notes.append(("round", peer, record)),
                      on_update=lambda peer, m: notes.append(("update", peer, m.sender, m.round)),
                      compute=share.compute)
    peers = peer_loops(config, host, share.specs, share.data, network.endpoint, hooks)
    results: dict[str, PeerResult] = {}
    clock = trio.testing.MockClock()  # never jumps by itself: the parent moves it

    async def main() -> None:
        finished = trio.Event()
        async with network.running(), trio.open_nursery() as nursery:
            nursery.start_soon(run_peers, peers, results, finished)
            await _exchange(connection, clock, network, outbox, notes, finished)

    try:
        trio.run(main, clock=clock)
    except BaseExceptionGroup as group:
        raise first_error(group) from group
    return results


async def run_peers(peers: list[PeerLoop], results: dict[str, PeerResult], finished: trio.Event | None = None) -> None:
    """Every peer's run as a trio task, each result into `results`; then `finished` is set."""
    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(_run_into, peer, results)
    if finished is not None:
        finished.set()


async def _run_into(peer: PeerLoop, results: dict[str, PeerResult]) -> None:
    results[peer.spec.name] = await peer.run()


async def _exchange(connection, clock: trio.testing.MockClock, network: InMemoryNetwork, outbox: Outbox,
                    notes: list[tuple], finished: trio.Event) -> None:
    while True:
        # Blocking on purpose: every other task waits now, and the virtual clock stands still meanwhile.
        command = connection.recv()
        if command[0] == "stop":
            return  # a peer that finished early still delivered its delayed messages until now
        _, jump, inbound = command
        if jump:
            clock.jump(jump)
        for sender, to, payload in inbound:
            network.put(sender, to, payload)
        await trio.testing.wait_all_tasks_blocked()  # every peer here waits: for a message, or a deadline
        seconds = trio.lowlevel.current_statistics().seconds_to_next_deadline
        connection.send(("ran", _take(notes), outbox.take(), seconds, finished.is_set()))


def _take(items: list) -> list:
    taken = list(items)
    items.clear()
    return taken


def _send_error(connection, error: BaseException) -> None:
    try:
        connection.send(("error", error))
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its type and message
        connection.send(("error", RuntimeError(f"{type(error).__name__}: {error}")))


__all__ = ["PRELOAD", "WorkerShare", "forkserver_is_private", "run_peers", "run_spread", "split", "serve"]
