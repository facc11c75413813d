"""A trio application that embeds a p2pfed peer and keeps doing its own work while the peer trains.

The app's peer (peer0, English text) learns with a neighbour, peer1, which runs as a separate
`p2pfed peer` process, as it would on another machine. While the peer trains and gossips in the
background, the app completes a prompt with the peer's current personalized model every second and
prints the peer's events (updates received, trust changes, finished rounds).

    .venv/bin/python examples/embed_peer.py            # about a minute on a 2-core CPU
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from p2pfed import Peer, load_peer
from p2pfed.launch import free_ports, loopback_addr, write_peer_toml
from p2pfed.net.identity import identity_from_seed, peer_id_of
from p2pfed import RoundFinished, TrustChanged, UpdateReceived

PROMPT = "Hello, how are"
# A small swarm of two: the app's English peer and an English neighbour (data.groups has one group).
COMMON = ["num_peers=2", 'scheme="validation"', 'data.groups=["english"]', "training.rounds=8",
          "training.local_steps=10"]


def peer_config(index: int, ports: list[int], state: Path):
    other = 1 - index
    return load_peer(None, [
        *COMMON, f'name="peer{index}"', f"identity_seed={1000 + index}", f'state_dir="{state / f"peer{index}"}"',
        f'listen=["{loopback_addr(ports[index])}"]',
        f'neighbours=[{{name="peer{other}", peer_id="{peer_id_of(identity_from_seed(1000 + other))}", '
        f'addrs=["{loopback_addr(ports[other])}"]}}]',
    ])


async def app(state: Path) -> None:
    ports = free_ports(2)
    neighbour_toml = state / "peer1.toml"
    write_peer_toml(peer_config(1, ports, state), neighbour_toml)
    neighbour = subprocess.Popen([sys.executable, "-m", "p2pfed", "peer", str(neighbour_toml), "--quiet"])
    try:
        async with Peer(peer_config(0, ports, state)) as peer:
            print(f"embedded {peer.name} ({peer.peer_id}) on {', '.join(peer.listen_addrs)}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(show_events, peer)
                nursery.start_soon(complete_text, peer)
                result = await peer.finished()
                nursery.cancel_scope.cancel()
            print(f"done: test perplexity {result.rounds[0].test_ppl:.2f} -> {result.final_test_ppl:.2f}")
            print(f"final completion: {PROMPT!r} -> {await peer.generate(PROMPT, max_new_tokens=30)!r}")
    finally:
        neighbour.wait(timeout=120)


async def show_events(peer) -> None:
    async with peer.subscribe() as events:
        async for event in events:
            if isinstance(event, UpdateReceived):
                print(f"  update from {event.sender} for round {event.round}")
            elif isinstance(event, TrustChanged):
                print(f"  trust after round {event.round}: "
                      + ", ".join(f"{n} {w:.2f}" for n, w in sorted(event.weights.items())))
            elif isinstance(event, RoundFinished):
                print(f"round {event.record.round} done, test perplexity {event.record.test_ppl:.2f}")


async def complete_text(peer) -> None:
    """The app's own work, on the same event loop: the peer's training runs in a worker thread meanwhile."""
    while True:
        print(f"  app: {PROMPT!r} -> {await peer.generate(PROMPT, max_new_tokens=20)!r}")
        await trio.sleep(1.0)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        trio.run(app, Path(folder))
