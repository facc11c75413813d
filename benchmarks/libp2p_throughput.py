"""Update delivery over the libp2p endpoint against raw trio TCP, on loopback, in one process.

Each side delivers one payload at a time and is timed from the send until the receiver holds the whole
payload and the sender has its 1-byte ack:

  libp2p  p2pfed.libp2p_transport: a stream per update on an open Noise + Yamux connection, writes of
          65,507 bytes (one Yamux frame fits one Noise message), 1 MiB shielded chunks, ack.
  naive   the same protocol written the obvious way on plain libp2p hosts: one stream.write of the
          whole frame (Yamux cuts 64 KiB frames, each sealed as two Noise messages), 64 KiB reads.
  raw     a TCP connection per update (trio.open_tcp_stream / serve_tcp), 8-byte length prefix, body, ack.

Everything runs in one process and one trio loop, so sender and receiver share one core: the ratios
compare CPU cost per byte, not two-core pipelines (the notes measured 0.10-0.22 of raw TCP for naive
use in two processes; on this busy 2-core machine two processes gave libp2p no gain either).
Sides are interleaved (libp2p, naive, raw, libp2p, ...) and medians compared.

    .venv/bin/python benchmarks/libp2p_throughput.py

Target: libp2p >= 0.3 x raw TCP.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from libp2p import new_host
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pfed.libp2p_transport import (
    ACK,
    FRAME_HEADER,
    FRAME_VERSION,
    MAGIC,
    TransportLimits,
    identity_from_seed,
    open_libp2p_endpoint,
    peer_id_of,
)

SIZES = (1_000_000, 10_000_000)
REPEATS = {1_000_000: 21, 10_000_000: 9}
WARMUP = 2
TARGET = 0.3
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
NAIVE_PROTOCOL = "/p2pfed/bench-naive/1.0.0"

Deliver = Callable[[bytes], Awaitable[None]]


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = await stream.receive_some(min(n - got, 1 << 20))
        if not data:
            raise EOFError(f"raw TCP: {got} of {n} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def raw_tcp_side() -> AsyncIterator[Deliver]:
    inbox_send, inbox_receive = trio.open_memory_channel(1)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            length = int.from_bytes(await _receive_exactly(stream, 8), "big")
            await inbox_send.send(await _receive_exactly(stream, length))
            await stream.send_all(ACK)

    async def deliver(payload: bytes) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(len(payload).to_bytes(8, "big"))
            await stream.send_all(payload)
            if await stream.receive_some(1) != ACK:
                raise RuntimeError("raw TCP: no ack")
        if len(await inbox_receive.receive()) != len(payload):
            raise RuntimeError("raw TCP: wrong length")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield deliver
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def naive_libp2p_side() -> AsyncIterator[Deliver]:
    config = ConnectionConfig(max_connections_per_peer=1)
    sender = new_host(key_pair=identity_from_seed(101), connection_config=config)
    receiver = new_host(key_pair=identity_from_seed(102), connection_config=config)
    inbox_send, inbox_receive = trio.open_memory_channel(1)

    async def handle(stream) -> None:
        chunks = []
        with contextlib.suppress(StreamEOF):
            while True:
                chunks.append(await stream.read(65536))
        await inbox_send.send(b"".join(chunks)[FRAME_HEADER.size:])
        await stream.write(ACK)
        await stream.close()

    async def deliver(payload: bytes) -> None:
        stream = await sender.new_stream(receiver.get_id(), [NAIVE_PROTOCOL])
        await stream.write(FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(payload)) + payload)
        await stream.close()
        if await stream.read(1) != ACK:
            raise RuntimeError("naive libp2p: no ack")
        if len(await inbox_receive.receive()) != len(payload):
            raise RuntimeError("naive libp2p: wrong length")

    receiver.set_stream_handler(NAIVE_PROTOCOL, handle)
    try:
        async with sender.run([Multiaddr(LOOPBACK)]), receiver.run([Multiaddr(LOOPBACK)]):
            await sender.connect(PeerInfo(receiver.get_id(), receiver.get_transport_addrs()))
            yield deliver
    finally:
        with trio.CancelScope(shield=True):
            await sender.close()
            await receiver.close()


@contextlib.asynccontextmanager
async def endpoint_side() -> AsyncIterator[Deliver]:
    limits = TransportLimits(max_message_bytes=64 << 20)
    ka, kb = identity_from_seed(1), identity_from_seed(2)
    a_id, b_id = peer_id_of(ka), peer_id_of(kb)

    async with open_libp2p_endpoint(kb, LOOPBACK, {a_id: []}, limits) as b:
        async with open_libp2p_endpoint(ka, LOOPBACK, {b_id: b.listen_addrs}, limits) as a:

            async def deliver(payload: bytes) -> None:
                failures = a.failures[b_id]
                await a.send(b_id, payload)
                if a.failures[b_id] != failures:
                    raise RuntimeError(f"libp2p endpoint: {a.neighbours[b_id].last_error}")
                if len((await b.receive())[1]) != len(payload):
                    raise RuntimeError("libp2p endpoint: wrong length")

            yield deliver


async def measure() -> dict[int, dict[str, list[float]]]:
    times: dict[int, dict[str, list[float]]] = {}
    async with endpoint_side() as ours, naive_libp2p_side() as naive, raw_tcp_side() as raw:
        sides = {"libp2p": ours, "naive": naive, "raw": raw}
        for size in SIZES:
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            times[size] = {name: [] for name in sides}
            for repetition in range(WARMUP + REPEATS[size]):
                for name, deliver in sides.items():
                    start = time.perf_counter()
                    await deliver(payload)
                    if repetition >= WARMUP:
                        times[size][name].append(time.perf_counter() - start)
    return times


def main() -> dict:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # its stderr chatter is not the benchmark's
    times = trio.run(measure)
    result: dict = {"target": TARGET, "process_layout": "one process, one trio loop (sides share a core)"}
    print("update delivery on loopback, one process (sender and receiver share one core); "
          "median of interleaved runs")
    for size, sides in times.items():
        rates = {name: size / statistics.median(values) / 1e6 for name, values in sides.items()}
        ratio = rates["libp2p"] / rates["raw"]
        naive_ratio = rates["naive"] / rates["raw"]
        label = f"{size / 1e6:g} MB"
        print(f"  {label:>5} x {REPEATS[size]:2d}: libp2p endpoint {rates['libp2p']:7.1f} MB/s | "
              f"naive libp2p {rates['naive']:7.1f} MB/s | raw TCP {rates['raw']:7.1f} MB/s")
        print(f"         ratio libp2p / raw {ratio:5.2f}  (target >= {TARGET})   naive / raw {naive_ratio:5.2f}   "
              f"libp2p / naive {rates['libp2p'] / rates['naive']:5.2f}")
        result[f"{label}"] = {
            "mb_per_s": rates, "ratio_libp2p_over_raw": ratio, "ratio_naive_over_raw": naive_ratio,
            "times_s": sides,
        }
    return result


if __name__ == "__main__":
    main()
