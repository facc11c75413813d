"""A peer on the real network, embeddable in any trio program.

    async with Peer(config) as peer:              # loads the model, opens libp2p, starts the rounds
        async with peer.subscribe() as events:
            async for event in events:            # UpdateReceived, TrustChanged, RoundFinished
                ...
        text = await peer.generate("Ciao, come")  # the current personalized model, any time
        result = await peer.finished()            # every round's record

The rounds run in a background task of the block, their model work in a worker thread; leaving the block
stops them (a peer stopped between rounds checkpoints first) and closes the host. The rounds are the same
`PeerLoop` code the in-process swarm runs (p2pfed.loop); only the endpoint differs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio
from torch import nn

from p2pfed.checkpoint import load_checkpoint
from p2pfed.config import ConfigError, PeerConfig, peer_index, peer_name
from p2pfed.data import PeerData
from p2pfed.experts import is_shared
from p2pfed.job import attacked, initial_adapter, open_workspace, peer_data, peer_spec
from p2pfed.loop import PeerHooks, PeerLoop, PeerSpec
from p2pfed.model import AdapterHost, BaseModel
from p2pfed.net import wire
from p2pfed import peerlog
from p2pfed.peer_addresses import check_addresses  # noqa: F401 (re-exported: p2pfed.peer.check_addresses)
from p2pfed.records import PeerResult, RoundRecord
from p2pfed.strategies import check_schemes
from p2pfed.topology import peer_schedule

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
RESULT_FILE = "result.json"


# -- events --------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpdateReceived:
    sender: str
    round: int


@dataclass(frozen=True)
class TrustChanged:
    round: int
    weights: dict[str, float]  # over the peer itself and the neighbours it aggregated


@dataclass(frozen=True)
class RoundFinished:
    record: RoundRecord


PeerEvent = UpdateReceived | TrustChanged | RoundFinished


# -- what a peer needs before its first round ----------------------------------------------

@dataclass
class PreparedPeer:
    base: BaseModel
    host: AdapterHost
    data: PeerData
    spec: PeerSpec
    initial_adapter: dict[str, torch.Tensor]


def prepare_peer(config: PeerConfig, schedule=None) -> PreparedPeer:
    """The blocking part of starting a peer: the frozen model, this peer's data share, its spec. A swarm member
    gives its schedule (p2pfed.swarm_topology) and may hear from any peer name of the swarm."""
    experiment = config.as_experiment()
    index = peer_index(config.name)
    heard = tuple(n.name for n in config.neighbours) if schedule is None else \
        tuple(peer_name(i) for i in range(config.num_peers) if i != index)
    # The experiment of one peer lists only this peer's profile, so every index gets it.
    spec = peer_spec(experiment, index, heard, config.scheme, config.seed,
                     state_dir=config.state_dir or None, checkpoint_every=config.checkpoint_every,
                     schedule=schedule or peer_schedule(config))  # its neighbours per round: topology, seed, membership
    workspace = open_workspace(experiment, log=log.info)
    host = workspace.host_for(spec.scheme)
    data = peer_data(experiment, workspace.tokens, config.seed)[index]
    return PreparedPeer(base=workspace.base, host=host, data=data, spec=spec,
                        initial_adapter=initial_adapter(host, spec))


def finished_before(config: PeerConfig) -> PeerResult | None:
    """The result of this peer's run when its state folder says it has done every round already (a checkpoint
    of round `training.rounds` or later, and its result.json); None otherwise."""
    path = Path(config.state_dir) / RESULT_FILE if config.state_dir else None
    if path is None or not path.is_file():
        return None
    checkpoint = load_checkpoint(config.state_dir)
    if checkpoint is None or checkpoint.round < config.training.rounds:
        return None
    try:
        result = PeerResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError):
        return None  # a damaged result.json: the run resumes from its checkpoint and writes it again
    done = result.name == config.name and result.rounds and result.rounds[-1].round == checkpoint.round
    return result if done else None


def key_pair_of(config: PeerConfig):
    """The peer's libp2p identity: its key file, else a key from identity_seed, else state_dir/identity.key."""
    from p2pfed.net.identity import identity_from_file, identity_from_seed

    if config.key_file:
        return _key_from_file(identity_from_file, config.key_file, "key_file")
    if config.identity_seed is not None:
        return identity_from_seed(config.identity_seed)
    if config.state_dir:
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
        return _key_from_file(identity_from_file, Path(config.state_dir) / IDENTITY_FILE, "state_dir")
    raise ConfigError("key_file: a networked peer needs an identity: set key_file, identity_seed or state_dir")


def _key_from_file(read, path, key: str):
    try:
        return read(path)
    except (ValueError, OSError) as error:
        raise ConfigError(f"{key}: {error}") from error


@dataclass
class NamedEndpoint:
    """The libp2p endpoint seen through peer names: the loop speaks names, the network peer IDs."""

    name: str
    inner: object  # Libp2pEndpoint
    ids: dict[str, str]  # neighbour name -> peer ID
    arrived: Counter = field(default_factory=Counter)  # updates received per neighbour, before any check

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    async def send(self, to: str, payload: bytes) -> None:
        await self.inner.send(self.ids.get(to, to), payload)  # a member gone meanwhile: refused and logged

    async def send_many(self, neighbours, payload: bytes) -> None:
        await self.inner.send_many([self.ids.get(to, to) for to in neighbours], payload)

    async def receive(self) -> tuple[str, bytes]:
        names = {peer_id: name for name, peer_id in self.ids.items()}
        sender, payload = await self.inner.receive()
        # The transport already refuses strangers; an unknown ID keeps its raw form and the loop drops it.
        self.arrived[names.get(sender, sender)] += 1
        return names.get(sender, sender), payload

    def online(self, round_index: int) -> bool:
        return True


# -- the embeddable peer ---------------------------------------------------------------------

class Peer:
    """A networked peer for `async with`; the constructor only stores its config."""

    EVENT_BUFFER = 256  # events kept for a subscriber that is not reading; older ones are dropped
    STATUS_EVERY_S = 5.0  # while waiting for neighbours at start: a status line this often (and on a change)

    def __init__(self, config: PeerConfig):
        self.config = config
        self.prepared: PreparedPeer | None = None
        self.endpoint = None  # the Libp2pEndpoint, once the block is entered
        self._loop: PeerLoop | None = None
        self._subscribers: list[trio.MemorySendChannel] = []
        self._result: PeerResult | None = None
        self._error: BaseException | None = None
        self._done = trio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._stop: trio.CancelScope | None = None
        # One user of the model at a time: the peer's rounds (in a worker thread) or the app.
        self._model_lock = trio.Lock()
        self._last_trust: dict[str, float] = {}
        self._named: NamedEndpoint | None = None
        self._accepted: set[str] = set()  # neighbours with an update accepted in this process
        self._swarm = None  # a SwarmMember in membership mode (swarm = "NAME"), else None
        self._nursery: trio.Nursery | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def peer_id(self) -> str:
        return self.endpoint.name

    @property
    def listen_addrs(self) -> list[str]:
        return self.endpoint.listen_addrs

    async def __aenter__(self) -> "Peer":
        from p2pfed.net.libp2p_endpoint import TransportLimits, open_libp2p_endpoint

        from p2pfed.net.identity import peer_id_of

        config = self.config.validate()
        check_schemes(config.as_experiment())
        key_pair = key_pair_of(config)
        check_addresses(config, peer_id_of(key_pair))
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.swarm:
            from p2pfed.swarm_peer import SwarmMember
            self._swarm = SwarmMember(config)
        # Loading and tokenizing block for seconds: off the event loop, so the app keeps running.
        self.prepared = await trio.to_thread.run_sync(prepare_peer, config, self._swarm and self._swarm.schedule())
        neighbours = {n.peer_id: list(n.addrs) for n in config.neighbours}
        # A neighbour may have about two updates of this peer's size waiting (at least 1 MiB): a flood
        # from one neighbour is held back instead of filling memory.
        update_bytes = wire.tensor_bytes({n: t for n, t in self.prepared.initial_adapter.items() if is_shared(n)})
        limits = TransportLimits(max_message_bytes=config.network.max_message_bytes,
                                 max_buffered_bytes_per_neighbour=max(2 * update_bytes, 1 << 20))
        self._stack = contextlib.AsyncExitStack()
        await self._stack.__aenter__()
        try:
            self._stack.enter_context(peerlog.named_neighbours(config.name, peer_id_of(key_pair),
                                                               {n.name: n.peer_id for n in config.neighbours}))
            self.endpoint = await self._stack.enter_async_context(
                open_libp2p_endpoint(key_pair, list(config.listen), neighbours, limits))
            if self._swarm is not None:
                self._swarm.open(key_pair, self.endpoint)
            nursery = self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._stop = nursery.cancel_scope  # leaving the block early cancels the rounds
            nursery.start_soon(self._run)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        try:
            await self.leave()
            self._stop.cancel()  # the rounds, if still running, and the membership's upkeep
            return await self._stack.__aexit__(*exc_info)
        finally:
            for channel in self._subscribers:
                channel.close()

    async def leave(self) -> None:
        """Stopping before the last round: in membership mode, tell the members it leaves from the next round
        (so they re-derive the graph without it), within 2 s; call it before cancelling what runs the peer."""
        if self._swarm is not None and not self._done.is_set():
            await self._swarm.leave()

    async def _run(self) -> None:
        prepared, config = self.prepared, self.config
        ids = self._swarm.ids if self._swarm else {n.name: n.peer_id for n in config.neighbours}
        self._named = NamedEndpoint(config.name, self.endpoint, ids)
        endpoint = attacked(self._named, config.attack, prepared.spec, prepared.initial_adapter)
        self._loop = PeerLoop(prepared.spec, prepared.host, prepared.data, endpoint, prepared.initial_adapter,
                              hooks=PeerHooks(on_round=self._on_round, on_update=self._on_update,
                                              compute=self._compute, offload=trio.to_thread.run_sync))
        try:
            if await trio.to_thread.run_sync(finished_before, config) is None:
                await (self._swarm.join(self._nursery) if self._swarm is not None
                       else self._wait_for_neighbours(config.startup_timeout_s))
            else:
                log.info("%s: finished all %d rounds before (%s): not waiting for neighbours", config.name,
                         config.training.rounds, config.state_dir)
            self._result = await self._loop.run()
            self._warn_refused()
            if config.state_dir:
                path = Path(config.state_dir) / RESULT_FILE
                path.write_text(json.dumps(self._result.to_json()), encoding="utf-8")
                if self._swarm is not None:
                    self._swarm.write_members(config.state_dir)
        except Exception as error:  # the app learns of it from finished(); the block itself stays up
            if isinstance(error, ConfigError):  # one line, which finished() raises (the CLI prints it)
                log.debug("%s: %s", config.name, error)
            else:
                log.exception("%s: the peer stopped with an error", config.name)
            self._error = error
        finally:
            self._done.set()

    async def _wait_for_neighbours(self, timeout: float) -> None:
        """Give every neighbour up to `timeout` to answer, so that round 1 does not start into the void; a
        status line every STATUS_EVERY_S (who, where, why not yet) and one per neighbour that connects."""
        waiting = getattr(self.endpoint, "wait_for_neighbours", None)
        if waiting is None or not self.config.neighbours:
            return
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peerlog.report_waiting, self.name, self.neighbour_status, started, timeout,
                               self.STATUS_EVERY_S)
            unreachable = await waiting(timeout)
            nursery.cancel_scope.cancel()
        total, waited = len(self.config.neighbours), trio.current_time() - started
        if unreachable:
            pending = [n for n in self.neighbour_status() if n.peer_id in unreachable]
            log.warning("%s: starting round 1 without %s: no answer in %.0f s", self.name,
                        "; ".join(f"{n.label} {n.where}" for n in pending), waited)
        else:
            log.info("%s: connected to its %d neighbour(s) in %.0f s", self.name, total, waited)

    def neighbour_status(self) -> list[peerlog.NeighbourStatus]:
        """Each neighbour's connection as the endpoint sees it now."""
        listed = self._swarm.neighbour_configs() if self._swarm is not None else self.config.neighbours
        return peerlog.neighbour_status(listed, self.endpoint)

    def silent_summary(self) -> str | None:
        """After the last round: the block naming each neighbour no update ever arrived from (and why that
        may be), or None when the peer heard from every neighbour it awaited."""
        if self._result is None or self._named is None:
            return None
        silent = peerlog.silent_neighbours(self._result.rounds, self._named.arrived)
        if not silent:
            return None
        listed = self.neighbour_status()
        status = [n for n in listed if n.name in silent]
        if self._swarm is not None and not status:
            return None  # only members that left were never heard from: the swarm went on without them
        return peerlog.silent_summary(self.name, status, len(listed), self._result.rounds[-1].round,
                                      self.config.state_dir)

    def _warn_refused(self) -> None:
        heard = {n for r in self._result.rounds for n in r.trust}
        for name, count in self._named.arrived.items():
            if name not in self._accepted and name not in heard:
                log.warning("%s: every update that arrived from %s (%d) was dropped: see the warnings above",
                            self.name, name, count)

    # -- what the app uses ---------------------------------------------------------------

    async def finished(self) -> PeerResult:
        """Wait for the last round; the peer's records (raises what stopped the peer, if anything did)."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """A channel of PeerEvents from now on; it closes when the peer stops."""
        send, receive = trio.open_memory_channel(self.EVENT_BUFFER)
        self._subscribers.append(send)
        try:
            async with receive:
                yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    @contextlib.asynccontextmanager
    async def personalized_model(self) -> AsyncIterator[nn.Module]:
        """The base model pointed at the peer's current adapter, for the app's own use.

        Waits for the round's model work to pause and holds the model meanwhile: keep the block short.
        """
        async with self._model_lock:
            with self._pointed_model() as model:
                yield model

    async def generate(self, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
                       seed: int = 0) -> str:
        """Complete `prompt` with the personalized model (greedy at temperature 0), in a worker thread."""
        async with self._model_lock:
            return await trio.to_thread.run_sync(self._generate, prompt, max_new_tokens, temperature, seed)

    async def _compute(self, work):
        # Training steps take seconds on a real model; on the event loop they would stop the peer reading
        # from the network, and Yamux resets a sender whose receiver stops reading for 5 s.
        async with self._model_lock:
            return await trio.to_thread.run_sync(work)

    @contextlib.contextmanager
    def _pointed_model(self) -> Iterator[nn.Module]:
        if self.prepared is None:
            raise RuntimeError("the peer has not started: use it inside `async with Peer(config) as peer:`")
        # Before round 1 starts (the peer may still be waiting for its neighbours): the initial adapter.
        live = self._loop.adapter if self._loop is not None else None
        adapter = live if live is not None else self.prepared.initial_adapter
        with torch.no_grad(), self.prepared.host.using(adapter) as model:
            yield model

    def _generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
        with self._pointed_model() as model:
            tokenizer = self.prepared.base.tokenizer
            ids = tokenizer.encode(prompt)
            start, context, device = len(ids), self.prepared.base.context, self.prepared.host.device
            generator = torch.Generator().manual_seed(seed)
            for _ in range(max_new_tokens):
                logits = model(input_ids=torch.tensor([ids[-context:]], device=device)).logits[0, -1].float().cpu()
                if temperature <= 0:
                    token = int(logits.argmax())
                else:
                    token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1,
                                                  generator=generator))
                ids.append(token)
        return tokenizer.decode(ids[start:])

    # -- events --------------------------------------------------------------------------

    def _emit(self, event: PeerEvent) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                log.debug("%s: a subscriber is not reading; dropped %s", self.name, type(event).__name__)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(channel)

    def _on_update(self, _peer: str, message: wire.UpdateMessage) -> None:
        self._accepted.add(message.sender)
        self._emit(UpdateReceived(sender=message.sender, round=message.round))

    def _on_round(self, _peer: str, record: RoundRecord) -> None:
        if self._swarm is not None:
            self._swarm.finished_round = record.round
        if record.trust and not _close(record.trust, self._last_trust):
            self._last_trust = dict(record.trust)
            self._emit(TrustChanged(round=record.round, weights=dict(record.trust)))
        self._emit(RoundFinished(record=record))


def _close(a: dict[str, float], b: dict[str, float], tolerance: float = 1e-9) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], abs_tol=tolerance) for k in a)
