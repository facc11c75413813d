"""Shared fixtures: the default tiny base model (pretrained once per machine, then cached) and small configs."""

from __future__ import annotations

import pytest
import torch
import trio
import trio.testing

from p2pfed.load import load_experiment
from p2pfed.job import open_workspace


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # The swarm runs single-threaded; tests do the same so results are comparable and the suite stays quiet.
    torch.set_num_threads(1)


def small_config(*overrides: str):
    """4 peers on a complete graph, two language groups of 2 peers, a short schedule."""
    return load_experiment(None, [
        "num_peers=4", 'data.groups=["english", "italian"]', "data.train_blocks=32", "data.val_blocks=8",
        "data.test_blocks=16", "training.rounds=4", "training.local_steps=8", *overrides,
    ])


@pytest.fixture(scope="session")
def workspace():
    return open_workspace(small_config(), log=lambda *_: None)


def run_peer_fed_by(network, peer, feed):
    """Run `peer` on the in-memory `network` while `await feed()` sends it messages; its PeerResult.

    Runs on a virtual clock, so the peer's round deadline costs no wall time.
    """
    result = {}

    async def main():
        async with network.running(), trio.open_nursery() as nursery:
            async def run_peer():
                result["peer"] = await peer.run()
            nursery.start_soon(run_peer)
            await feed()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result["peer"]


def run_failing_only_in_workers(tmp_path, monkeypatch, args: list[str]) -> int:
    """`p2pfed run ARGS` on a data folder whose English group is empty, with the caller's checks skipped, so
    that the processes running the jobs (workers or Ray tasks) are the first to meet the error; its exit status."""
    import p2pfed.api
    import p2pfed.cli
    import p2pfed.experiment

    monkeypatch.setattr(p2pfed.api, "check_experiment", lambda *args, **kwargs: None)
    monkeypatch.setattr(p2pfed.experiment, "check_experiment", lambda *args, **kwargs: None)
    (tmp_path / "data" / "english").mkdir(parents=True)
    (tmp_path / "data" / "italian.txt").write_text("ciao, come stai? " * 400)
    code = p2pfed.cli.main(["run", "examples/default.toml", *args, "--set", f'data.source="{tmp_path / "data"}"',
                            "--out", str(tmp_path / "run")])
    return code
