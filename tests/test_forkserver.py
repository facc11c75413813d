"""Light peer processes: a workspace loaded before a fork serves the children; the fork server's protocol."""

from __future__ import annotations

import dataclasses

import trio

from p2pfed.job import job_setup, open_workspace, preloaded
from p2pfed.launch import ForkedPeers, free_ports, peer_configs, write_peer_toml
from tests.conftest import small_config


def test_open_workspace_returns_the_preloaded_one_for_the_same_settings_even_in_a_trio_thread(workspace):
    config = small_config()
    other = dataclasses.replace(config, lora=dataclasses.replace(config.lora, rank=config.lora.rank + 1))

    async def in_trio():
        return await trio.to_thread.run_sync(open_workspace, config, lambda *_: None)

    with preloaded(workspace):
        assert open_workspace(config, log=lambda *_: None) is workspace
        assert trio.run(in_trio) is workspace  # trio passes the context on to its threads
        assert open_workspace(dataclasses.replace(config, num_peers=2), log=lambda *_: None) is workspace
        assert open_workspace(other, log=lambda *_: None) is not workspace  # other LoRA settings: its own
    assert open_workspace(config, log=lambda *_: None) is not workspace


def test_each_peer_of_the_fork_server_reports_its_exit_status_and_writes_its_own_log(workspace, tmp_path):
    config = small_config("num_peers=2", "training.rounds=1")
    graph, _ = job_setup(config, workspace, seed=0)
    files = []
    for peer in peer_configs(config, graph, "fedavg", 0, tmp_path, free_ports(2)):
        path, log = tmp_path / f"{peer.name}.toml", tmp_path / f"{peer.name}.log"
        write_peer_toml(peer, path)
        # A configuration error in every file: each child reports it as `p2pfed peer` does, and exits 2.
        path.write_text(path.read_text(encoding="utf-8").replace("local_steps = 8", "local_steps = -1"))
        files.append((peer.name, path, log))
    with ForkedPeers(files) as running:
        exits = dict(running.exits(limit=120))
        assert set(running.pids) == {"peer0", "peer1"} and len(set(running.pids.values())) == 2
    assert exits == {"peer0": 2, "peer1": 2}
    for name, _, log in files:
        assert "configuration error: training.local_steps" in log.read_text(encoding="utf-8"), name
