"""A peer in any Python application: the trio-native Peer, run in a background thread of the app's process.

    with p2pfed.start_peer("peer.toml") as peer:        # plain code: scripts, notebooks, threads
        text = peer.generate("Hello, how are")
        result = peer.wait()
    async with p2pfed.start_peer("peer.toml") as peer:  # asyncio: nothing here blocks the app's loop
        text = await peer.agenerate("Hello, how are")
        async for event in peer.events(): ...           # or `for` in plain code; ends with the rounds

The handle adds no peer logic: every call runs the Peer's own coroutine on the peer's trio loop. Errors in the
peer's thread reach the app: a failed start from `__enter__` (or the first call), a failure of the rounds from
`wait()`/`finished()` and from `stop()` (so from leaving the `with` block).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import trio

import p2pfed

if TYPE_CHECKING:
    from torch import nn

    from p2pfed import Peer, PeerConfig, PeerEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

# Why a thread running its own trio.run, reached through its TrioToken, rather than trio's guest mode: guest
# mode needs a host loop to drive trio, and plain synchronous code (a script, a notebook cell, a Flask worker)
# has none; it would also put the peer's scheduling on the app's loop thread. A thread works the same under
# sync code, asyncio or any other loop. Calls go in with TrioToken.run_sync_soon, which never blocks the caller
# (trio.from_thread.run would block the asyncio loop), and come back through a concurrent.futures.Future: sync
# code waits on it, asyncio awaits it with asyncio.wrap_future.


class PeerStopped(RuntimeError):
    """The background peer is not running: it stopped (or failed to start) before the call could run."""


@dataclass(frozen=True)
class _Running:
    """The peer once its block is entered: what the app's calls run against."""
    peer: Peer
    calls: trio.Nursery  # the app's calls run here; cancelled when the peer stops
    token: trio.lowlevel.TrioToken
    stop: trio.Event  # set (on the trio thread) to leave the Peer's block


def start_peer(config: PeerConfig | str | os.PathLike | None, overrides: Sequence[str] = ()) -> BackgroundPeer:
    """Start a peer in a background thread, from a PeerConfig or a peer file (None: defaults) with `overrides`
    (`KEY=VALUE`, as `--set`). A bad config raises here; a failed start from `with` or from the first call."""
    if not isinstance(config, p2pfed.PeerConfig):
        config = p2pfed.load_peer(config, list(overrides))
    elif overrides:
        raise ValueError("overrides apply to a peer file; change the PeerConfig itself instead")
    return BackgroundPeer(config.validate()).start()


class BackgroundPeer:
    """A p2pfed Peer running on its own trio loop in a background thread; usable from any thread and from asyncio.

    Use it with `with` / `async with` (or call stop()): leaving stops the peer as leaving `async with Peer` does
    (a peer stopped between rounds checkpoints first; stopped mid-round, its last checkpoint stands), closes
    the host and joins the thread. After the last round the peer stays up, serving generate(), until stopped.
    """

    EVENT_BUFFER = 256  # events kept per stream for a reader that falls behind; older ones are dropped

    def __init__(self, config: PeerConfig):
        self.config = config
        self._thread: threading.Thread | None = None
        self._ready: Future[_Running] = Future()  # or what stopped the start
        self._outcome: Future[Any] = Future()  # the PeerResult, or what stopped the rounds
        self._lock = threading.Lock()  # guards _thread, _running, _stop_requested and _streams
        self._running: _Running | None = None
        self._stop_requested = False
        self._streams: set[EventStream] = set()
        self._streams_ended = False
        self._crash: BaseException | None = None  # what ended the thread's trio.run, if anything did
        self._latest_round: Any = None
        self._trust: dict[str, float] = {}

    def start(self) -> BackgroundPeer:
        """Start the peer's thread and return at once (loading the model goes on in the background)."""
        with self._lock:  # app threads may race to the first call, which starts a handle not yet started
            if self._thread is None:
                # A daemon thread: a handle the app forgets to stop must not keep the process alive at exit;
                # a checkpoint is committed atomically, so exiting mid-write loses at most the current round.
                self._thread = threading.Thread(target=self._thread_main, name=f"p2pfed-{self.name}", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the peer, close its host and join the thread; then raise what failed in the thread, if anything."""
        self._request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"{self.name} did not stop within {timeout} s")
        self._raise_failure()

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the last round: the PeerResult. Raises what stopped the rounds (PeerStopped after stop())."""
        return self._outcome.result(timeout)

    async def finished(self) -> Any:
        """wait() for asyncio: the PeerResult, without blocking the loop."""
        return await asyncio.shield(asyncio.wrap_future(self._outcome))

    def __enter__(self) -> BackgroundPeer:
        try:
            self._started()
        except BaseException:  # e.g. Ctrl-C while the model loads: the peer must not live on unseen
            self._request_stop()
            raise
        return self

    def __exit__(self, _type, error, _traceback) -> None:
        try:
            self.stop()
        except Exception as failure:
            if error is None or failure is error:
                raise
            # The app's own exception goes on (its handlers expect it); the peer's failure is logged beside it.
            log.error("%s: the peer failed as well: %r", self.name, failure, exc_info=failure)

    async def __aenter__(self) -> BackgroundPeer:
        await self._astarted()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.to_thread(self.__exit__, *exc_info)  # joining the thread would block the loop

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def peer_id(self) -> str:
        """The peer's libp2p ID (waits for the peer to start)."""
        return self._started().peer.peer_id

    @property
    def done(self) -> bool:
        """Whether the rounds have ended (finished, failed or stopped)."""
        return self._outcome.done()

    @property
    def latest_round(self) -> Any:
        """The RoundRecord of the last round finished since the start, or None."""
        return self._latest_round  # replaced whole by the peer's thread: a plain read is safe

    @property
    def trust(self) -> dict[str, float]:
        """The latest trust row (weights over self and neighbours); {} until the peer first aggregates."""
        return dict(self._trust)

    def generate(self, prompt: str, timeout: float | None = None, **options: Any) -> str:
        """Complete `prompt` with the current personalized model (options as Peer.generate: max_new_tokens, ...)."""
        return self._call(timeout, lambda peer: peer.generate(prompt, **options))

    async def agenerate(self, prompt: str, **options: Any) -> str:
        """generate() for asyncio; the model work runs on the peer's side, the loop stays free."""
        return await self._acall(lambda peer: peer.generate(prompt, **options))

    @contextlib.contextmanager
    def personalized_model(self, timeout: float | None = None) -> Iterator[nn.Module]:
        """The base model pointed at the current adapter. The peer's model work waits meanwhile: keep it short."""
        with _lend(self._started(timeout)) as handed:
            model = handed.result(timeout)
            with torch.no_grad():  # grad mode is per thread: the Peer's no_grad covers only its own
                yield model

    @contextlib.asynccontextmanager
    async def apersonalized_model(self) -> AsyncIterator[nn.Module]:
        """personalized_model() for asyncio: waiting for the model does not block the loop."""
        with _lend(await self._astarted()) as handed:
            model = await asyncio.wrap_future(handed)
            with torch.no_grad():
                yield model

    def events(self) -> EventStream:
        """The peer's events from now on (UpdateReceived, TrustChanged, RoundFinished), for `for` or `async for`."""
        stream = EventStream(self.EVENT_BUFFER, self._unsubscribe)
        with self._lock:
            if self._streams_ended:
                stream._end()
            else:
                self._streams.add(stream)
        return stream

    def _call(self, timeout: float | None, use: Callable[[Peer], Awaitable[T]]) -> T:
        future = _submit(self._started(timeout), use)
        try:
            return future.result(timeout)
        finally:
            future.cancel()  # a caller that gave up (timeout) calls the work off; no-op once it is done

    async def _acall(self, use: Callable[[Peer], Awaitable[T]]) -> T:
        running = await self._astarted()
        return await asyncio.wrap_future(_submit(running, use))  # a cancelled task cancels the call too

    def _started(self, timeout: float | None = None) -> _Running:
        return self.start()._ready.result(timeout)  # a handle not yet started starts on first use

    async def _astarted(self) -> _Running:
        # shield: a cancelled app task must not cancel the future that every caller shares
        return await asyncio.shield(asyncio.wrap_future(self.start()._ready))

    def _raise_failure(self) -> None:
        for error in (self._crash, *(f.exception() for f in (self._ready, self._outcome) if f.done())):
            if error is not None and not isinstance(error, PeerStopped):
                raise error

    def _request_stop(self) -> None:
        # A stop asked for while the peer starts takes effect once it is up (loading the model cannot be cut short).
        with self._lock:
            self._stop_requested = True
            running = self._running
        if running is not None:
            _run_soon(running.token, running.stop.set)

    def _thread_main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # raised to the app by __enter__, wait() or stop(): never a silent death
            log.error("%s: the peer's thread stopped with %r", self.name, error)
            self._crash = error
        finally:
            failure = self._crash or PeerStopped(f"{self.name} stopped before it could finish")
            _settle(self._ready, error=failure)
            _settle(self._outcome, error=failure)
            self._end_streams()

    async def _serve(self) -> None:
        # p2pfed.Peer through the package's export table: the module that defines it may move.
        async with p2pfed.Peer(self.config) as peer, trio.open_nursery() as calls:
            running = _Running(peer, calls, trio.lowlevel.current_trio_token(), trio.Event())
            with self._lock:
                self._running = running
                if self._stop_requested:
                    running.stop.set()
            calls.start_soon(self._pump, peer)
            _settle(self._ready, result=running)
            await running.stop.wait()
            calls.cancel_scope.cancel()  # the app's pending calls end with PeerStopped; then the Peer stops

    async def _pump(self, peer: Peer) -> None:
        """The peer's events to the app's streams, its outcome to wait(); the streams end with the rounds."""
        try:
            async with peer.subscribe() as channel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_outcome, peer, nursery.cancel_scope)
                    async for event in channel:
                        self._deliver(event)
                # The last round's events were sent before finished() returned: they wait in the channel.
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        self._deliver(channel.receive_nowait())
        finally:
            self._end_streams()

    async def _watch_outcome(self, peer: Peer, pump: trio.CancelScope) -> None:
        try:
            _settle(self._outcome, result=await peer.finished())
        except Exception as error:  # the Peer logged it; the app gets it from wait() or stop()
            _settle(self._outcome, error=error)
        pump.cancel()

    def _deliver(self, event: PeerEvent) -> None:
        if isinstance(event, p2pfed.RoundFinished):
            self._latest_round = event.record
            if event.record.trust:
                self._trust = dict(event.record.trust)
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream._put(event)

    def _unsubscribe(self, stream: EventStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _end_streams(self) -> None:
        with self._lock:
            self._streams_ended = True
            streams, self._streams = self._streams, set()
        for stream in streams:
            stream._end()


class EventStream:
    """A peer's events for `for` (any thread, blocking) and `async for` (asyncio, not blocking the loop); it ends
    when the peer's rounds end or it stops. close() (or leaving `with`, in sync or async code) unsubscribes earlier.
    """

    def __init__(self, capacity: int, on_close: Callable[[EventStream], None]):
        self._events: deque[PeerEvent] = deque(maxlen=capacity)
        self._ready = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._ended = False
        self._on_close = on_close

    def get(self, timeout: float | None = None) -> PeerEvent | None:
        """The next event (blocking); None once the stream has ended; TimeoutError after `timeout` s without one."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._events or self._ended, timeout):
                raise TimeoutError(f"no peer event within {timeout} s")
            return self._events.popleft() if self._events else None

    def close(self) -> None:
        self._on_close(self)
        self._end()

    def __iter__(self) -> EventStream:
        return self

    __aiter__ = __iter__

    def __next__(self) -> PeerEvent:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    async def __anext__(self) -> PeerEvent:
        loop = asyncio.get_running_loop()
        while True:
            with self._ready:
                if self._events:
                    return self._events.popleft()
                if self._ended:
                    raise StopAsyncIteration
                waiter = loop.create_future()
                self._waiters.append((loop, waiter))
            try:
                await waiter
            finally:
                with self._ready:
                    self._waiters.remove((loop, waiter))

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_exc_info) -> None:
        self.close()

    def _put(self, event: PeerEvent) -> None:
        with self._ready:
            if not self._ended:
                self._events.append(event)  # full: the oldest event goes
                self._wake()

    def _end(self) -> None:
        with self._ready:
            self._ended = True
            self._wake()

    def _wake(self) -> None:  # called with the lock held
        self._ready.notify_all()
        for loop, waiter in self._waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_set_if_pending, waiter)


# -- helpers on either side of the thread boundary ---------------------------------------------

def _submit(running: _Running, use: Callable[[Peer], Awaitable[T]], future: Future[T] | None = None) -> Future[T]:
    """Run `use(peer)` on the peer's loop; its result or error arrives in the returned Future."""
    future = future if future is not None else Future()
    try:
        running.token.run_sync_soon(_spawn, running, use, future)
    except trio.RunFinishedError:
        raise PeerStopped("the peer has stopped") from None
    return future


def _spawn(running: _Running, use: Callable[[Peer], Awaitable[Any]], future: Future[Any]) -> None:
    # On the peer's loop, from run_sync_soon: an exception here would crash trio, so none may escape.
    try:
        running.calls.start_soon(_resolve, running, use, future)
    except RuntimeError:  # the nursery is closed: the peer is stopping
        _settle(future, error=PeerStopped("the peer is stopping"))


async def _resolve(running: _Running, use: Callable[[Peer], Awaitable[Any]], future: Future[Any]) -> None:
    try:
        with trio.CancelScope() as scope:
            # A caller that gives up (timeout, cancelled asyncio task) cancels the future: stop the work too.
            future.add_done_callback(lambda f: f.cancelled() and _run_soon(running.token, scope.cancel))
            _settle(future, result=await use(running.peer))
    except Exception as error:
        _settle(future, error=error)
    finally:
        _settle(future, error=PeerStopped("the peer stopped before the call finished"))  # no-op once settled


@contextlib.contextmanager
def _lend(running: _Running) -> Iterator[Future[Any]]:
    """A Future of the Peer's personalized model, held on the peer's loop until the block ends."""
    handed: Future[Any] = Future()
    release = trio.Event()

    async def hold(peer: Peer) -> None:
        async with peer.personalized_model() as model:
            _settle(handed, result=model)
            await release.wait()

    try:
        _submit(running, hold, handed)
        yield handed
    finally:
        handed.cancel()  # an app that gave up before the model came (timeout, cancelled task) calls the lend off
        _run_soon(running.token, release.set)


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Resolve `future` unless it is already resolved or the caller has given up on it."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _run_soon(token: trio.lowlevel.TrioToken, function: Callable[[], Any]) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(function)


def _set_if_pending(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # the waiting task may have been cancelled meanwhile
        waiter.set_result(None)
