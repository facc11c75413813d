"""One networked peer: `p2pfed peer PEER.toml`, or `async with Peer(config)` inside an app."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from p2pfed.config.checks import PEER_NAME, check, check_finite, peer_index
from p2pfed.config.experiment import ExperimentConfig, Sections
from p2pfed.config.network import AttackConfig, NeighbourConfig
from p2pfed.config.sections import PeerProfile
from p2pfed.config.topology import TopologyConfig

SWARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what `swarm = "NAME"` may be
MAX_SWARM_PEERS = 1024  # a swarm's members are named peer0..peer{num_peers-1}: this caps what a peer tracks


@dataclass(frozen=True)
class PeerConfig(Sections):
    """One peer as its own process or inside an app (`p2pfed peer PEER.toml`, `async with Peer(config)`).

    Its data is its share of a split: peer `name`'s blocks of the `data` split among `num_peers` with
    `seed`. A peer with its own text alone sets data.source to its folder, one group, and num_peers = 1.
    """

    name: str = "peer0"
    scheme: str = "spread"  # see strategies.parse_scheme
    seed: int = 0  # the split, the shared adapter init and the batch order
    num_peers: int = 1
    profile: PeerProfile = field(default_factory=PeerProfile)
    # Identity: a 32-byte key file (created if missing), else a key derived from identity_seed.
    key_file: str = ""
    identity_seed: int | None = None
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    neighbours: tuple[NeighbourConfig, ...] = ()
    # How long to wait at start for every neighbour to answer before round 1 (then go on without).
    startup_timeout_s: float = 30.0
    state_dir: str = ""  # checkpoints and results; empty: none (nothing survives a restart)
    checkpoint_every: int = 1
    # Torch threads for the whole process. 0: an embedded peer leaves the app's setting alone; `p2pfed peer`,
    # a process of its own, then takes 1 thread (peer processes share a machine).
    threads: int = 0
    attack: AttackConfig | None = None  # this peer attacks its neighbours (robustness studies only)
    # A resampled topology (params.resample_every): the peer computes its neighbours of each round from it
    # and the seed, among those `neighbours` lists. None: the listed neighbours, every round.
    topology: TopologyConfig | None = None
    # Membership mode (p2pfed.net.membership): instead of listing neighbours, join the swarm `swarm` through
    # any running member's address (`bootstrap`, each ending in /p2p/ID); the members and the topology give
    # each round's neighbours. A member not heard from (no fresher signed record) for member_timeout_s leaves.
    swarm: str = ""
    bootstrap: tuple[str, ...] = ()
    member_timeout_s: float = 30.0
    # A closed swarm: name -> peer ID of everyone who may be a member (p2pfed init --swarm writes it). A record
    # or dialler not in it is refused; empty: an open swarm, where names are first-come.
    members: dict[str, str] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()  # as an experiment's (p2pfed.plugins): imported before the scheme is looked up

    def as_experiment(self) -> ExperimentConfig:
        """The experiment this peer is one of: checks every shared section the same way."""
        return ExperimentConfig(num_peers=self.num_peers, seeds=(self.seed,), schemes=(self.scheme,),
                                profiles=(self.profile,), attack=(self.attack,) if self.attack else (),
                                topology=self.topology or TopologyConfig(), plugins=self.plugins,
                                **self.sections())

    def validate(self) -> "PeerConfig":
        self.as_experiment().validate()
        check_finite(self)
        check(peer_index(self.name) < self.num_peers, "name", f"must be one of peer0..peer{self.num_peers - 1}")
        check(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1")
        check(self.startup_timeout_s >= 0, "startup_timeout_s", "must not be negative")
        check(self.threads >= 0, "threads", "must not be negative")
        if self.attack is not None:
            self.attack.validate(self.num_peers, "attack")
        self._validate_swarm()
        names = [n.name for n in self.neighbours]
        check(len(set(names)) == len(names), "neighbours", "lists a neighbour twice")
        check(self.name not in names, "neighbours", "lists the peer itself")
        return self

    def _validate_swarm(self) -> None:
        check(self.member_timeout_s > 0, "member_timeout_s", "must be positive")
        if not self.swarm:
            check(not self.bootstrap, "bootstrap", "needs swarm = \"NAME\" (the swarm to join)")
            check(not self.members, "members", "needs swarm = \"NAME\" (the swarm it closes)")
            return
        check(SWARM_NAME.fullmatch(self.swarm) is not None, "swarm",
              "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        check(not self.neighbours, "neighbours", "a swarm member learns its neighbours from the swarm: "
                                                 "give swarm and bootstrap, or [[neighbours]], not both")
        check(self.num_peers <= MAX_SWARM_PEERS, "num_peers", f"a swarm has at most {MAX_SWARM_PEERS} peers")
        check(len(self.bootstrap) <= 16, "bootstrap", "lists more than 16 addresses")
        for i, addr in enumerate(self.bootstrap):
            head, sep, tail = addr.partition("/p2p/")
            check(bool(sep) and bool(head) and bool(tail) and "/" not in tail, f"bootstrap[{i}]",
                  f"{addr!r} must end in /p2p/PEER_ID (a running member's address and ID)")
        self._validate_members()

    def _validate_members(self) -> None:
        if not self.members:
            return
        for name, peer_id in self.members.items():
            check(PEER_NAME.fullmatch(name) is not None and peer_index(name) < self.num_peers, f"members.{name}",
                  f"not a member name: they are peer0..peer{self.num_peers - 1}")
            check(is_peer_id(peer_id), f"members.{name}", f"{peer_id!r} is not a libp2p peer ID")
        check(len(set(self.members.values())) == len(self.members), "members", "lists a peer ID twice")
        check(self.name in self.members, "members", f"does not list this peer ({self.name}): it could not join")


BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def is_peer_id(text: object) -> bool:
    """Whether `text` is a base58 multihash ("identity" or sha2-256) as p2pfed.net.identity.parse_peer_id takes:
    the config layer checks it without libp2p."""
    if not isinstance(text, str) or not 2 <= len(text) <= 128 or any(c not in BASE58 for c in text):
        return False
    number = 0
    for c in text:
        number = number * 58 + BASE58.index(c)
    zeros = len(text) - len(text.lstrip("1"))
    raw = b"\0" * zeros + number.to_bytes((number.bit_length() + 7) // 8, "big")
    return len(raw) >= 2 and raw[0] in (0x00, 0x12) and len(raw) == 2 + raw[1]
