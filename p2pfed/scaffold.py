"""`p2pfed init N --out DIR [--listen-host HOST] [EXPERIMENT.toml]`: a swarm's peer files, ready to start.

For every peer it writes an identity key file (random, mode 0600; an existing one is kept), picks a port that is
free on its listen host right now, and writes DIR/peerK.toml: the experiment's sections, the peer's share of the
split, and its topology neighbours with their peer IDs and addresses, as the libp2p runtime's files do
(launch.swarm_configs). Each file starts with `p2pfed peer DIR/peerK.toml`, on this machine or another.
Key files and state folders are named relative to DIR (paths in a file are taken from its folder), so DIR can
be copied to other machines whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

from p2pfed.config import ConfigError, ExperimentConfig, PeerConfig, peer_name
from p2pfed.load import load_experiment, load_peer

DEFAULT_HOST = "127.0.0.1"
FIRST_PORT = 4001  # for a host that is not this machine's: its ports cannot be checked from here


def add_init_command(subparsers) -> None:
    """Register `p2pfed init` on the CLI's subparsers; the parsed arguments carry their handler (`run_init`)."""
    init = subparsers.add_parser(
        "init", help="write N peer files and identity keys for a swarm (start each with p2pfed peer DIR/peerK.toml)")
    init.add_argument("num_peers", type=int, metavar="N", help="peers in the swarm")
    init.add_argument("experiment", nargs="?", help="an experiment TOML file: its sections, topology, seed, scheme")
    init.add_argument("--out", required=True, metavar="DIR", help="the folder for the peer files and keys")
    init.add_argument("--listen-host", dest="listen_hosts", action="append", metavar="HOST",
                      help=f"the IP address peers listen on and are dialled at (default {DEFAULT_HOST}); "
                           "repeat it to spread the peers over machines (peer K gets the K-th, round-robin)")
    init.add_argument("--swarm", metavar="NAME",
                      help="membership mode: peers join swarm NAME through peer0's address (the bootstrap) and "
                           "derive their neighbours from the members and the topology, instead of listing them; "
                           "the swarm is closed: only these N keys may join (each file's [members] table; delete "
                           "it in every file to let anyone who knows the swarm's name and an address join)")
    init.add_argument("--scheme", help="the peers' scheme (default: the experiment's one scheme, else spread)")
    init.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override an experiment key, e.g. --set training.rounds=5")
    init.set_defaults(handler=run_init)


def run_init(args: argparse.Namespace) -> int:
    paths = init_swarm(args.num_peers, Path(args.out), args.experiment, args.overrides,
                       args.listen_hosts or [DEFAULT_HOST], args.scheme, args.swarm)
    for path in paths:
        peer = load_peer(path)
        print(f"{path}: {peer.name} listens on {peer.listen[0]}, " + (
            f"joins swarm {peer.swarm} through {peer.bootstrap[0]}" if peer.swarm else
            f"neighbours {', '.join(n.name for n in peer.neighbours) or '(none)'}"))
    if args.swarm:
        print(f"swarm {args.swarm} is closed: only these {len(paths)} peers' keys may join ([members] in each file; "
              "delete that table in every file to open the swarm to anyone who knows its name and an address)")
    print(f"start each peer with: p2pfed peer {Path(args.out) / 'peerK.toml'} (on the machine of its address)")
    return 0


def init_swarm(num_peers: int, out: Path, experiment: str | None = None, overrides: Sequence[str] = (),
               hosts: Sequence[str] = (DEFAULT_HOST,), scheme: str | None = None, swarm: str | None = None) -> list[Path]:
    """Write the key files and peer files of a swarm of `num_peers` into `out`; the peer files' paths. With
    `swarm`, the files name the swarm and peer0's address as the bootstrap instead of listing neighbours, and
    close it: each lists every peer's name and peer ID (`members`)."""
    from p2pfed.launch import swarm_configs, write_peer_toml
    from p2pfed.net.identity import identity_from_file, peer_id_of

    if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < 1:
        raise ConfigError(f"N: must be an integer >= 1, got {num_peers!r}")
    if swarm is not None:  # before anything is written
        PeerConfig(swarm=swarm).validate()
    config = load_experiment(experiment, [*overrides, f"num_peers={num_peers}"])
    scheme = _scheme(config, experiment, overrides, scheme)
    seed = config.seeds[0]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{peer_name(i)}.toml" for i in range(num_peers)]
    taken = [p for p in paths if p.exists()]
    if taken:
        raise ConfigError(f"--out: {taken[0]} exists; choose another folder or remove the peer files")
    addrs = listen_addrs([hosts[i % len(hosts)] for i in range(num_peers)])
    peer_ids = [peer_id_of(identity_from_file(out / f"{peer_name(i)}.key")) for i in range(num_peers)]
    configs = swarm_configs(config, _graph(config, seed), scheme, seed, peer_ids, addrs,
                            lambda i: {"key_file": f"{peer_name(i)}.key", "state_dir": peer_name(i)})
    if swarm:
        # Every member derives its neighbours from the members and the topology (static ones too).
        bootstrap = (f"{addrs[0]}/p2p/{peer_ids[0]}",)
        # Closed: init made every key, so every file lists them all and strangers get no name (docs/libp2p.md).
        members = {peer_name(i): peer_ids[i] for i in range(num_peers)}
        configs = [dataclasses.replace(c, neighbours=(), topology=config.topology, swarm=swarm, bootstrap=bootstrap,
                                       members=members) for c in configs]
    for peer, path in zip(configs, paths):
        write_peer_toml(peer, path)
        path.write_text(f"# {peer.name} of a swarm of {num_peers} (p2pfed init); start it with `p2pfed peer "
                        f"{path.name}` in this folder. Relative paths are taken from this file's folder.\n"
                        + path.read_text(encoding="utf-8"), encoding="utf-8")
        load_peer(path)  # what was written loads as written
    return paths


def _scheme(config: ExperimentConfig, experiment: str | None, overrides: Sequence[str], scheme: str | None) -> str:
    if scheme:
        return scheme
    chosen = experiment is not None or any(o.strip().startswith("schemes") for o in overrides)
    if not chosen:
        return PeerConfig.scheme
    if len(config.schemes) > 1:
        raise ConfigError(f"schemes: the experiment lists {len(config.schemes)} ({', '.join(config.schemes)}); "
                          f"pick the peers' one with --scheme")
    return config.schemes[0]


def _graph(config: ExperimentConfig, seed: int):
    """The job's graph as the libp2p runtime sees it: static, or every edge of some round when resampled."""
    from p2pfed.topology import build_graph, graphs_by_round, rounds_graph, union_graph

    graph_at = rounds_graph(config.topology, config.num_peers, seed)
    if graph_at is None:
        return build_graph(config.topology, config.num_peers, seed)
    return union_graph(graphs_by_round(graph_at, config.num_peers, config.training.rounds).values(),
                       config.num_peers)


def listen_addrs(hosts: Sequence[str]) -> list[str]:
    """A multiaddr per entry of `hosts` (one per peer): a port free on that host now, or for a host that is not
    this machine's (it cannot be checked from here) FIRST_PORT, FIRST_PORT + 1, ..."""
    parsed = {host: _address(host) for host in hosts}
    ports: dict[str, list[int]] = {}
    for host in parsed:
        count = list(hosts).count(host)
        ports[host] = _free_ports(parsed[host], count) or list(range(FIRST_PORT, FIRST_PORT + count))
    return [f"/{'ip6' if parsed[h].version == 6 else 'ip4'}/{h}/tcp/{ports[h].pop(0)}" for h in hosts]


def _address(host: str):
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--listen-host: {host!r} is not an IP address") from None
    if address.is_unspecified:
        raise ConfigError(f"--listen-host: {host} cannot be dialled by neighbours; give the machine's own address")
    return address


def _free_ports(address, count: int) -> list[int] | None:
    """`count` distinct ports free on `address` (held together while choosing); None if it is not this machine's."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((str(address), 0))
        return [s.getsockname()[1] for s in sockets]
    except OSError:
        return None
    finally:
        for s in sockets:
            s.close()
