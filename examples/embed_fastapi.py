"""A FastAPI service that answers with a p2pfed peer's personalized model while the peer trains.

`POST /complete {"prompt": ...}` completes the prompt with the peer's current personalized model; `GET /status`
shows the last finished round and the trust row. The peer (peer0, English text) trains and gossips in a
background thread with a neighbour, peer1, which the service starts as a separate `p2pfed peer` process (as it
would run on another machine) and stops on shutdown. Nothing in a request blocks the service's event loop.

    .venv/bin/pip install -e ".[web]" uvicorn
    .venv/bin/python examples/embed_fastapi.py      # serves http://127.0.0.1:8000 (docs at /docs)
    curl -s 127.0.0.1:8000/complete -H 'content-type: application/json' -d '{"prompt": "Hello, how are"}'

Without uvicorn, the same command asks the service in-process (FastAPI's TestClient) while the peer trains.
Runs from any working directory: its files go to a temporary folder (or `state_dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, Field

import p2pfed
from p2pfed.launch import free_ports, loopback_addr, write_peer_toml
from p2pfed.net.identity import identity_from_seed, peer_id_of

PROMPT = "Hello, how are"
# A swarm of two English peers: the service's peer0 and its neighbour peer1.
SWARM = ["num_peers=2", 'scheme="validation"', 'data.groups=["english"]', "training.rounds=8",
         "training.local_steps=10"]


class CompletionRequest(BaseModel):
    prompt: str
    max_new_tokens: int = Field(default=20, ge=1, le=256)


class Completion(BaseModel):
    completion: str
    round: int  # the last round the peer had finished when it answered (0: none yet)
    training: bool  # whether the peer's rounds were still going on


class Status(BaseModel):
    peer: str
    round: int
    training: bool
    trust: dict[str, float]


def service(state_dir: Path | None = None, overrides: Sequence[str] = ()) -> FastAPI:
    """The app. Its lifespan starts the neighbour process and the embedded peer, and stops both."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with contextlib.ExitStack() as stack:
            state = state_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            app_peer, neighbour = peer_configs(state, overrides)
            stack.enter_context(neighbour_process(neighbour, state))
            async with p2pfed.start_peer(app_peer) as peer:  # starting and stopping do not block the loop
                app.state.peer = peer
                yield

    app = FastAPI(title="p2pfed peer", lifespan=lifespan)

    @app.post("/complete")
    async def complete(request: CompletionRequest) -> Completion:
        peer = app.state.peer
        text = await peer.agenerate(request.prompt, max_new_tokens=request.max_new_tokens)
        return Completion(completion=text, round=last_round(peer), training=not peer.done)

    @app.get("/status")
    async def status() -> Status:
        peer = app.state.peer
        return Status(peer=peer.name, round=last_round(peer), training=not peer.done, trust=peer.trust)

    return app


def last_round(peer: p2pfed.BackgroundPeer) -> int:
    return peer.latest_round.round if peer.latest_round is not None else 0


def peer_configs(state: Path, overrides: Sequence[str]) -> list[p2pfed.PeerConfig]:
    """peer0 and peer1 on loopback, each listing the other as its neighbour."""
    ports = free_ports(2)
    ids = [peer_id_of(identity_from_seed(2000 + i)) for i in range(2)]
    return [p2pfed.load_peer(None, [
        *SWARM, *overrides, f'name="peer{i}"', f"identity_seed={2000 + i}", f'state_dir="{state / f"peer{i}"}"',
        f'listen=["{loopback_addr(ports[i])}"]',
        f'neighbours=[{{name="peer{1 - i}", peer_id="{ids[1 - i]}", addrs=["{loopback_addr(ports[1 - i])}"]}}]',
    ]) for i in range(2)]


@contextlib.contextmanager
def neighbour_process(config: p2pfed.PeerConfig, state: Path) -> Iterator[subprocess.Popen]:
    """The neighbour as its own `p2pfed peer` process; stopped (SIGTERM: it checkpoints) if still running."""
    path = state / f"{config.name}.toml"
    write_peer_toml(config, path)
    process = subprocess.Popen([sys.executable, "-m", "p2pfed", "peer", str(path), "--quiet"])
    try:
        yield process
    finally:
        try:
            process.wait(timeout=5)  # after its last round it closes its host and exits by itself
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=60)


def ask_in_process(overrides: Sequence[str]) -> None:
    """Without a server: ask the service through FastAPI's TestClient, once a second, until training ends."""
    from fastapi.testclient import TestClient

    with TestClient(service(overrides=overrides)) as client:
        while True:
            answer = client.post("/complete", json={"prompt": PROMPT}).json()
            state = "training" if answer["training"] else "trained"
            print(f"after round {answer['round']} ({state}): {PROMPT!r} -> {answer['completion']!r}", flush=True)
            if not answer["training"]:
                break
            time.sleep(1.0)
        print(client.get("/status").json())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    try:
        import uvicorn
    except ImportError:
        ask_in_process(args.overrides)
    else:
        uvicorn.run(service(overrides=args.overrides), host="127.0.0.1", port=args.port)
