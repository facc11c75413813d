"""One in-process job spread over worker processes (job_workers): the same records as one process."""

import dataclasses

import pytest

from p2pfed.checkpoint import CheckpointError
from p2pfed.swarm import run_job
from p2pfed.swarm_workers import _context, forkserver_is_private, split
from tests.conftest import small_config


def records(job):
    return {name: peer.to_json() for name, peer in job.peers.items()}


def spread(config, workers):
    return dataclasses.replace(config, job_workers=workers)


def test_peers_split_into_contiguous_nearly_equal_blocks():
    assert split(5, 2) == [range(0, 2), range(2, 5)]
    assert split(3, 8) == [range(0, 1), range(1, 2), range(2, 3)]
    assert [i for block in split(64, 3) for i in block] == list(range(64))


@pytest.mark.parametrize("faults", [
    ("network.drop_prob=0.4",),
    ("network.delay_prob=0.5", "network.delay_s=3", "network.churn_prob=0.25"),
])
def test_two_worker_processes_give_the_records_of_one(workspace, faults):
    config = small_config("training.rounds=3", "training.local_steps=2", *faults)
    one = run_job(config, workspace, "validation", seed=3)
    heard = []
    two = run_job(spread(config, 2), workspace, "validation", seed=3,
                  on_round=lambda peer, record: heard.append((peer, record.round)),
                  on_update=lambda peer, update: heard.append((peer, update.sender)))
    assert records(two) == records(one)
    # Drops, delays and churn happened, and every round of every peer was reported to the caller.
    assert any(r.missing or not r.online for p in one.peers.values() for r in p.rounds)
    assert sorted(x for x in heard if isinstance(x[1], int)) == sorted(
        (name, r.round) for name, p in one.peers.items() for r in p.rounds)
    assert any(isinstance(x[1], str) for x in heard)


def test_more_workers_than_peers_and_a_graph_per_round(workspace):
    config = small_config("training.rounds=3", "training.local_steps=2",
                          'topology={generator="random_regular", params={d=2, resample_every=1}}')
    assert records(run_job(spread(config, 6), workspace, "fedavg", seed=1)) == records(
        run_job(config, workspace, "fedavg", seed=1))


def test_an_error_in_a_worker_is_raised_as_itself(workspace, tmp_path):
    config = spread(small_config("training.rounds=1", "training.local_steps=1"), 2)
    run_job(config, workspace, "fedavg", seed=0, state_root=tmp_path)
    with pytest.raises(CheckpointError, match="holds the checkpoint of"):
        run_job(config, workspace, "validation", seed=0, state_root=tmp_path)


def test_the_fork_server_listens_only_where_this_user_can_connect(monkeypatch):
    # It unpickles what a client sends: a socket in Linux's abstract namespace (Python < 3.11.1) would let any
    # local user run code as this one. Its directory is this user's alone, so spawn is used only elsewhere.
    import multiprocessing.connection
    import os
    import stat

    address = multiprocessing.connection.arbitrary_address("AF_UNIX")
    assert forkserver_is_private() and stat.S_IMODE(os.stat(os.path.dirname(address)).st_mode) == 0o700
    monkeypatch.setattr(multiprocessing.connection, "arbitrary_address", lambda family: "\0listener-abstract")
    assert not forkserver_is_private() and _context().get_start_method() == "spawn"
