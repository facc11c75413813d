"""Update delivery over the libp2p endpoint against raw trio TCP on loopback, sender and receiver in two processes.

Each side delivers one payload at a time and is timed, in the sender, from the send until it holds the
receiver's 1-byte ack; the receiver acks once the whole body is in memory (for the endpoint: in its inbox).
All sides carry the same frame (b"P2PF", version, 8-byte length, body) and the same ack:

  libp2p  p2pfed.net.libp2p_endpoint: Noise + Yamux through p2pfed.net.fastpath, one kept stream per
          neighbour, shielded 1 MiB chunk writes, size cap before the body, the body's one copy a join.
  naive   the same frame written the obvious way on stock libp2p hosts: a new stream per update, one
          stream.write of the whole frame, 64 KiB reads joined at the end (for reference).
  raw     one kept trio TCP connection (trio.open_tcp_stream / serve_tcp), reads of up to 1 MiB into a
          preallocated buffer, then bytes() of it (the endpoint hands bytes to its inbox too).

The sender and the receiver each run in a process of their own (this script, started with --role), so
on a 2-core machine each side has a core, as two peers on two machines would. Sides are interleaved
(libp2p, naive, raw, libp2p, ...) within one run. The ratio reported against a target is the median over
repetitions of raw's time over the side's, each delivery paired with the raw one made right after it, so
that load from other processes, which comes and goes, cancels out; the ratio of the median rates is
printed beside it. CPU per MB comes from each process's main-thread run time (Linux /proc).

    .venv/bin/python benchmarks/libp2p_throughput.py
    .venv/bin/python benchmarks/libp2p_throughput.py --sides libp2p,raw --profile /tmp/prof  # CPU cProfile

Target: libp2p >= 0.3 x raw TCP, for a 1 MB and a 10 MB update.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import trio
from libp2p import new_host
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pfed.net.framing import ACK, FRAME_HEADER, FRAME_VERSION, MAGIC
from p2pfed.net.identity import identity_from_seed, peer_id_of
from p2pfed.net.libp2p_endpoint import TransportLimits, open_libp2p_endpoint

SIZES = (1_000_000, 10_000_000)
REPEATS = {1_000_000: 41, 10_000_000: 15}
WARMUP = 3
TARGET = 0.3
SIDES = ("libp2p", "naive", "raw")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
NAIVE_PROTOCOL = "/p2pfed/bench-naive/1.0.0"
ENDPOINT_SEEDS = (1, 2)  # sender, receiver
NAIVE_SEEDS = (101, 102)
RUN_TIMEOUT_S = 600.0

Deliver = Callable[[bytes], Awaitable[None]]


def _quiet() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # its stderr chatter is not the benchmark's


def _limits() -> TransportLimits:
    return TransportLimits(max_message_bytes=64 << 20)


# ---------------------------------------------------------------------------------------------
# Receiver process: the three servers, their addresses on stdout, then serve until stdin closes


async def _raw_read_into(stream: trio.SocketStream, buffer: bytearray) -> bool:
    """Fill `buffer` from the stream; False at a clean EOF before the first byte."""
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        data = await stream.receive_some(min(len(buffer) - got, 1 << 20))
        if not data:
            if got:
                raise EOFError(f"raw TCP: {got} of {len(buffer)} bytes")
            return False
        view[got : got + len(data)] = data
        got += len(data)
    return True


async def _serve_raw(stream: trio.SocketStream) -> None:
    async with stream:
        header = bytearray(FRAME_HEADER.size)
        while await _raw_read_into(stream, header):
            magic, version, length = FRAME_HEADER.unpack(header)
            if magic != MAGIC or version != FRAME_VERSION:
                raise ValueError("raw TCP: bad frame")
            body = bytearray(length)
            await _raw_read_into(stream, body)
            bytes(body)  # the endpoint hands bytes to its inbox: the same copy here
            await stream.send_all(ACK)


async def _serve_naive(stream) -> None:
    chunks = []
    with contextlib.suppress(StreamEOF):
        while True:
            chunks.append(await stream.read(65536))
    b"".join(chunks)[FRAME_HEADER.size :]
    await stream.write(ACK)
    await stream.close()


async def _drain_inbox(endpoint) -> None:
    while True:
        await endpoint.receive()


async def _receiver() -> None:
    config = ConnectionConfig(max_connections_per_peer=1)
    naive = new_host(key_pair=identity_from_seed(NAIVE_SEEDS[1]), connection_config=config)
    naive.set_stream_handler(NAIVE_PROTOCOL, _serve_naive)
    sender_id = peer_id_of(identity_from_seed(ENDPOINT_SEEDS[0]))
    key = identity_from_seed(ENDPOINT_SEEDS[1])
    async with open_libp2p_endpoint(key, LOOPBACK, {sender_id: []}, _limits()) as endpoint, \
            naive.run([Multiaddr(LOOPBACK)]), trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, _serve_raw, 0, host="127.0.0.1"))
            nursery.start_soon(_drain_inbox, endpoint)
            print(json.dumps({
                "pid": os.getpid(),
                "libp2p": [endpoint.name, endpoint.listen_addrs],
                "naive": [naive.get_id().to_base58(), [str(a) for a in naive.get_transport_addrs()]],
                "raw": listeners[0].socket.getsockname()[1],
            }), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # the parent closes stdin when the sender is done
            nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await naive.close()


# ---------------------------------------------------------------------------------------------
# Sender process: one deliver function per side, timed interleaved; the times as JSON on stdout


@contextlib.asynccontextmanager
async def _endpoint_side(peer: list) -> AsyncIterator[Deliver]:
    receiver_id, addrs = peer
    async with open_libp2p_endpoint(identity_from_seed(ENDPOINT_SEEDS[0]), LOOPBACK, {receiver_id: addrs},
                                    _limits()) as endpoint:

        async def deliver(payload: bytes) -> None:
            failures = endpoint.failures[receiver_id]
            await endpoint.send(receiver_id, payload)
            if endpoint.failures[receiver_id] != failures:
                raise RuntimeError(f"libp2p endpoint: {endpoint.neighbours[receiver_id].last_error}")

        yield deliver


@contextlib.asynccontextmanager
async def _naive_side(peer: list) -> AsyncIterator[Deliver]:
    receiver_id, addrs = ID.from_base58(peer[0]), [Multiaddr(a) for a in peer[1]]
    host = new_host(key_pair=identity_from_seed(NAIVE_SEEDS[0]),
                    connection_config=ConnectionConfig(max_connections_per_peer=1))

    async def deliver(payload: bytes) -> None:
        stream = await host.new_stream(receiver_id, [NAIVE_PROTOCOL])
        await stream.write(FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(payload)) + payload)
        await stream.close()
        if await stream.read(1) != ACK:
            raise RuntimeError("naive libp2p: no ack")

    async with host.run([Multiaddr(LOOPBACK)]):
        try:
            await host.connect(PeerInfo(receiver_id, addrs))
            yield deliver
        finally:
            with trio.CancelScope(shield=True):
                await host.close()


@contextlib.asynccontextmanager
async def _raw_side(port: int) -> AsyncIterator[Deliver]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)

    async def deliver(payload: bytes) -> None:
        await stream.send_all(FRAME_HEADER.pack(MAGIC, FRAME_VERSION, len(payload)))
        await stream.send_all(payload)
        if await stream.receive_some(1) != ACK:
            raise RuntimeError("raw TCP: no ack")

    async with stream:
        yield deliver


_SIDE_OPENERS = {"libp2p": _endpoint_side, "naive": _naive_side, "raw": _raw_side}


def _cpu_seconds(pid: int) -> float:
    """CPU time the process's main thread has used (Linux, nanosecond resolution); 0 elsewhere."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


async def _sender(addresses: dict, sides: list[str]) -> dict:
    times: dict = {}
    receiver_pid = addresses["pid"]
    async with contextlib.AsyncExitStack() as stack:
        delivers = {name: await stack.enter_async_context(_SIDE_OPENERS[name](addresses[name])) for name in sides}
        for size in SIZES:
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            times[size] = {name: {"wall": [], "cpu": [], "receiver_cpu": []} for name in sides}
            for repetition in range(WARMUP + REPEATS[size]):
                for name, deliver in delivers.items():
                    wall, cpu, receiver_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(receiver_pid)
                    await deliver(payload)
                    if repetition >= WARMUP:
                        times[size][name]["wall"].append(time.perf_counter() - wall)
                        times[size][name]["cpu"].append(time.process_time() - cpu)
                        times[size][name]["receiver_cpu"].append(_cpu_seconds(receiver_pid) - receiver_cpu)
    return times


def _run_role(role: str, sides: list[str], profile: str | None) -> None:
    _quiet()
    if role == "receiver":
        call = functools.partial(trio.run, _receiver)
    else:
        call = functools.partial(trio.run, _sender, json.loads(sys.stdin.readline()), sides)
    if profile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU time: waiting on the other process is not cost
        result = profiler.runcall(call)
        profiler.dump_stats(str(Path(profile) / f"{role}.prof"))
    else:
        result = call()
    if role == "sender":
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: start both, pass the addresses along, collect and print


def _child(role: str, sides: list[str], profile: str | None) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--sides", ",".join(sides)]
    if profile:
        command += ["--profile", profile]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _measure(sides: list[str], profile: str | None) -> dict:
    receiver = _child("receiver", sides, profile)
    sender = None
    try:
        addresses = receiver.stdout.readline()
        if not addresses:
            raise RuntimeError("the receiver process did not start")
        sender = _child("sender", sides, profile)
        output, _ = sender.communicate(addresses, timeout=RUN_TIMEOUT_S)
        if sender.returncode != 0:
            raise RuntimeError(f"the sender process failed (exit {sender.returncode})")
        receiver.stdin.close()
        receiver.wait(timeout=30)
        return {int(size): value for size, value in json.loads(output.strip().splitlines()[-1]).items()}
    finally:
        for process in (sender, receiver):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _per_mb(seconds: list[float], size: int) -> float:
    return statistics.median(seconds) * 1e3 / (size / 1e6)


def _report(size: int, by_side: dict) -> dict:
    """Print one payload size's figures; its entry in main()'s result."""
    rates = {name: size / statistics.median(t["wall"]) / 1e6 for name, t in by_side.items()}
    label = f"{size / 1e6:g} MB"
    print(f"  {label:>5} x {REPEATS[size]:2d}: " + " | ".join(f"{name} {rates[name]:7.1f} MB/s" for name in by_side))
    print("         CPU ms per MB, sender + receiver: " + " | ".join(
        f"{name} {_per_mb(t['cpu'], size):4.2f} + {_per_mb(t['receiver_cpu'], size):4.2f}" for name, t in by_side.items()))
    entry: dict = {
        "mb_per_s": rates,
        "sender_cpu_ms_per_mb": {name: _per_mb(t["cpu"], size) for name, t in by_side.items()},
        "receiver_cpu_ms_per_mb": {name: _per_mb(t["receiver_cpu"], size) for name, t in by_side.items()},
        "times_s": {name: t["wall"] for name, t in by_side.items()},
    }
    if "raw" not in by_side:
        return entry
    raw = by_side["raw"]["wall"]
    shown = []
    for name in (n for n in by_side if n != "raw"):
        # Paired: each delivery against the raw one made right after it, so load that comes and goes on a
        # shared machine cancels out; the ratio of the medians is printed next to it.
        paired = statistics.median(r / t for r, t in zip(raw, by_side[name]["wall"]))
        entry[f"ratio_{name}_over_raw"] = paired
        entry[f"ratio_of_medians_{name}_over_raw"] = rates[name] / rates["raw"]
        shown.append(f"{name} / raw {paired:5.2f} (of medians {rates[name] / rates['raw']:4.2f})")
    print(f"         {'   '.join(shown)}   target libp2p / raw >= {TARGET}")
    return entry


def main(sides: Sequence[str] = SIDES, profile: str | None = None) -> dict:
    _quiet()
    times = _measure(sides, profile)
    result: dict = {"target": TARGET, "process_layout": "sender and receiver in two processes"}
    print("update delivery on loopback, sender and receiver in two processes, interleaved; "
          "ratios: median of paired deliveries")
    for size, by_side in times.items():
        result[f"{size / 1e6:g} MB"] = _report(size, by_side)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("sender", "receiver"), help=argparse.SUPPRESS)
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--profile", help="folder for a cProfile dump of each process")
    args = parser.parse_args()
    chosen = args.sides.split(",")
    if args.role:
        _run_role(args.role, chosen, args.profile)
    else:
        main(chosen, args.profile)
