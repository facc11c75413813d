"""A p2pfed peer inside a plain Python script or notebook: no trio, no asyncio, no event loop of your own.

The script's peer (peer0, English text) trains with a neighbour, peer1, which runs as a separate
`p2pfed peer` process, as it would on another machine. The rounds run in a background thread; the script
prints each finished round and completes a prompt with the peer's current personalized model meanwhile.

    .venv/bin/python examples/embed_sync.py                            # about a minute on a 2-core CPU
    .venv/bin/python examples/embed_sync.py --set training.rounds=3    # any peer key, as `p2pfed peer --set`

Runs from any working directory: its files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import p2pfed
from p2pfed.launch import free_ports, loopback_addr, write_peer_toml
from p2pfed.net.identity import identity_from_seed, peer_id_of

PROMPT = "Hello, how are"
# A swarm of two English peers: the script's peer0 and its neighbour peer1.
SWARM = ["num_peers=2", 'scheme="validation"', 'data.groups=["english"]', "training.rounds=6",
         "training.local_steps=10"]


def peer_configs(state: Path, overrides: list[str]) -> list[p2pfed.PeerConfig]:
    """peer0 and peer1 on loopback, each listing the other as its neighbour."""
    ports = free_ports(2)
    ids = [peer_id_of(identity_from_seed(1000 + i)) for i in range(2)]
    return [p2pfed.load_peer(None, [
        *SWARM, *overrides, f'name="peer{i}"', f"identity_seed={1000 + i}", f'state_dir="{state / f"peer{i}"}"',
        f'listen=["{loopback_addr(ports[i])}"]',
        f'neighbours=[{{name="peer{1 - i}", peer_id="{ids[1 - i]}", addrs=["{loopback_addr(ports[1 - i])}"]}}]',
    ]) for i in range(2)]


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder)
        app_peer, neighbour = peer_configs(state, overrides)
        write_peer_toml(neighbour, state / "peer1.toml")
        process = subprocess.Popen([sys.executable, "-m", "p2pfed", "peer", str(state / "peer1.toml"), "--quiet"])
        try:
            with p2pfed.start_peer(app_peer) as peer:  # loads the model and opens the host in the background
                print(f"{peer.name} ({peer.peer_id}) trains with peer1 in a background thread")
                for event in peer.events():  # blocking; ends after the last round
                    if isinstance(event, p2pfed.RoundFinished):
                        show(event.record, peer.generate(PROMPT, max_new_tokens=20))
                result = peer.wait()
                print(f"done: test perplexity {result.rounds[0].test_ppl:.2f} -> {result.final_test_ppl:.2f}")
        finally:  # leaving the block stopped the peer: checkpointed, host closed, thread joined
            process.wait(timeout=120)


def show(record, completion: str) -> None:
    ppl = f"{record.test_ppl:.2f}" if record.test_ppl is not None else "-"
    trust = ", ".join(f"{name} {weight:.2f}" for name, weight in sorted(record.trust.items())) or "-"
    print(f"round {record.round}: test perplexity {ppl}, trust {trust}")
    print(f"  {PROMPT!r} -> {completion!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    main(parser.parse_args().overrides)
