"""Experiments from a script: p2pfed.Swarm on a graph of its own (static or per round), with texts of its own,
blocking or as an async context manager streaming the embedded Peer's events; its typed result is results.json."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import networkx as nx
import pytest
import trio

from p2pfed import RoundFinished, Swarm, SwarmResult, TrustChanged, UpdateReceived
from p2pfed.config import ConfigError, TopologyConfig, peer_name
from p2pfed.data import builtin_corpus_dir
from p2pfed.experiment import RunStopped

# 4 peers, 2 language groups, a few short rounds: seconds per job.
SMALL = {"num_peers": 4, "seeds": [0], "training": {"rounds": 3, "local_steps": 2},
         "data": {"groups": ["english", "italian"], "train_blocks": 8, "val_blocks": 4, "test_blocks": 4}}
ANY_PEERS = {key: value for key, value in SMALL.items() if key != "num_peers"}  # num_peers from the texts


def neighbourhood(graph: nx.Graph, peer: str) -> set[str]:
    node = int(peer.removeprefix("peer"))
    return {peer, *(peer_name(j) for j in graph.neighbors(node))}


def test_a_swarm_from_python_on_a_cycle_graph_keeps_to_its_neighbours_every_round(tmp_path):
    ring = nx.cycle_graph(4)
    events = []
    swarm = Swarm(None, topology=ring, schemes=["fedavg"], **SMALL)
    assert swarm.config.num_peers == 4 and repr(swarm).startswith("Swarm(")
    result = swarm.run(out=tmp_path / "run", on_event=events.append, log=lambda *_: None)

    rounds = [e for e in events if isinstance(e.event, RoundFinished)]
    assert len(rounds) == 4 * (3 + 1)  # every peer, round 0 and 3 rounds
    for e in rounds:
        record = e.event.record
        if record.round > 0:
            assert set(record.trust) == neighbourhood(ring, e.peer)  # itself and its two ring neighbours
            assert set(record.neighbours) == neighbourhood(ring, e.peer) - {e.peer}
    updates = [e for e in events if isinstance(e.event, UpdateReceived)]
    assert len(updates) == 4 * 2 * 3 and all(e.event.sender in neighbourhood(ring, e.peer) for e in updates)
    assert any(isinstance(e.event, TrustChanged) for e in events)
    assert {(e.scheme, e.seed) for e in events} == {("fedavg", 0)}

    # The typed result holds what results.json holds, nothing more or less.
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result.to_json() == written and SwarmResult.load(tmp_path / "run").to_json() == written
    assert result.run_dir == tmp_path / "run" and result.best == "fedavg"
    assert sorted(map(tuple, result.edges)) == [("peer0", "peer1"), ("peer0", "peer3"), ("peer1", "peer2"),
                                                ("peer2", "peer3")]
    assert result.schemes["fedavg"].trust["peer0"].keys() == {"peer0", "peer1", "peer3"}


def alternating(round_index: int) -> nx.Graph:
    """A ring in odd rounds, the other perfect matching plus a chord in even ones (module level: picklable)."""
    return nx.cycle_graph(4) if round_index % 2 else nx.Graph([(0, 2), (1, 3), (0, 1)])


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_graph_per_round_gives_each_peer_that_rounds_neighbours(workers):
    events = []
    Swarm(None, topology=alternating, schemes=["fedavg"], workers=workers, **{**SMALL, "seeds": [0, 1]}).run(
        on_event=events.append, log=lambda *_: None)
    finished = [e for e in events if isinstance(e.event, RoundFinished) and e.event.record.round > 0]
    assert len(finished) == 2 * 4 * 3
    for e in finished:
        record = e.event.record
        expected = neighbourhood(alternating(record.round), e.peer)
        assert set(record.neighbours) == expected - {e.peer}
        assert set(record.trust) == expected, (e.peer, record.round)


def test_a_lambda_graph_with_workers_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="picklable"):
        Swarm(None, topology=lambda r: nx.cycle_graph(4), workers=2, **SMALL).run(log=lambda *_: None)
    with pytest.raises(ConfigError, match="nodes must be 0..3"):
        Swarm(None, topology=lambda r: nx.cycle_graph(5), **SMALL).run(log=lambda *_: None)


def test_keyword_overrides_and_topology_specs_build_the_config():
    swarm = Swarm("examples/default.toml", topology="ring", **{"training.rounds": 2}, schemes=["local"],
                  trust={"temperature": {"validation": 0.1}})
    config = swarm.config
    assert config.topology.generator == "ring" and config.training.rounds == 2 and config.schemes == ("local",)
    assert config.trust.temperature.validation == 0.1 and config.trust.temperature.weights == 0.1
    assert config.num_peers == 8 and config.training.local_steps == 10  # the file's other values stay
    assert Swarm(None, topology=TopologyConfig(generator="star")).config.topology.generator == "star"
    named = Swarm(None, topology=nx.relabel_nodes(nx.path_graph(3), {i: peer_name(i) for i in range(3)}))
    assert named.config.num_peers == 3 and sorted(named.graph.edges) == [(0, 1), (1, 2)]
    with pytest.raises(ConfigError, match="training.rounds"):
        Swarm(None, training={"rounds": 0})


def test_texts_of_your_own_from_folders_files_and_strings(tmp_path):
    english = (builtin_corpus_dir() / "english.txt").read_text(encoding="utf-8")
    italian = (builtin_corpus_dir() / "italian.txt").read_text(encoding="utf-8")
    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "a.txt").write_text(english[:2000], encoding="utf-8")
    (tmp_path / "news" / "b.txt").write_text(english[2000:4000], encoding="utf-8")
    (tmp_path / "chat.txt").write_text(italian[:4000], encoding="utf-8")
    texts = [tmp_path / "news", ("news", english[5000:9000]), tmp_path / "chat.txt", ("chat", italian[5000:9000])]
    result = Swarm(None, texts=texts, schemes=["oracle"], **ANY_PEERS).run(log=lambda *_: None)
    assert result.config.num_peers == 4
    assert result.groups == {"peer0": "news", "peer1": "news", "peer2": "chat", "peer3": "chat"}
    assert result.schemes["oracle"].trust["peer0"] == {"peer0": 0.5, "peer1": 0.5, "peer2": 0.0, "peer3": 0.0}
    assert result.schemes["oracle"].same_group_trust == 1.0

    with pytest.raises(ConfigError, match="holds no .txt files"):
        (tmp_path / "empty").mkdir()
        Swarm(None, texts=[tmp_path / "empty", "x" * 2000], num_peers=2, schemes=["local"]).run(log=lambda *_: None)
    with pytest.raises(ConfigError, match="peer1's text makes 1 blocks"):
        Swarm(None, texts=[english[:4000], "y" * 200], schemes=["local"], **ANY_PEERS).run(log=lambda *_: None)


async def _stream(swarm: Swarm):
    async with swarm as run:
        events = [event async for event in run.events()]
        result = await run.result()
    return events, result


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_async_with_streams_the_peers_events_and_returns_the_result(library):
    swarm = Swarm(None, schemes=["local", "fedavg"], **SMALL)
    events, result = asyncio.run(_stream(swarm)) if library == "asyncio" else trio.run(_stream, swarm)
    for scheme in ("local", "fedavg"):
        finished = [e for e in events if e.scheme == scheme and isinstance(e.event, RoundFinished)]
        assert len(finished) == 4 * 4 and {e.peer for e in finished} == {f"peer{i}" for i in range(4)}
    assert not any(isinstance(e.event, UpdateReceived) for e in events if e.scheme == "local")
    assert set(result.schemes) == {"local", "fedavg"} and result.run_dir is None


def test_a_blocking_handle_and_leaving_the_block_early_stops_the_run():
    swarm = Swarm(None, schemes=["local", "fedavg"], **{**SMALL, "training": {"rounds": 20, "local_steps": 2}})
    with swarm.start(log=lambda *_: None) as run:
        first = next(iter(run.events()))
    assert run.done and first.scheme == "local"
    with pytest.raises(RunStopped):
        run.wait()
    assert sum(1 for _ in run.events()) < 2 * 4 * 21  # it stopped long before the last round
