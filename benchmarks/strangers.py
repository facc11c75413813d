"""Thousands of stranger connections against one libp2p endpoint: its memory per 1,000, and whether a neighbour
still gets in afterwards. Loopback only.

A stranger is a new random Ed25519 identity that dials the endpoint, completes the Noise handshake (which
authenticates it as a peer that is not a neighbour) and tries to go on to Yamux. The strangers run in a
second process (this script with --role strangers), WAVE at a time, so the resident memory measured is
the endpoint's process alone; it is sampled after a warm-up of WARMUP strangers and then after every
1,000. At the end one neighbour connects and delivers an update, and the endpoint's libp2p inbound
connection slots still taken are counted.

    .venv/bin/python benchmarks/strangers.py                 # 3,000 strangers (about 30 s)
    .venv/bin/python benchmarks/strangers.py --count 10000   # the full run

Targets: RSS growth < 50 MB per 1,000 strangers; the neighbour delivers.
py-libp2p 0.8.1 with p2pfed's fast path before the fix kept ~2 MB per stranger and, after 250 of them
in the host's life, accepted no inbound connection at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import trio
from libp2p.peer.id import ID

from p2pfed.net.identity import identity_from_seed, peer_id_of
from p2pfed.net.libp2p_endpoint import open_libp2p_endpoint
from p2pfed.net.stranger import dial_strangers

COUNT = 3_000
WAVE = 50  # strangers dialling at once
WARMUP = 200  # strangers before the first RSS sample: first-use allocations are not per stranger
TARGET_MB_PER_1000 = 50.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SEEDS = (1, 2)  # the neighbour, the endpoint under test
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
RUN_TIMEOUT_S = 1800.0


def _quiet() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # each refused stranger makes libp2p log an error


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES / 1e6


# ---------------------------------------------------------------------------------------------
# Stranger process: dial in waves, print a line of outcomes per batch of strangers


async def _run_strangers(addr: str, peer_id: str, batches: list[int], wave: int) -> None:
    target = ID.from_base58(peer_id)
    for size in batches:
        print(json.dumps(await dial_strangers(addr, target, size, wave)), flush=True)
        sys.stdin.readline()  # the endpoint has sampled its memory: next batch


# ---------------------------------------------------------------------------------------------
# The endpoint under test (this process)


async def _read_line(stream: trio.abc.ReceiveStream) -> str:
    """One line (the stranger process's report of a batch) from `stream`."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"the stranger process ended early (after {data!r})")
        data += chunk
    return data.decode()


async def _measure(count: int, wave: int) -> dict:
    with trio.fail_after(RUN_TIMEOUT_S):
        return await _measure_unbounded(count, wave)


async def _measure_unbounded(count: int, wave: int) -> dict:
    neighbour_key, key = identity_from_seed(SEEDS[0]), identity_from_seed(SEEDS[1])
    neighbour_id, peer_id = peer_id_of(neighbour_key), peer_id_of(key)
    batches = [WARMUP] + [min(1000, count - done) for done in range(0, count, 1000)]
    async with open_libp2p_endpoint(key, LOOPBACK, {neighbour_id: []}) as endpoint:
        command = [sys.executable, str(Path(__file__).resolve()), "--role", "strangers", "--addr",
                   endpoint.listen_addrs[0], "--peer", peer_id, "--batches", ",".join(map(str, batches)),
                   "--wave", str(wave)]
        process = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        outcomes: dict[str, int] = {}
        samples: list[tuple[int, float]] = []  # (strangers after the warm-up, RSS MB)
        started = time.perf_counter()
        try:
            done = 0
            for index, size in enumerate(batches):
                for outcome, n in json.loads(await _read_line(process.stdout)).items():
                    outcomes[outcome] = outcomes.get(outcome, 0) + n
                await trio.sleep(0.2)  # closing connections are noticed
                if index:
                    done += size
                samples.append((done, rss_mb()))
                print(f"  {done:6d} strangers  RSS {samples[-1][1]:7.1f} MB  slots taken "
                      f"{int(endpoint._host.get_network()._inbound_limiter.borrowed_tokens)}", flush=True)
                await process.stdin.send_all(b"\n")
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
        seconds = time.perf_counter() - started
        slots = int(endpoint._host.get_network()._inbound_limiter.borrowed_tokens)
        delivered = False
        async with open_libp2p_endpoint(neighbour_key, LOOPBACK, {peer_id: endpoint.listen_addrs}) as neighbour:
            await neighbour.send(peer_id, b"still welcome")
            with trio.move_on_after(10.0):
                delivered = await endpoint.receive() == (neighbour_id, b"still welcome")
        refused = endpoint.strangers_refused
    per_1000 = [(rss - previous) / ((n - m) / 1000) for (m, previous), (n, rss) in zip(samples, samples[1:])]
    growth = (samples[-1][1] - samples[0][1]) / (count / 1000)
    return {"strangers": count, "outcomes": outcomes, "refused_after_noise": refused, "seconds": seconds,
            "rss_mb": [rss for _, rss in samples], "rss_mb_per_1000": growth, "rss_mb_per_1000_batches": per_1000,
            "inbound_slots_taken": slots, "neighbour_delivered": 1.0 if delivered else 0.0}


def main(count: int = COUNT, wave: int = WAVE) -> dict:
    _quiet()
    result = trio.run(_measure, count, wave)
    print(f"{result['strangers']} strangers (+{WARMUP} warm-up) in {result['seconds']:.0f} s ({result['outcomes']}); "
          f"{result['refused_after_noise']} hung up on after Noise")
    print(f"RSS growth {result['rss_mb_per_1000']:.2f} MB per 1,000 (target < {TARGET_MB_PER_1000:g}); "
          f"per batch {', '.join(f'{v:.2f}' for v in result['rss_mb_per_1000_batches'])}")
    print(f"inbound slots still taken: {result['inbound_slots_taken']}; "
          f"a neighbour delivers afterwards: {'yes' if result['neighbour_delivered'] else 'NO'}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--wave", type=int, default=WAVE)
    parser.add_argument("--role", choices=("endpoint", "strangers"), default="endpoint")
    parser.add_argument("--addr")
    parser.add_argument("--peer")
    parser.add_argument("--batches")
    args = parser.parse_args()
    if args.role == "strangers":
        _quiet()
        trio.run(_run_strangers, args.addr, args.peer, [int(b) for b in args.batches.split(",")], args.wave)
    else:
        main(args.count, args.wave)
