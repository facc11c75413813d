"""Shared fixtures: the default tiny base model (pretrained once per machine, then cached) and small configs."""

from __future__ import annotations

import pytest
import torch

from p2pfed.config import load_experiment
from p2pfed.swarm import open_workspace


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
