"""What `p2pfed peer` tells its operator: a few status lines while it waits, neighbours by name and short ID,
the trust row in each round line, a loud end (exit status 3) when a neighbour was never heard from, and a
finished peer started again that says so at once."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from p2pfed.cli import main
from p2pfed.peerlog import (NeighbourStatus, named_neighbours, round_line, short_id, silent_neighbours,
                            silent_summary, waiting_line)
from p2pfed.records import RoundRecord

A_ID = "12D3KooWGN3H8s8UQw2NNv8uYrjVu3evacHV2mZaRe9MqXoXsoA5"
B_ID = "12D3KooWD5pw314KT1arXkrXetQAysNaiFR1PZEc4qt8aAPymAxv"


# -- text from plain data ------------------------------------------------------------------------

def test_a_round_line_shows_the_trust_row_sorted_by_peer():
    record = RoundRecord(3, 24, 2.5, 21.0937, {"peer10": 0.1, "peer2": 0.3, "peer0": 0.6}, ("peer7",), 0,
                         neighbours=("peer2", "peer7", "peer10"))
    assert round_line("peer0", record) == ("peer0: round 3, test ppl 21.094, trust peer0=0.60 peer2=0.30 "
                                           "peer10=0.10, missing peer7")
    assert round_line("peer0", RoundRecord(0, 0, None, 22.5, {}, (), 0)) == "peer0: round 0, test ppl 22.500"
    assert "sat out" in round_line("peer0", RoundRecord(2, 8, None, None, {}, (), 0, online=False))


def test_silent_neighbours_are_those_awaited_of_which_nothing_ever_arrived():
    def r(i, trust, missing, neighbours=("peer1", "peer2", "peer3")):
        return RoundRecord(i, i, 1.0, 2.0, trust, missing, 0, neighbours=neighbours)

    rounds = [RoundRecord(0, 0, None, 2.0, {}, (), 0),
              r(1, {"peer0": 0.5, "peer1": 0.5}, ("peer2", "peer3")),
              r(2, {"peer0": 1.0}, ("peer1", "peer2", "peer3"))]
    assert silent_neighbours(rounds, arrived=()) == ["peer2", "peer3"]
    assert silent_neighbours(rounds, arrived=["peer3"]) == ["peer2"]  # it arrived, late or refused: not silent
    # A scheme that never communicates awaits nobody.
    assert silent_neighbours([r(1, {}, ()), r(2, {}, ())], arrived=()) == []


def test_the_waiting_line_and_the_silent_summary_name_who_where_and_why():
    refused = NeighbourStatus("peer1", B_ID, ("/ip4/127.0.0.1/tcp/4002",), False, "cannot connect: connection refused")
    wrong = NeighbourStatus("peer2", A_ID, ("/ip4/127.0.0.1/tcp/4003",), False, answered_by=(B_ID,))
    line = waiting_line("peer0", [refused], 3, 5.2, 30)
    assert line == ("peer0: waiting for peer1 (12D3…mAxv) at /ip4/127.0.0.1/tcp/4002 (connection refused), 5 s so "
                    "far; round 1 starts without it in 25 s")
    assert "2 of 3 neighbours" in waiting_line("peer0", [refused, wrong], 3, 5, 30)
    summary = silent_summary("peer0", [refused, wrong], 3, 4, "/state/peer0")
    assert summary.startswith("peer0: never heard from 2 of its 3 neighbour(s) in 4 round(s)")
    assert f"peer1 ({short_id(B_ID)}) at /ip4/127.0.0.1/tcp/4002: never connected (connection refused)" in summary
    assert "another ID" in summary and B_ID in summary and "exit status 3" in summary
    for cause in ("not started", "wrong peer ID", "unreachable address"):
        assert cause in summary


def test_log_lines_about_a_neighbour_name_it_and_its_short_id(caplog):
    caplog.set_level(logging.INFO, logger="p2pfed")
    endpoint_log, loop_log = logging.getLogger("p2pfed.net.libp2p_endpoint"), logging.getLogger("p2pfed.loop")
    with named_neighbours("peer0", A_ID, {"peer1": B_ID}):
        endpoint_log.warning("%s: send to %s failed (%d in a row): %s", A_ID, B_ID, 2, "cannot connect")
        loop_log.error("%s: dropped a bad update from %s: %s", "peer0", "peer1", "bad")
        endpoint_log.warning("%s: refused %s", B_ID, A_ID)  # another peer's line: not this peer's names
    endpoint_log.warning("%s: send to %s failed", A_ID, B_ID)  # the peer has stopped: raw IDs again
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"peer0: send to peer1 ({short_id(B_ID)}) failed (2 in a row): cannot connect"
    assert messages[1] == f"peer0: dropped a bad update from peer1 ({short_id(B_ID)}): bad"
    assert messages[2:] == [f"{B_ID}: refused {A_ID}", f"{A_ID}: send to {B_ID} failed"]


# -- dials ------------------------------------------------------------------------------------------

def test_a_failed_dial_has_one_short_reason_and_libp2ps_own_lines_stay_quiet(capfd):
    from p2pfed.launch import free_ports, loopback_addr
    from p2pfed.net.identity import identity_from_seed, peer_id_of
    from p2pfed.net.libp2p_endpoint import open_libp2p_endpoint

    port, dead = free_ports(2)
    absent = peer_id_of(identity_from_seed(402))

    async def main_():
        with trio.fail_after(30):
            async with open_libp2p_endpoint(identity_from_seed(401), loopback_addr(port),
                                            {absent: [loopback_addr(dead)]}) as endpoint:
                assert await endpoint.wait_for_neighbours(1.5) == [absent]
                assert endpoint.neighbours[absent].last_error == "cannot connect: connection refused"
                assert not endpoint.connected(absent)

    trio.run(main_)
    err = capfd.readouterr().err
    assert "Failed to open TCP stream" not in err and "fail to" not in err, err


def test_dial_failure_digs_the_root_cause_out_of_libp2ps_wrapping():
    from libp2p.exceptions import MultiError
    from libp2p.network.exceptions import SwarmDialAllFailedError, SwarmException

    from p2pfed.net.dialling import dial_failure
    from p2pfed.net.fastpath import WrongPeer

    def wrapped(root):
        try:
            try:
                raise root
            except BaseException as inner:
                raise SwarmException("failed to upgrade") from inner
        except SwarmException as swarm:
            try:
                raise SwarmDialAllFailedError("unable to connect") from MultiError([swarm])
            except SwarmDialAllFailedError as error:
                return error

    assert dial_failure(wrapped(ExceptionGroup("all failed", [ConnectionRefusedError(111, "refused")]))) == \
        "connection refused"
    assert dial_failure(wrapped(WrongPeer("dialled X, Y answered"))) == "a peer with another ID answered"
    assert dial_failure(wrapped(ConnectionResetError(104, "reset"))) == "it hung up during the handshake"
    assert dial_failure(wrapped(OSError(113, "No route to host"))) == "no route to host"


# -- p2pfed peer end to end ---------------------------------------------------------------------------

SMALL = ["--set", "training.local_steps=1", "--set", "data.train_blocks=8", "--set", "data.val_blocks=4",
         "--set", "data.test_blocks=4"]


def _swarm(tmp_path: Path, *sets: str) -> Path:
    out = tmp_path / "swarm"
    assert main(["init", "2", "--out", str(out), *SMALL, *[a for s in sets for a in ("--set", s)]]) == 0
    return out


def _peer(path: Path, *sets: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "p2pfed", "peer", str(path), *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


@pytest.mark.slow
def test_a_peer_whose_neighbour_never_starts_waits_quietly_then_ends_loudly_with_exit_3(tmp_path):
    swarm = _swarm(tmp_path, "training.rounds=1", "network.round_timeout_s=2")
    code, out, err = _finish(_peer(swarm / "peer0.toml", "startup_timeout_s=7"))
    assert code == 3, out + err
    waiting = [line for line in err.splitlines() if "waiting for peer1" in line]
    assert 1 <= len(waiting) <= 3, err  # a line every 5 s, not one per dial (4 a second)
    assert "Failed to open TCP stream" not in err and "fail to" not in err, err
    address = re.search(r"at (/ip4/127\.0\.0\.1/tcp/\d+)", waiting[0]).group(1)
    assert re.search(r"peer1 \(12D3…\w{4}\) at /ip4/", waiting[0]) and "connection refused" in waiting[0]
    assert "starting round 1 without peer1 (12D3…" in err
    summary = err[err.index("peer0: never heard from"):]
    assert summary.startswith("peer0: never heard from 1 of its 1 neighbour(s) in 1 round(s)")
    assert "peer1 (12D3…" in summary and address in summary and "exit status 3" in summary
    assert "peer0: round 1, test ppl" in out and "missing peer1" in out


@pytest.mark.slow
def test_two_peers_print_their_trust_rows_and_a_finished_peer_restarted_exits_at_once(tmp_path):
    swarm = _swarm(tmp_path, "training.rounds=2", "network.round_timeout_s=60")
    peers = [_peer(swarm / f"peer{i}.toml") for i in range(2)]
    results = [_finish(p) for p in peers]
    for i, (code, out, err) in enumerate(results):
        assert code == 0, out + err
        rows = re.findall(rf"^peer{i}: round (\d), test ppl [\d.]+, trust peer0=(0\.\d\d|1\.00) peer1=(0\.\d\d|1\.00)$",
                          out, re.MULTILINE)
        assert [r[0] for r in rows] == ["1", "2"], out
        assert "connected to its 1 neighbour(s)" in err and "never heard" not in err
    started = time.monotonic()
    code, out, err = _finish(_peer(swarm / "peer0.toml"), timeout=60)
    assert code == 0 and out.startswith("peer0: finished before: all 2 rounds are done"), out + err
    assert time.monotonic() - started < 30 and "waiting" not in err  # no model loaded, nobody waited for
