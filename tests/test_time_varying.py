"""Neighbours that change from round to round: resampled graphs, a graph per round from a script, and peers that
join late or leave early (network.membership), in process on a virtual clock."""

import networkx as nx
import pytest
import trio

from p2pfed.config import ConfigError, PeerConfig, TopologyConfig, peer_name
from p2pfed.job import job_setup, peer_specs
from p2pfed.load import load_peer
from p2pfed.records import PeerResult, RoundRecord
from p2pfed.swarm import run_job
from p2pfed.topology import graph_at_round, neighbours, peer_schedule
from tests.conftest import small_config

RESAMPLED = 'topology={generator="random_regular", params={d=2, resample_every=1}}'


def names(graph: nx.Graph, i: int) -> tuple[str, ...]:
    return tuple(peer_name(j) for j in neighbours(graph, i))


def test_on_a_resampled_graph_each_rounds_neighbours_are_graph_at_rounds(workspace):
    config = small_config("training.rounds=3", "training.local_steps=2", RESAMPLED)
    job = run_job(config, workspace, "fedavg", seed=0)
    for i in range(4):
        rounds = job.peers[peer_name(i)].rounds
        assert rounds[0].neighbours == ()
        for record in rounds[1:]:
            expected = names(graph_at_round(config.topology, 4, 0, record.round), i)
            assert record.neighbours == expected and record.missing == ()
            assert set(record.trust) == {peer_name(i), *expected}  # FedAvg over exactly this round's neighbours
    assert any(len({r.neighbours for r in peer.rounds[1:]}) > 1 for peer in job.peers.values()), "nothing changed"
    union = {(u, v) for r in (1, 2, 3) for u, v in graph_at_round(config.topology, 4, 0, r).edges()}
    assert sorted(job.graph_edges) == sorted((peer_name(u), peer_name(v)) for u, v in union)


def test_a_static_graph_keeps_its_neighbours_and_needs_no_schedule(workspace):
    config = small_config("training.rounds=2", "training.local_steps=1", 'topology={generator="ring"}')
    graph, data = job_setup(config, workspace, seed=0)
    assert all(spec.schedule is None for spec in peer_specs(config, graph, data, "fedavg", seed=0))
    job = run_job(config, workspace, "fedavg", seed=0)
    for i in range(4):
        assert [r.neighbours for r in job.peers[peer_name(i)].rounds[1:]] == [names(graph, i)] * 2


def test_a_graph_per_round_from_a_script_is_followed(workspace):
    config = small_config("training.rounds=2", "training.local_steps=1")
    path, star = nx.path_graph(4), nx.star_graph(3)
    job = run_job(config, workspace, "fedavg", seed=0, graph=lambda r: path if r == 1 else star)
    assert [r.neighbours for r in job.peers["peer0"].rounds[1:]] == [("peer1",), ("peer1", "peer2", "peer3")]
    assert [r.neighbours for r in job.peers["peer3"].rounds[1:]] == [("peer2",), ("peer0",)]


def test_a_newcomer_and_a_leaver_nobody_waits_and_the_newcomer_starts_from_the_shared_init(workspace):
    membership = 'network.membership=[{peer="peer3", join=4}, {peer="peer1", leave=5}]'
    config = small_config("training.rounds=6", "training.local_steps=2", membership)
    finished = []
    job = run_job(config, workspace, "fedavg", seed=0,
                  on_round=lambda peer, record: finished.append(trio.current_time()))
    # The virtual clock only moves when every peer waits: nobody waited out a deadline for anyone.
    assert max(finished) < config.network.round_timeout_s
    newcomer, leaver = job.peers["peer3"].rounds, job.peers["peer1"].rounds
    assert [r.online for r in newcomer] == [True, False, False, False, True, True, True]
    assert [r.online for r in leaver] == [True, True, True, True, True, False, False]
    assert all(r.train_loss is None and r.neighbours == () for r in newcomer[1:4] + leaver[5:])
    for name, peer in job.peers.items():
        for record in (r for r in peer.rounds[1:] if r.online):
            assert record.missing == ()
            assert ("peer3" in record.neighbours) == (record.round >= 4 and name != "peer3")
            assert ("peer1" in record.neighbours) == (record.round < 5 and name != "peer1")
    # Its first trained round starts from the shared init with a fresh batch stream: the same steps and
    # training loss as its round 1 in a swarm it was in from the start.
    plain = run_job(small_config("training.rounds=1", "training.local_steps=2"), workspace, "fedavg", seed=0)
    assert newcomer[4].steps == 2 and newcomer[4].train_loss == plain.peers["peer3"].rounds[1].train_loss
    assert set(newcomer[4].trust) == {"peer0", "peer1", "peer2", "peer3"}


def test_a_resampled_swarm_with_a_newcomer_resumes_as_if_never_stopped(workspace, tmp_path):
    keys = ["training.local_steps=2", RESAMPLED, 'network.membership=[{peer="peer3", join=3}, {peer="peer1", leave=4}]']
    whole = run_job(small_config("training.rounds=4", *keys), workspace, "fedavg", seed=0)
    run_job(small_config("training.rounds=2", *keys), workspace, "fedavg", seed=0, state_root=tmp_path)
    resumed = run_job(small_config("training.rounds=4", *keys), workspace, "fedavg", seed=0, state_root=tmp_path)
    assert records(resumed) == records(whole)


def test_round_records_without_neighbours_still_load():
    old = {"round": 1, "steps": 2, "train_loss": 3.0, "test_ppl": 4.0, "trust": {"peer0": 1.0}, "missing": [],
           "bytes_sent": 0, "online": True}
    assert RoundRecord.from_dict(old).neighbours == ()
    result = PeerResult("peer0", [RoundRecord(1, 2, 3.0, 4.0, {}, ("peer1",), 5, neighbours=("peer1", "peer2"))])
    assert PeerResult.from_json(result.to_json()) == result


@pytest.mark.parametrize("assignment, message", [
    ('network.membership=[{peer="peer9", join=2}]', r"network\.membership\[0\]\.peer: 'peer9' is not one of"),
    ('network.membership=[{peer="peer1", join=0}]', r"network\.membership\[0\]\.join: must be at least 1"),
    ('network.membership=[{peer="peer1", join=3, leave=3}]', r"network\.membership\[0\]\.leave: must be after"),
    ('network.membership=[{peer="peer1", join=2}, {peer="peer1", leave=4}]', r"network\.membership: lists a peer"),
])
def test_bad_membership_is_a_configuration_error(assignment, message):
    with pytest.raises(ConfigError, match=message):
        small_config(assignment)


def test_a_networked_peer_computes_its_own_schedule_and_needs_every_neighbour_listed():
    topology = TopologyConfig(generator="random_regular", params={"d": 2, "resample_every": 1})
    every = [{"name": peer_name(j), "peer_id": "x"} for j in (1, 2, 3)]
    config = load_peer(None, ["num_peers=4", "training.rounds=3", f"neighbours={_toml(every)}",
                              'topology={generator="random_regular", params={d=2, resample_every=1}}'])
    schedule = peer_schedule(config)
    assert [schedule.neighbours_at(r) for r in (1, 2, 3)] == [names(graph_at_round(topology, 4, 0, r), 0)
                                                             for r in (1, 2, 3)]
    with pytest.raises(ConfigError, match=r"neighbours: the topology makes peer\d a neighbour of peer0 in round"):
        peer_schedule(PeerConfig(num_peers=4, topology=topology, neighbours=config.neighbours[:1]))
    assert peer_schedule(PeerConfig(num_peers=4, neighbours=config.neighbours)) is None  # static: the list


def _toml(tables: list[dict]) -> str:
    return "[" + ", ".join("{" + ", ".join(f'{k}="{v}"' for k, v in t.items()) + "}" for t in tables) + "]"


def records(job):
    return {name: [(r.round, r.online, r.neighbours, r.steps, r.train_loss, r.test_ppl, r.trust) for r in peer.rounds]
            for name, peer in job.peers.items()}


@pytest.mark.slow
def test_4_libp2p_processes_follow_a_resampled_graph_and_membership_as_in_process(workspace, tmp_path):
    from p2pfed.launch import run_job_libp2p

    config = small_config("training.rounds=3", "training.local_steps=2", "network.round_timeout_s=60", RESAMPLED,
                          'network.membership=[{peer="peer3", join=2}, {peer="peer1", leave=3}]')
    simulated = run_job(config, workspace, "validation", seed=0)
    networked = run_job_libp2p(config, workspace, "validation", seed=0, run_dir=tmp_path)
    assert all(r.missing == () for peer in networked.peers.values() for r in peer.rounds)
    assert records(networked) == records(simulated)
    assert networked.graph_edges == simulated.graph_edges
    peer_file = (tmp_path / "libp2p" / "validation-seed0" / "peer0.toml").read_text()
    assert "resample_every = 1" in peer_file and 'peer = "peer3"' in peer_file


def test_a_graph_per_round_with_other_nodes_is_a_configuration_error(workspace):
    with pytest.raises(ConfigError, match=r"topology: the graph of round 1 must have the nodes 0\.\.3"):
        run_job(small_config("training.rounds=1"), workspace, "fedavg", seed=0, graph=lambda r: nx.cycle_graph(5))
