"""A TCP relay that gives links latency and loss where the kernel has no netem.

    python -m p2pfed.netlab.relay --latency-ms 20 --loss 0.01 --transparent 10.77.0.2:4001=10.77.0.2:4001 ...

Each LISTEN=TARGET pair: accept on LISTEN, connect to TARGET, and copy both ways, every chunk released
`latency` after it arrived (one way: a round trip through the relay costs two), in order. In a NetLab with
`intercept=True` the relay runs in the hub and LISTEN is the host's own address (`--transparent` sets
IP_TRANSPARENT so that the hub may bind and answer from an address that is not its own): peers dial each
other's real addresses and pass the relay without knowing it. It prints `ready` once it listens and, when
stopped by SIGTERM or SIGINT, one line of counts (`relay: connections=... bytes=... held=...`).
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field

import trio

MSS = 1448  # bytes of payload in one TCP segment on a 1500-byte Ethernet link
RTO_MIN_S = 0.2  # Linux's minimum retransmission timeout
CHUNK = 65536
QUEUED_CHUNKS = 256  # per direction: at most 16 MiB in flight inside the relay, then the sender waits
CONNECT_TIMEOUT_S = 5.0
IP_TRANSPARENT = 19  # from linux/in.h; Python's socket module has no name for it


@dataclass(frozen=True)
class Link:
    """What a link does to the bytes crossing it, one way."""

    latency_s: float = 0.0
    loss: float = 0.0  # probability that a TCP segment is lost
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"latency must be a finite number >= 0, got {self.latency_s}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be a probability in [0, 1), got {self.loss}")

    @property
    def retransmit_s(self) -> float:
        """What a lost segment costs: the retransmission timeout, min 200 ms on Linux, plus a round trip."""
        return RTO_MIN_S + 2 * self.latency_s

    def delay_s(self, rng: random.Random, nbytes: int) -> float:
        """How long a chunk of `nbytes` spends crossing the link.

        Why a hold and not a drop: TCP never loses bytes, it resends them, and every byte behind a lost segment
        waits for the resend (head-of-line blocking). So a lost segment shows up above TCP as the chunk that
        held it arriving a retransmission timeout late, with everything after it; that is what this does, with
        probability 1 - (1 - loss) ** segments for a chunk of that many segments. One hold per chunk: losses in
        one window are resent together. This is pessimistic for long transfers, where fast retransmit resends
        after about one round trip instead of the timeout, and it leaves out that TCP also halves its window.
        """
        if self.loss and rng.random() < 1 - (1 - self.loss) ** math.ceil(nbytes / MSS):
            return self.latency_s + self.retransmit_s
        return self.latency_s


@dataclass
class Counts:
    connections: int = 0
    bytes: int = 0
    chunks: int = 0
    held: int = 0  # chunks that waited for an emulated retransmission
    failed_connects: int = 0

    def line(self) -> str:
        return (f"relay: connections={self.connections} bytes={self.bytes} chunks={self.chunks} held={self.held} "
                f"failed_connects={self.failed_connects}")


@dataclass(frozen=True)
class Route:
    listen: tuple[str, int]
    target: tuple[str, int]


def parse_route(text: str) -> Route:
    """`HOST:PORT=HOST:PORT` (IPv4) -> Route."""
    try:
        listen, target = text.split("=")
        return Route(_hostport(listen), _hostport(target))
    except ValueError:
        raise ValueError(f"a route is LISTEN_HOST:PORT=TARGET_HOST:PORT, got {text!r}") from None


def _hostport(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


@dataclass
class Relay:
    routes: list[Route]
    link: Link
    transparent: bool = False
    counts: Counts = field(default_factory=Counts)
    bound: list[tuple[str, int]] = field(default_factory=list)  # where each route listens (port 0 resolved)
    _next_id: int = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every route (then report started) and relay until cancelled."""
        listeners = [await self._listener(route.listen) for route in self.routes]
        self.bound = [listener.socket.getsockname()[:2] for listener in listeners]
        async with trio.open_nursery() as nursery:
            for route, listener in zip(self.routes, listeners):
                nursery.start_soon(trio.serve_listeners, self._handler(route), [listener])
            task_status.started()

    async def _listener(self, where: tuple[str, int]) -> trio.SocketListener:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        await sock.bind(where)
        sock.listen(128)
        return trio.SocketListener(sock)

    def _handler(self, route: Route):
        async def handle(client: trio.SocketStream) -> None:
            self._next_id += 1
            # Seeded per connection and direction: the same draws on every run, whatever the interleaving.
            rngs = [random.Random(f"{self.link.seed}:{route.listen}:{self._next_id}:{d}") for d in ("up", "down")]
            accepted = trio.current_time()
            try:
                # The kernel completed the dialler's handshake with the relay at once; a real one takes a round
                # trip, so the SYN travels `latency` to the far side and the dialler's first byte (sent after
                # the SYN-ACK came back, then crossing once more) arrives no sooner than three latencies in.
                await trio.sleep(self.link.latency_s)
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    upstream = await trio.open_tcp_stream(*route.target)
            except (OSError, trio.TooSlowError):
                self.counts.failed_connects += 1
                # The dialler's handshake is done, so it cannot be refused any more; a reset (linger 0) is the
                # nearest thing: its dial fails at once, as against a port nobody listens on.
                client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await trio.aclose_forcefully(client)
                return
            self.counts.connections += 1
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, rngs[0], accepted + 3 * self.link.latency_s)
                    nursery.start_soon(self._pipe, upstream, client, rngs[1])
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # one side reset: the other is closed below, as a dropped connection would be
            finally:
                await trio.aclose_forcefully(client)
                await trio.aclose_forcefully(upstream)
        return handle

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, rng: random.Random,
                    not_before: float = 0.0) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUED_CHUNKS)

        async def read() -> None:
            due = not_before
            async with send:
                while data := await source.receive_some(CHUNK):
                    delay = self.link.delay_s(rng, len(data))
                    self.counts.held += delay > self.link.latency_s
                    # Never before an earlier chunk: a stream keeps its order, so a held chunk holds those behind.
                    due = max(trio.current_time() + delay, due)
                    await send.send((due, data))

        async def write() -> None:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await sink.send_all(data)
                    self.counts.bytes += len(data)
                    self.counts.chunks += 1
            await sink.send_eof()  # the source half-closed: pass that on after the last byte

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pfed.netlab.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("routes", nargs="+", metavar="LISTEN=TARGET", help="HOST:PORT=HOST:PORT, IPv4")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="one-way delay of every chunk")
    parser.add_argument("--loss", type=float, default=0.0, help="probability that a TCP segment is lost")
    parser.add_argument("--seed", type=int, default=0, help="seed of the loss draws")
    parser.add_argument("--transparent", action="store_true",
                        help="IP_TRANSPARENT: listen on addresses that are not this namespace's (NetLab intercept)")
    args = parser.parse_args(argv)
    try:
        relay = Relay([parse_route(r) for r in args.routes], Link(args.latency_ms / 1000, args.loss, args.seed),
                      args.transparent)
    except ValueError as error:
        parser.error(str(error))
    return trio.run(_run, relay)


async def _run(relay: Relay) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print(relay.counts.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
