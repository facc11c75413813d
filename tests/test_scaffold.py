"""`p2pfed init N --out DIR`: peer files and keys that load, and (slow) run a round together over loopback."""

import argparse
import json
import stat
import subprocess
import sys

import pytest

from p2pfed.config import ConfigError
from p2pfed.load import load_peer
from p2pfed.net.identity import identity_from_file, peer_id_of
from p2pfed.peer import RESULT_FILE
from p2pfed.scaffold import add_init_command, init_swarm, listen_addrs

SMALL = ["data.train_blocks=8", "data.val_blocks=4", "data.test_blocks=4", "training.rounds=1",
         "training.local_steps=2"]


def init(*argv: str) -> int:
    """`p2pfed init ...` through the parser that add_init_command builds (as cli.py registers it)."""
    parser = argparse.ArgumentParser(prog="p2pfed")
    add_init_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["init", *argv])
    return args.handler(args)


def test_init_writes_peer_files_and_keys_that_load(tmp_path, monkeypatch, capsys):
    out = tmp_path / "swarm"
    monkeypatch.chdir(tmp_path)
    assert init("4", "--out", str(out)) == 0
    assert "p2pfed peer" in capsys.readouterr().out
    peers = [load_peer(out / f"peer{k}.toml") for k in range(4)]
    ids = [peer_id_of(identity_from_file(out / f"peer{k}.key")) for k in range(4)]
    addrs = [peer.listen[0] for peer in peers]
    assert len(set(addrs)) == 4 and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in addrs)
    for k, peer in enumerate(peers):
        assert (peer.name, peer.num_peers, peer.scheme) == (f"peer{k}", 4, "spread")
        assert peer.key_file == str(out / f"peer{k}.key") and peer.state_dir == str(out / f"peer{k}")
        assert stat.S_IMODE((out / f"peer{k}.key").stat().st_mode) == 0o600
        # The complete graph: every other peer, with its peer ID and address.
        assert [(n.name, n.peer_id, n.addrs) for n in peer.neighbours] == [
            (f"peer{j}", ids[j], (addrs[j],)) for j in range(4) if j != k]
    with pytest.raises(ConfigError, match="peer0.toml exists"):
        init("4", "--out", str(out))


def test_init_takes_an_experiments_topology_scheme_and_sections(tmp_path):
    experiment = tmp_path / "exp.toml"
    experiment.write_text('schemes = ["fedavg"]\nseeds = [3, 4]\ntopology = "ring"\n[training]\nrounds = 2\n'
                          '[network]\nmembership = [{peer = "peer2", join = 2}]\n')
    paths = init_swarm(4, tmp_path / "out", str(experiment))
    peers = [load_peer(p) for p in paths]
    assert [[n.name for n in p.neighbours] for p in peers] == [["peer1", "peer3"], ["peer0", "peer2"],
                                                                ["peer1", "peer3"], ["peer0", "peer2"]]
    assert all((p.scheme, p.seed, p.training.rounds, p.topology) == ("fedavg", 3, 2, None) for p in peers)
    assert peers[0].network.membership[0].join == 2
    resampled = init_swarm(4, tmp_path / "resampled", None,
                           ['topology={generator="random_regular", params={d=2, resample_every=1}}'])
    peer = load_peer(resampled[0])
    assert peer.topology.params["resample_every"] == 1  # each peer computes its own neighbours per round


def test_init_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="pick the peers' one with --scheme"):
        init_swarm(2, tmp_path / "a", "examples/default.toml")
    with pytest.raises(ConfigError, match="--listen-host: 'here' is not an IP address"):
        init_swarm(2, tmp_path / "b", hosts=["here"])
    with pytest.raises(ConfigError, match="cannot be dialled"):
        init_swarm(2, tmp_path / "c", hosts=["0.0.0.0"])
    # A host of another machine: its ports cannot be checked from here, so they are numbered from 4001.
    assert listen_addrs(["127.0.0.1", "192.0.2.7", "192.0.2.7"])[1:] == ["/ip4/192.0.2.7/tcp/4001",
                                                                          "/ip4/192.0.2.7/tcp/4002"]


@pytest.mark.slow
def test_two_of_four_initialised_peers_run_a_round_together_over_loopback(tmp_path):
    out = tmp_path / "swarm"
    assert init("4", "--out", str(out), "--set", 'topology="ring"', "--set", "network.round_timeout_s=8",
                *[a for s in SMALL for a in ("--set", s)]) == 0
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    # peer0's ring neighbours are peer1 and peer3; only peer1 is started, from another working directory.
    processes = [subprocess.Popen([sys.executable, "-m", "p2pfed", "peer", str(out / f"peer{k}.toml"),
                                   "--set", "startup_timeout_s=2"], cwd=elsewhere,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    # Both finish their rounds; each ends with status 3 because one of its neighbours never started.
    assert [p.returncode for p in processes] == [3, 3], outputs
    assert "peer3" in outputs[0] and "peer2" in outputs[1]
    rounds = [json.loads((out / f"peer{k}" / RESULT_FILE).read_text())["rounds"] for k in (0, 1)]
    assert set(rounds[0][1]["trust"]) == {"peer0", "peer1"} and rounds[0][1]["missing"] == ["peer3"]
    assert set(rounds[1][1]["trust"]) == {"peer0", "peer1"} and rounds[1][1]["missing"] == ["peer2"]
    assert not any(elsewhere.iterdir())  # state and results went where the files are
