"""The real network: peers as processes (or embedded in a trio app) over libp2p on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from p2pfed.checkpoint import load_checkpoint
from p2pfed.load import load_peer
from p2pfed.launch import free_ports, loopback_addr, peer_configs, run_job_libp2p, write_peer_toml
from p2pfed.job import job_setup
from p2pfed.peer import RESULT_FILE, Peer, RoundFinished, TrustChanged, UpdateReceived
from p2pfed.swarm import run_job
from tests.conftest import small_config

pytestmark = pytest.mark.slow


def records(job):
    return {name: [(r.round, r.steps, r.train_loss, r.test_ppl, r.trust) for r in peer.rounds]
            for name, peer in job.peers.items()}


def test_a_4_process_libp2p_swarm_gives_the_in_process_results(workspace, tmp_path):
    config = small_config("training.rounds=2", "training.local_steps=2", "network.round_timeout_s=60")
    simulated = run_job(config, workspace, "validation", seed=0)
    networked = run_job_libp2p(config, workspace, "validation", seed=0, run_dir=tmp_path)
    assert all(r.missing == () for peer in networked.peers.values() for r in peer.rounds)
    assert records(networked) == records(simulated)
    assert networked.groups == simulated.groups and networked.graph_edges == simulated.graph_edges


def test_an_attack_runs_the_same_over_libp2p_as_in_process(workspace, tmp_path):
    config = small_config("training.rounds=2", "training.local_steps=2", "network.round_timeout_s=60",
                          'attack=[{peers=["peer3"], kind="sign_flip"}]')
    simulated = run_job(config, workspace, "validation", seed=0)
    networked = run_job_libp2p(config, workspace, "validation", seed=0, run_dir=tmp_path)
    assert records(networked) == records(simulated)
    assert records(simulated) != records(run_job(small_config("training.rounds=2", "training.local_steps=2"),
                                                 workspace, "validation", seed=0))  # the attack did something


def _start(path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "p2pfed", "peer", str(path)], stdout=open(log, "a"),
                            stderr=subprocess.STDOUT)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_killed_peer_process_restarted_with_its_state_folder_resumes_and_rejoins(workspace, tmp_path):
    # The deadline outlasts a restart (torch, libp2p and the model load again, slower on a busy machine), so
    # the survivor is still in its rounds when the victim comes back.
    config = small_config("num_peers=2", "training.rounds=6", "training.local_steps=2", "network.round_timeout_s=20")
    graph, _ = job_setup(config, workspace, seed=0)
    peers = peer_configs(config, graph, "fedavg", 0, tmp_path, free_ports(2))
    paths = []
    for peer in peers:
        paths.append(tmp_path / f"{peer.name}.toml")
        write_peer_toml(peer, paths[-1])
    survivor = _start(paths[0], tmp_path / "peer0.log")
    victim = _start(paths[1], tmp_path / "peer1.log")
    try:
        victim_state = Path(peers[1].state_dir)

        def checkpointed(round_index):
            try:
                ckpt = load_checkpoint(victim_state)
            except Exception:  # mid-write of the first generation: not there yet
                return False
            return ckpt is not None and ckpt.round >= round_index

        _wait_for(lambda: checkpointed(2), 120, "peer1's round-2 checkpoint")
        os.kill(victim.pid, signal.SIGKILL)  # a crash: no chance to save anything more
        victim.wait(10)
        killed_at = load_checkpoint(victim_state).round
        assert killed_at < 6
        restarted = _start(paths[1], tmp_path / "peer1.log")
        assert restarted.wait(180) == 0, (tmp_path / "peer1.log").read_text()[-3000:]
        assert survivor.wait(180) == 0, (tmp_path / "peer0.log").read_text()[-3000:]
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.kill()
    result = json.loads((victim_state / RESULT_FILE).read_text())
    rounds = [r["round"] for r in result["rounds"]]
    assert rounds == [0, 1, 2, 3, 4, 5, 6]  # nothing lost, nothing done twice
    assert f"resumed from {victim_state} after round {killed_at}" in (tmp_path / "peer1.log").read_text()
    # After the restart it rejoined: its last round aggregated the survivor's update again.
    assert "peer0" in result["rounds"][-1]["trust"], [r["trust"] for r in result["rounds"]]


def test_a_peer_embedded_in_a_trio_app_trains_in_the_background_and_reports_events(tmp_path):
    from p2pfed.net.identity import identity_from_seed, peer_id_of

    ports = free_ports(2)
    ids = [peer_id_of(identity_from_seed(100 + i)) for i in range(2)]

    def config(i):
        j = 1 - i
        return load_peer(None, [
            f'name="peer{i}"', "num_peers=2", 'scheme="validation"', f"identity_seed={100 + i}",
            f'listen=["{loopback_addr(ports[i])}"]', f'state_dir="{tmp_path / f"peer{i}"}"',
            "training.rounds=3", "training.local_steps=2", "data.train_blocks=16", "data.val_blocks=4",
            "data.test_blocks=4",
            f'neighbours=[{{name="peer{j}", peer_id="{ids[j]}", addrs=["{loopback_addr(ports[j])}"]}}]'])

    events, completions = [], []

    async def app():
        with trio.fail_after(120):
            return await run_both()

    async def run_both():
        async with Peer(config(0)) as peer, Peer(config(1)) as other:
            assert peer.peer_id == ids[0]
            async with trio.open_nursery() as nursery:
                async def watch():
                    async with peer.subscribe() as channel:
                        async for event in channel:
                            events.append(event)

                async def own_work():  # the app keeps doing its own thing while the peer trains
                    while True:
                        completions.append(await peer.generate("Hello, how", max_new_tokens=5))
                        await trio.sleep(0.05)

                nursery.start_soon(watch)
                nursery.start_soon(own_work)
                result = await peer.finished()
                await other.finished()
                nursery.cancel_scope.cancel()
        return result

    result = trio.run(app)
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    kinds = [type(e) for e in events]
    finished = [e.record.round for e in events if isinstance(e, RoundFinished)]
    assert finished[-3:] == [1, 2, 3] and UpdateReceived in kinds and TrustChanged in kinds
    assert {e.sender for e in events if isinstance(e, UpdateReceived)} == {"peer1"}
    assert len(completions) >= 2 and all(isinstance(c, str) and len(c) > 0 for c in completions)


def _with_nan(payload: bytes) -> bytes:
    """A well-formed message whose first tensor holds a NaN: the encoder refuses to make one, a hostile peer would."""
    import msgpack
    import numpy as np

    message = msgpack.unpackb(payload, raw=False)
    entry = next(iter(message["tensors"].values()))
    values = np.frombuffer(entry["data"], dtype=np.float32).copy()
    values[0] = np.nan
    entry["data"] = values.tobytes()
    return msgpack.packb(message, use_bin_type=True)


def test_a_networked_peer_drops_bad_frames_from_a_raw_libp2p_client_and_keeps_running(tmp_path, caplog):
    import logging

    import torch

    from p2pfed.net import wire
    from p2pfed.net.identity import identity_from_seed, peer_id_of
    from p2pfed.net.libp2p_endpoint import open_libp2p_endpoint

    ports = free_ports(2)
    raw_key = identity_from_seed(301)
    peer_key_seed = 300
    peer_id = peer_id_of(identity_from_seed(peer_key_seed))
    config = load_peer(None, [
        'name="peer0"', "num_peers=2", 'scheme="fedavg"', 'trust.fedavg_weights="metropolis_hastings"',
        f"identity_seed={peer_key_seed}",
        f'listen=["{loopback_addr(ports[0])}"]', "training.rounds=1", "training.local_steps=1",
        "network.round_timeout_s=30", "data.train_blocks=16", "data.val_blocks=4", "data.test_blocks=4",
        f'neighbours=[{{name="peer1", peer_id="{peer_id_of(raw_key)}", addrs=["{loopback_addr(ports[1])}"]}}]'])

    async def app():
        with trio.fail_after(60):
            async with open_libp2p_endpoint(raw_key, loopback_addr(ports[1]),
                                            {peer_id: [loopback_addr(ports[0])]}) as raw:
                async with Peer(config) as peer:
                    # An honest-sized update: a small step from the swarm's shared init.
                    good = {n: t + 1e-3 for n, t in peer.prepared.initial_adapter.items()}
                    name = next(iter(good))

                    def encode(tensors, **metadata):
                        return wire.encode_update(wire.UpdateMessage(sender="peer1", round=1, tensors=tensors,
                                                                     **metadata))

                    # Each of these once killed a peer, or was let through: garbage, truncated, wrong shape,
                    # NaN, a list nested 1,000 deep, finite extremes (3e38), a claim of 2**63 samples.
                    for bad in (b"\x00garbage", encode(good)[:-7], encode({**good, name: torch.zeros(3, 3)}),
                                _with_nan(encode(good)), b"\x91" * 1000 + b"\xc0",
                                encode({n: torch.full_like(t, 3e38) for n, t in good.items()}),
                                encode(good, num_samples=2**63)):
                        await raw.send(peer_id, bad)
                    await raw.send(peer_id, encode(good, degree=0))  # a lie Metropolis-Hastings must survive
                    return await peer.finished()

    with caplog.at_level(logging.WARNING, logger="p2pfed"):
        result = trio.run(app)
    assert result.rounds[1].trust == {"peer0": 0.5, "peer1": 0.5}  # the good update, after seven bad ones
    text = caplog.text
    assert text.count("dropped a bad update from peer1") == 7
    assert "non-finite" in text and "shape" in text and "nests" in text and "max_abs_value" in text
    assert "num_samples" in text


def test_leaving_the_block_at_once_stops_the_peer_cleanly(tmp_path):
    config = load_peer(None, ['name="peer0"', "num_peers=1", 'scheme="local"', "identity_seed=7",
                              "data.train_blocks=8", "data.val_blocks=2", "data.test_blocks=2"])

    async def app():
        with trio.fail_after(60):
            async with Peer(config) as peer:
                pass
        return peer

    peer = trio.run(app)
    assert peer.prepared is not None

    async def too_early():
        async with Peer(config).personalized_model():
            pass

    with pytest.raises(RuntimeError, match="has not started"):
        trio.run(too_early)
