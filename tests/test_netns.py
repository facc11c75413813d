"""Many hosts on one machine: peers in separate network namespaces (p2pfed.netlab), each started from a
`p2pfed init` file, find each other, follow the topology, finish and write results; a TCP relay in the hub gives
the links latency and loss. Skipped, with the reason, where namespaces cannot be created (not root, no `ip`)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest
import trio

from p2pfed.load import load_peer
from p2pfed.netlab import NetLab, can_create_namespaces, netem_missing, remove_stale_namespaces
from p2pfed.netlab.harness import LabRun, LabRunError, Output, run_swarm
from p2pfed.netlab.relay import MSS, Link, Relay, Route

SMALL = ["training.rounds=2", "training.local_steps=2", "data.train_blocks=8", "data.val_blocks=4",
         "data.test_blocks=4", "network.round_timeout_s=60"]
SERVER = ("import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 4001)); s.listen(); "
          "print('listening', flush=True); c, a = s.accept(); "
          "print('from', a[0], flush=True); c.sendall(c.recv(64)); c.recv(64)")
CLIENT = ("import socket, sys, time; s = socket.create_connection((sys.argv[1], 4001), timeout=float(sys.argv[2])); "
          "t = time.perf_counter(); s.sendall(b'ping'); assert s.recv(64) == b'ping'; print(time.perf_counter() - t)")


@pytest.fixture(scope="session")
def netns():
    reason = can_create_namespaces()
    if reason is not None:
        pytest.skip(f"network namespaces: {reason}")
    remove_stale_namespaces()  # what runs killed with SIGKILL left behind


def lab_namespaces() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.startswith("p2pf-")]


# -- the link, without namespaces ------------------------------------------------------------------------

def test_a_link_delays_by_its_latency_and_holds_about_the_share_of_chunks_that_lose_a_segment():
    assert Link(0.02).delay_s(random.Random(0), 65536) == 0.02
    link = Link(0.02, loss=0.01, seed=0)
    assert link.retransmit_s == pytest.approx(0.24)  # 200 ms RTO + a round trip
    for nbytes, segments in ((1, 1), (65536, 46)):
        rng = random.Random(1)
        delays = [link.delay_s(rng, nbytes) for _ in range(4000)]
        assert set(delays) == {0.02, 0.26}
        share, expected = delays.count(0.26) / len(delays), 1 - 0.99 ** segments
        assert abs(share - expected) < 4 * (expected * (1 - expected) / len(delays)) ** 0.5, (nbytes, share)
    assert [link.delay_s(random.Random(7), MSS) for _ in range(50)] == \
           [link.delay_s(random.Random(7), MSS) for _ in range(50)]
    for bad in ({"latency_s": -1}, {"loss": 1.0}, {"latency_s": float("nan")}):
        with pytest.raises(ValueError):
            Link(**bad)


async def _echo_behind_relay(nursery, link: Link) -> tuple[trio.SocketStream, Relay]:
    """An echo server on loopback, a relay in front of it with `link`, and a stream dialled through the relay."""
    async def echo(stream):
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    relay = Relay([Route(("127.0.0.1", 0), listeners[0].socket.getsockname()[:2])], link)
    nursery.start_soon(trio.serve_listeners, echo, listeners)
    await nursery.start(relay.serve)
    return await trio.open_tcp_stream(*relay.bound[0]), relay


async def _round_trips(stream: trio.SocketStream, count: int) -> list[float]:
    """Seconds for each of `count` one-byte echoes, one after another."""
    trips = []
    for _ in range(count):
        start = trio.current_time()
        await stream.send_all(b"x")
        assert await stream.receive_some(10) == b"x"
        trips.append(trio.current_time() - start)
    return trips


def test_the_relay_delays_each_way_keeps_bytes_in_order_and_passes_a_half_close():
    latency = 0.05
    blob = random.Random(3).randbytes(3_000_000)

    async def main():
        async with trio.open_nursery() as nursery:
            stream, relay = await _echo_behind_relay(nursery, Link(latency))
            trips = await _round_trips(stream, 3)
            got = bytearray()

            async def send():
                await stream.send_all(blob)
                await stream.send_eof()

            with trio.fail_after(20):
                nursery.start_soon(send)
                while data := await stream.receive_some(1 << 20):
                    got += data
            nursery.cancel_scope.cancel()
        return trips, bytes(got), relay.counts

    trips, got, counts = trio.run(main)
    # The first byte waits for an emulated TCP handshake (3 latencies in, 1 back); later ones a round trip.
    assert 4 * latency <= trips[0] < 4 * latency + 0.5
    assert all(2 * latency <= t < 2 * latency + 0.5 for t in trips[1:]), trips
    assert got == blob  # whole, in order, and the echo's end came back after our half-close
    assert counts.connections == 1 and counts.bytes == 2 * len(blob) + 6 and counts.held == 0


def test_a_relay_whose_target_is_down_resets_the_dialler_at_once():
    async def main():
        nobody = trio.socket.socket()
        await nobody.bind(("127.0.0.1", 0))  # a port that is bound but not listening: connections are refused
        relay = Relay([Route(("127.0.0.1", 0), nobody.getsockname())], Link(0.01))
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            stream = await trio.open_tcp_stream(*relay.bound[0])
            with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(10)  # not an orderly end of stream: a reset
            nursery.cancel_scope.cancel()
        nobody.close()
        return relay.counts

    counts = trio.run(main)
    assert (counts.failed_connects, counts.connections) == (1, 0)


def test_a_lossy_relay_holds_some_chunks_by_a_retransmission_timeout():
    async def main():
        async with trio.open_nursery() as nursery:
            stream, relay = await _echo_behind_relay(nursery, Link(0.0, 0.5, seed=4))
            trips = await _round_trips(stream, 8)
            nursery.cancel_scope.cancel()
        return trips, relay.counts

    trips, counts = trio.run(main)
    held = [t for t in trips if t >= 0.2]
    assert counts.held >= 1 and 1 <= len(held) < len(trips) and all(t < 1.0 for t in trips), trips


def test_where_namespaces_cannot_be_made_the_reason_is_one_line(monkeypatch):
    import p2pfed.netlab.lab as lab

    monkeypatch.setattr(lab.os, "geteuid", lambda: 1000)
    assert can_create_namespaces() == "network namespaces need root (ip netns add)"
    monkeypatch.setattr(lab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab.shutil, "which", lambda _: None)
    assert can_create_namespaces() == "the `ip` command (iproute2) is not installed"


# -- namespaces -----------------------------------------------------------------------------------------

def test_hosts_reach_each_other_and_everything_goes_even_on_ctrl_c(netns, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with NetLab(2) as lab:
            names = [h.namespace for h in (lab.hub, *lab.hosts)]
            assert set(names) <= set(lab_namespaces())
            server = lab.popen(lab.hosts[1], [sys.executable, "-c", SERVER, lab.hosts[1].ip],
                               stdout=subprocess.PIPE, text=True)
            out = Output(server, tmp_path / "server.log").start()
            assert out.wait_for("^listening$", 30), out.tail()
            client = _client(lab, lab.hosts[0], lab.hosts[1].ip)
            assert client.returncode == 0, client.stderr
            assert out.wait_for(rf"^from {lab.hosts[0].ip}$", 10)  # straight across the bridge
            lingering = lab.popen(lab.hosts[0], ["sleep", "600"])
            raise KeyboardInterrupt
    assert server.poll() is not None and lingering.poll() is not None
    assert not set(names) & set(lab_namespaces())
    root = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    assert "10.77.0." not in root  # the root namespace never had the lab's addresses


def test_with_intercept_hosts_reach_each_other_only_through_the_relay_in_the_hub(netns, tmp_path):
    latency = 0.03
    with NetLab(2, intercept=True) as lab:
        target = lab.hosts[1]
        server = lab.popen(target, [sys.executable, "-c", SERVER, target.ip], stdout=subprocess.PIPE, text=True)
        out = Output(server, tmp_path / "server.log").start()
        assert out.wait_for("^listening$", 30), out.tail()
        # No relay yet: the hub takes host 1's address for its own, and nothing answers there (not even a reset:
        # the hub may not send from an address that is not its own). Nothing goes round the hub.
        unanswered = _client(lab, lab.hosts[0], target.ip, timeout=1.5)
        assert unanswered.returncode != 0 and "TimeoutError" in unanswered.stderr, unanswered.stderr
        assert not any(line.startswith("from") for _, line in out.lines)
        relay = lab.popen(lab.hub, [sys.executable, "-m", "p2pfed.netlab.relay", "--transparent", "--latency-ms",
                                    str(latency * 1000), f"{target.ip}:4001={target.ip}:4001"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        relayed = Output(relay, tmp_path / "relay.log").start()
        assert relayed.wait_for("^ready$", 30), relayed.tail()
        client = _client(lab, lab.hosts[0], target.ip)
        assert client.returncode == 0, client.stderr
        assert 2 * latency <= float(client.stdout) < 2 * latency + 0.5
        assert out.wait_for(rf"^from {lab.hub.ip}$", 10), out.tail()  # the relay dialled host 1's real address
        relay.terminate()
        assert relayed.wait_for(r"^relay: connections=1 bytes=8 ", 10), relayed.tail()


def test_where_the_kernel_has_netem_it_delays_each_host_link(netns, tmp_path):
    reason = netem_missing()
    if reason is not None:
        pytest.skip(f"the relay stands in for it here: {reason}")
    latency = 0.03
    with NetLab(2, netem=(latency, 0.0)) as lab:
        server = lab.popen(lab.hosts[1], [sys.executable, "-c", SERVER, lab.hosts[1].ip], stdout=subprocess.PIPE,
                           text=True)
        out = Output(server, tmp_path / "server.log").start()
        assert out.wait_for("^listening$", 30), out.tail()
        client = _client(lab, lab.hosts[0], lab.hosts[1].ip)
        assert client.returncode == 0, client.stderr
        assert 2 * latency <= float(client.stdout) < 2 * latency + 0.5


def _client(lab: NetLab, host, ip: str, timeout: float = 5.0) -> subprocess.CompletedProcess:
    return lab.run(host, [sys.executable, "-c", CLIENT, ip, str(timeout)], timeout=30)


# -- swarms of p2pfed peer processes -------------------------------------------------------------------------

def expected_neighbours(run: LabRun, swarm: str | None) -> dict[str, tuple[str, ...]]:
    """Each peer's neighbours in every round: its file's list, or in membership mode the graph every member
    derives from the members sorted by peer ID (all of them take part in every round here)."""
    peers = [load_peer(path) for path in run.paths]
    if swarm is None:
        return {p.name: tuple(n.name for n in p.neighbours) for p in peers}
    from p2pfed.net.identity import identity_from_file, peer_id_of
    from p2pfed.swarm_topology import by_index, derived_graph

    class Member:
        def __init__(self, peer):
            self.name, self.peer_id = peer.name, peer_id_of(identity_from_file(peer.key_file))

    graph = derived_graph([Member(p) for p in peers], peers[0].topology, peers[0].seed, 1)
    return {p.name: by_index(graph.neighbors(p.name)) for p in peers}


def check_finished_on_topology(run: LabRun, swarm: str | None, rounds: int) -> None:
    expected = expected_neighbours(run, swarm)
    assert len({len(n) for n in expected.values()}) == 1 and len(next(iter(expected.values()))) < len(expected) - 1
    logs = "\n".join(f"== {path.name}\n{path.read_text()}" for path in sorted(run.folder.glob("*.log")))
    for name, result in run.results.items():
        assert run.exit_codes[name] == 0
        assert [r.round for r in result.rounds] == list(range(rounds + 1))
        for record in result.rounds[1:]:
            assert record.neighbours == expected[name], (name, record)
            assert record.missing == (), (name, record, logs)  # every neighbour's update arrived in time
            assert set(record.trust) == {name, *expected[name]}
        assert (run.folder / name / "result.json").is_file()
        assert set(run.round_times[name]) == set(range(rounds + 1))


def test_a_peer_that_fails_stops_the_run_at_once_with_its_log_and_nothing_is_left(netns, tmp_path):
    started = time.monotonic()
    with pytest.raises(LabRunError, match=r"peer\d exited with 2:\n(.|\n)*no_such_key"):
        run_swarm(2, tmp_path / "swarm", overrides=SMALL, peer_args=["--set", "no_such_key=1"], timeout_s=120)
    assert time.monotonic() - started < 60
    assert not [n for n in lab_namespaces() if n.startswith(f"p2pf-{os.getpid()}-")]


@pytest.mark.slow
@pytest.mark.parametrize("swarm", [None, "lab"], ids=["neighbour-lists", "bootstrap"])
def test_peers_in_namespaces_find_each_other_follow_the_topology_and_finish(netns, tmp_path, swarm):
    started = time.monotonic()
    run = run_swarm(4, tmp_path / "swarm", overrides=['topology="ring"', *SMALL], swarm=swarm, timeout_s=240)
    check_finished_on_topology(run, swarm, rounds=2)
    if swarm:
        assert all(not load_peer(p).neighbours and len(load_peer(p).bootstrap) == 1 for p in run.paths)
    assert time.monotonic() - started < 240
    assert not [n for n in lab_namespaces() if n.startswith(f"p2pf-{os.getpid()}-")]  # all torn down


@pytest.mark.slow
@pytest.mark.parametrize("swarm", [None, "lab"], ids=["neighbour-lists", "bootstrap"])
def test_peers_finish_through_a_relay_with_20_ms_links(netns, tmp_path, swarm):
    run = run_swarm(4, tmp_path / "swarm", link=Link(0.02, seed=1), overrides=['topology="ring"', *SMALL],
                    swarm=swarm, timeout_s=240)
    check_finished_on_topology(run, swarm, rounds=2)
    counts = dict(item.split("=") for item in run.relay_counts.removeprefix("relay: ").split())
    # Every dial went through the relay: at least one connection per ring edge, and the updates' bytes.
    sent = sum(r.bytes_sent for r in run.results.values())
    assert int(counts["connections"]) >= 4 and int(counts["bytes"]) >= sent, (counts, sent)
    assert json.loads((run.folder / "peer0" / "result.json").read_text())["name"] == "peer0"
