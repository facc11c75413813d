"""Nothing lost: a peer checkpoints to its state folder and a restarted peer resumes where it was."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pfed.checkpoint import CheckpointError, load_checkpoint
from p2pfed.config import NetworkConfig
from p2pfed.strategies import parse_scheme
from p2pfed.data import make_peer_data
from p2pfed.loop import PeerLoop, PeerSpec
from p2pfed.swarm import run_job
from p2pfed.net.memory import InMemoryNetwork
from tests.conftest import small_config


def finals(job):
    return {name: [(r.round, r.test_ppl, r.trust) for r in peer.rounds] for name, peer in job.peers.items()}


@pytest.mark.parametrize("scheme", ["fedavg", "comigs-1g1s"])
def test_a_swarm_stopped_and_restarted_from_its_state_folders_ends_as_if_never_stopped(workspace, tmp_path, scheme):
    config = small_config("training.rounds=4", "training.local_steps=2")
    whole = run_job(config, workspace, scheme, seed=0)
    first_half = run_job(small_config("training.rounds=2", "training.local_steps=2"), workspace, scheme, seed=0,
                         state_root=tmp_path)
    assert load_checkpoint(tmp_path / "peer0").round == 2
    assert [r.round for r in first_half.peers["peer0"].rounds] == [0, 1, 2]
    resumed = run_job(config, workspace, scheme, seed=0, state_root=tmp_path)
    # Same adapters, optimizer moments, batches and trust: bit-identical perplexities, every round kept.
    assert finals(resumed) == finals(whole)


def test_a_peer_stopped_mid_round_keeps_its_last_complete_checkpoint(workspace, tmp_path):
    config = small_config("training.rounds=5", "training.local_steps=1", "network.round_timeout_s=10")
    host = workspace.host
    data = make_peer_data(workspace.tokens, 4, config.data, seed=0)[0]
    spec = PeerSpec(name="peer0", neighbours=("peer1",), scheme=parse_scheme("fedavg"), layout=host.layout(),
                    seed=0, training=config.training, trust=config.trust, network=config.network,
                    state_dir=str(tmp_path), checkpoint_every=2)

    def run_until(stop_at: float):
        network = InMemoryNetwork(NetworkConfig(), seed=0)
        network.endpoint("peer1")  # a neighbour that never sends: every round waits out its 10 s deadline
        peer = PeerLoop(spec, host, data, network.endpoint("peer0"), host.initial_adapter(0))
        result = {}

        async def main():
            async with network.running():
                with trio.move_on_after(stop_at):
                    result["peer"] = await peer.run()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        return result.get("peer")

    assert run_until(35.0) is None  # rounds 1-3 done, stopped while round 4 waits for its neighbour
    assert load_checkpoint(tmp_path).round == 2  # checkpoint_every=2; round 4 was half done, not saved
    finished = run_until(1000.0)
    assert [r.round for r in finished.rounds] == [0, 1, 2, 3, 4, 5]
    assert all(set(r.missing) == {"peer1"} for r in finished.rounds[1:])
    assert load_checkpoint(tmp_path).round == 5


def test_a_state_folder_of_another_peer_is_refused(workspace, tmp_path):
    config = small_config("training.rounds=1", "training.local_steps=1")
    run_job(config, workspace, "local", seed=0, state_root=tmp_path)
    (tmp_path / "peer0").rename(tmp_path / "elsewhere")
    (tmp_path / "peer1").rename(tmp_path / "peer0")
    with pytest.raises(CheckpointError, match="give this peer its own state folder"):
        run_job(config, workspace, "local", seed=0, state_root=tmp_path)
