"""A peer embedded in a plain Python app (p2pfed.start_peer): from sync code, from asyncio, behind FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import p2pfed
from p2pfed.checkpoint import load_checkpoint
from p2pfed.launch import free_ports, loopback_addr, write_peer_toml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPT = "Hello, how"
SMALL = ["num_peers=2", 'scheme="validation"', "training.local_steps=2", "data.train_blocks=16",
         "data.val_blocks=4", "data.test_blocks=4"]


def pair(tmp_path: Path, rounds: int, *overrides: str) -> list:
    """The app's peer0 and its neighbour peer1, on loopback, each with its own state folder."""
    from p2pfed.net.identity import identity_from_seed, peer_id_of

    ports = free_ports(2)
    ids = [peer_id_of(identity_from_seed(500 + i)) for i in range(2)]
    return [p2pfed.load_peer(None, [
        *SMALL, f"training.rounds={rounds}", f'name="peer{i}"', f"identity_seed={500 + i}",
        f'listen=["{loopback_addr(ports[i])}"]', f'state_dir="{tmp_path / f"peer{i}"}"', *overrides,
        f'neighbours=[{{name="peer{1 - i}", peer_id="{ids[1 - i]}", addrs=["{loopback_addr(ports[1 - i])}"]}}]',
    ]) for i in range(2)]


@contextlib.contextmanager
def neighbour_process(config, tmp_path: Path):
    """peer1 as its own `p2pfed peer` process, as on another machine; terminated (checkpointed) if still running."""
    path = tmp_path / f"{config.name}.toml"
    write_peer_toml(config, path)
    log = open(tmp_path / f"{config.name}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "p2pfed", "peer", str(path), "--quiet"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def port_of(config) -> int:
    return int(config.listen[0].rsplit("/", 1)[1])


def nobody_listens_on(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger in TIME_WAIT
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def round_of(record) -> int:
    return -1 if record is None else record.round


@pytest.mark.slow
def test_sync_code_generates_while_the_peer_trains_with_a_neighbour_process_and_stops_it_cleanly(tmp_path):
    rounds = 3
    app_peer, neighbour = pair(tmp_path, rounds)
    answers = []  # (the last round finished when the answer came, the answer)
    with neighbour_process(neighbour, tmp_path):
        with p2pfed.start_peer(app_peer) as peer:
            events = peer.events()
            deadline = time.monotonic() + 180
            while not peer.done and time.monotonic() < deadline:
                answers.append((round_of(peer.latest_round), peer.generate(PROMPT, max_new_tokens=5, timeout=60)))
                time.sleep(0.05)
            result = peer.wait(timeout=1)
            received = list(events)  # the stream ends with the rounds
            trust = peer.trust
    assert not peer.thread.is_alive()
    assert [r.round for r in result.rounds] == list(range(rounds + 1))
    # Answers came while the rounds went on, not only before or after them (round 0 is the evaluation before
    # training, so training was under way; -1: not even that yet).
    assert any(0 <= r < rounds for r, _ in answers), answers
    assert all(isinstance(text, str) and text for _, text in answers)
    finished = [e.record.round for e in received if isinstance(e, p2pfed.RoundFinished)]
    assert finished[-rounds:] == list(range(1, rounds + 1))
    assert {e.sender for e in received if isinstance(e, p2pfed.UpdateReceived)} == {"peer1"}
    assert trust == result.final_trust and any("peer1" in r.trust for r in result.rounds)
    assert load_checkpoint(app_peer.state_dir).round == rounds
    assert nobody_listens_on(port_of(app_peer))  # the host is closed


@pytest.mark.slow
def test_asyncio_code_generates_without_blocking_its_loop_and_stops_the_peer_mid_training(tmp_path):
    rounds, stop_after = 4, 3
    app_peer, neighbour = pair(tmp_path, rounds)
    answers, events, gaps = [], [], []

    async def heartbeat():  # the app's loop must keep turning while the peer loads, trains and generates
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - before)

    async def complete(peer):
        while True:
            answers.append((round_of(peer.latest_round), await peer.agenerate(PROMPT, max_new_tokens=5)))
            await asyncio.sleep(0.05)

    async def app():
        beat = asyncio.create_task(heartbeat())
        async with p2pfed.start_peer(app_peer) as peer:
            completer = asyncio.create_task(complete(peer))
            with peer.events() as stream:
                async for event in stream:
                    events.append(event)
                    if isinstance(event, p2pfed.RoundFinished) and event.record.round == stop_after:
                        break
            completer.cancel()  # a call cancelled on the asyncio side is cancelled on the peer's side too
            with contextlib.suppress(asyncio.CancelledError):
                await completer
            answers.append((-2, await peer.agenerate(PROMPT, max_new_tokens=3)))  # the peer still serves
        beat.cancel()
        return peer

    with neighbour_process(neighbour, tmp_path):
        peer = asyncio.run(asyncio.wait_for(app(), 180))
    assert not peer.thread.is_alive()
    # Answers came while the rounds went on (round 0 is the evaluation before training; -1: not even that yet).
    assert any(0 <= r < stop_after for r, _ in answers), answers
    assert max(gaps) < 1.0, f"the asyncio loop stalled for {max(gaps):.2f} s"
    assert [e.record.round for e in events if isinstance(e, p2pfed.RoundFinished)][-3:] == [1, 2, 3]
    assert any(isinstance(e, p2pfed.UpdateReceived) for e in events)
    # Stopped mid-training: the last finished round was checkpointed, and the rounds report the stop.
    assert stop_after <= load_checkpoint(app_peer.state_dir).round < rounds
    assert nobody_listens_on(port_of(app_peer))
    with pytest.raises(p2pfed.PeerStopped):
        peer.wait(timeout=0)


def test_a_bad_config_raises_from_start_peer(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        p2pfed.start_peer(None, ['name="peer0"', "checkpoint_every=0"])
    bad = tmp_path / "peer.toml"
    bad.write_text('name = "peer0"\nnot_a_key = 1\n')
    with pytest.raises(ValueError, match="not_a_key"):
        p2pfed.start_peer(bad)


def one_peer(tmp_path: Path, *overrides: str):
    return p2pfed.load_peer(None, ['name="peer0"', "num_peers=1", 'scheme="local"', "identity_seed=7",
                                   "training.rounds=1", "training.local_steps=1", "data.train_blocks=8",
                                   "data.val_blocks=2", "data.test_blocks=2", f'state_dir="{tmp_path}"', *overrides])


def test_the_model_is_lent_for_a_short_read_and_a_call_that_times_out_is_called_off(tmp_path):
    import torch

    with p2pfed.start_peer(one_peer(tmp_path)) as peer:
        result = peer.wait(timeout=60)
        assert list(peer.events()) == []  # a stream opened after the rounds ends at once
        with peer.personalized_model(timeout=30) as model:
            assert isinstance(model, torch.nn.Module) and not torch.is_grad_enabled()
            with pytest.raises(TimeoutError):  # the model is lent out: generation waits for it
                peer.generate(PROMPT, max_new_tokens=2, timeout=0.5)
        # The timed-out call gave up its turn on the peer's side: the model is free again.
        assert peer.generate(PROMPT, max_new_tokens=2, timeout=30)
    assert peer.latest_round == result.rounds[-1] and not peer.thread.is_alive()


def torch_threads_of_a_new_thread() -> int:
    """What the app's next thread gets: torch's per-process count (a thread's own setting is thread-local)."""
    import threading

    import torch

    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_an_embedded_peer_leaves_the_apps_torch_threads_alone_unless_asked(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # the app's own choice
        with p2pfed.start_peer(one_peer(tmp_path / "default")) as peer:
            peer.wait(timeout=60)
        assert torch_threads_of_a_new_thread() == 3
        with p2pfed.start_peer(one_peer(tmp_path / "asked", "threads=2")) as peer:
            peer.wait(timeout=60)
        assert torch_threads_of_a_new_thread() == 2
    finally:
        torch.set_num_threads(before)


def test_a_peer_that_cannot_start_raises_from_enter_in_sync_and_asyncio_code(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = one_peer(tmp_path, f'listen=["{loopback_addr(taken.getsockname()[1])}"]')
        peer = p2pfed.start_peer(config)
        with pytest.raises(Exception) as raised:
            with peer:
                pass
        peer.thread.join(10)
        assert not peer.thread.is_alive()
        with pytest.raises(type(raised.value)):  # later calls raise it too, instead of hanging
            peer.generate(PROMPT, timeout=10)

        async def app():
            async with p2pfed.start_peer(config):
                pass

        with pytest.raises(type(raised.value)):
            asyncio.run(app())


def test_a_peer_that_fails_later_raises_from_wait_and_from_stop(tmp_path):
    with p2pfed.start_peer(one_peer(tmp_path, "seed=0")) as first:
        first.wait(timeout=60)  # leaves a checkpoint of seed 0 in the state folder
    # The same state folder for another seed: the rounds fail on the checkpoint, after the start succeeded.
    with pytest.raises(ValueError, match="holds the checkpoint of"):
        with p2pfed.start_peer(one_peer(tmp_path, "seed=1")) as peer:
            assert peer.generate(PROMPT, max_new_tokens=2, timeout=60)
            peer.wait(timeout=60)
    peer = p2pfed.start_peer(one_peer(tmp_path, "seed=1"))
    with pytest.raises(ValueError, match="holds the checkpoint of"):
        with peer:
            deadline = time.monotonic() + 60
            while not peer.done and time.monotonic() < deadline:
                time.sleep(0.05)
    assert not peer.thread.is_alive()


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_fastapi_example_answers_a_request_during_training(tmp_path):
    from fastapi.testclient import TestClient

    example = load_example("embed_fastapi")
    rounds = 4
    app = example.service(state_dir=tmp_path, overrides=[*SMALL[2:], f"training.rounds={rounds}"])
    during = []
    with TestClient(app) as client:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            answer = client.post("/complete", json={"prompt": PROMPT, "max_new_tokens": 5})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            if body["training"] and body["round"] >= 1:
                during.append(body)
            if body["round"] == rounds:
                break
            time.sleep(0.05)
        status = client.get("/status").json()
    assert during and all(0 < b["round"] < rounds + 1 and b["completion"] for b in during), during
    assert during[0]["round"] < rounds
    assert status["round"] == rounds and "peer0" in status["trust"]


@pytest.mark.slow
def test_the_sync_example_runs_from_another_working_directory(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "embed_sync.py"), "--set", "training.rounds=2",
                           *[arg for o in SMALL[2:] for arg in ("--set", o)]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "round 2" in done.stdout and "done:" in done.stdout
