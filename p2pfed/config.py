"""Typed configuration: TOML in, dataclasses out, clear errors for anything else.

Every default of the project lives in this module. Other modules receive these
dataclasses and never read TOML or invent defaults of their own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


_PEER_NAME = re.compile(r"peer(0|[1-9][0-9]*)")


def peer_name(index: int) -> str:
    """The name of the peer at graph node `index`: its name in results and messages."""
    return f"peer{index}"


def peer_index(name: str) -> int:
    # No leading zeros, so that peer_name(peer_index(name)) == name always holds.
    match = _PEER_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(f"{name!r} is not a peer name (expected peer0, peer1, ...)")
    return int(match.group(1))


@dataclass(frozen=True)
class ModelConfig:
    # "tiny": a small GPT-2-style model built from this config and pretrained once on the
    # built-in generic corpus (cached); otherwise a local Hugging Face directory or a .gguf file.
    source: str = "tiny"
    gguf_file: str = ""
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    context: int = 128
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 1234
    cache_dir: str = ""  # empty: $P2PFED_CACHE or ~/.cache/p2pfed


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The LoRA scale s of Delta W = s B A: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    # Empty: every attention and MLP linear the model family is known to have.
    target_modules: tuple[str, ...] = ()
    rslora: bool = False

    def scale(self, rank: int) -> float:
        """s for a peer of `rank`: alpha is the swarm's, the rank each peer's own."""
        return lora_scale(self.alpha, rank, self.rslora)


@dataclass(frozen=True)
class DataConfig:
    # "builtin" or a folder holding one sub-folder (or one .txt file) of text per group.
    source: str = "builtin"
    groups: tuple[str, ...] = ("english", "italian")
    split: Literal["specific", "mixed", "dirichlet"] = "specific"
    own_fraction: float = 0.75  # "mixed": share of a peer's blocks drawn from its own group
    dirichlet_alpha: float = 0.5
    block_len: int = 128
    train_blocks: int = 48
    val_blocks: int = 16
    test_blocks: int = 24


@dataclass(frozen=True)
class ExpertsConfig:
    """CoMiGS expert layers (docs/algorithms.md), used by the comigs-* schemes."""

    top_k: int = 2  # experts kept per token (clipped to the layer's number of experts)
    router_every: int = 2  # expert steps between router phases
    router_steps: int = 1  # router-only steps on the validation split per phase
    router_lr: float = 1e-3
    load_balancing: float = 0.01  # weight of the load-balancing loss (only where top_k < experts)
    # Dotted suffixes of module paths; empty: the model family's MLP linears. Attention keeps a plain LoRA.
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeerProfile:
    """What one kind of peer can afford: peers/*.toml. Unset fields take the experiment's values."""

    name: str = "default"
    rank: int | None = None  # LoRA rank (also the rank of its experts); None: lora.rank
    specialists: int | None = None  # specialist experts under comigs methods that have any; None: the method's


# Topology generator -> its parameters: name -> (type, required). `resample_every` is accepted by all.
TOPOLOGY_PARAMS: dict[str, dict[str, tuple[type, bool]]] = {
    "ring": {},
    "complete": {},
    "star": {},
    "random_regular": {"d": (int, True)},
    "erdos_renyi": {"p": (float, True)},
    "watts_strogatz": {"k": (int, True), "p": (float, True)},
    "barabasi_albert": {"m": (int, True)},
    "torus": {"rows": (int, False), "cols": (int, False)},
    "edge_list": {},
}
RESAMPLE_KEY = "resample_every"


@dataclass(frozen=True)
class TopologyConfig:
    # A networkx generator name, or "edge_list" with `path`.
    generator: str = "complete"
    params: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    seed: int | None = None  # None: the experiment seed

    def checked_params(self) -> tuple[dict[str, Any], int | None]:
        """The generator's own parameters, type-checked, and `resample_every` split off.

        Ranges that depend on the number of peers are checked when the graph is built.
        """
        spec = TOPOLOGY_PARAMS.get(self.generator)
        if spec is None:
            raise ConfigError(f"topology.generator: unknown generator {self.generator!r} "
                              f"(known: {', '.join(TOPOLOGY_PARAMS)})")
        params = dict(self.params)
        resample_every = params.pop(RESAMPLE_KEY, None)
        if resample_every is not None and not (_is_int(resample_every) and resample_every >= 1):
            raise ConfigError(f"topology.params.{RESAMPLE_KEY}: must be an integer >= 1, got {resample_every!r}")
        for key in sorted(params):
            if key not in spec:
                known = ", ".join([*spec, RESAMPLE_KEY])
                raise ConfigError(
                    f"topology.params.{key}: unknown parameter for generator {self.generator!r} (known: {known})")
            kind, _ = spec[key]
            value = params[key]
            if kind is int and not _is_int(value):
                raise ConfigError(f"topology.params.{key}: expected an integer, got {value!r}")
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"topology.params.{key}: expected a number, got {value!r}")
                params[key] = float(value)
        for key, (_, required) in spec.items():
            if required and key not in params:
                raise ConfigError(f"topology.params.{key}: required by generator {self.generator!r}")
        if self.generator == "edge_list" and not self.path:
            raise ConfigError("topology.path: required by generator 'edge_list'")
        if self.generator != "edge_list" and self.path:
            raise ConfigError(f"topology.path: only read by generator 'edge_list', not {self.generator!r}")
        return params, resample_every


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int = 10
    local_steps: int = 10
    warmup_steps: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    eval_every: int = 1  # rounds between test-perplexity evaluations (the last round always)


@dataclass(frozen=True)
class TemperatureConfig:
    # Each score lives on its own scale, so each scheme has its own temperature.
    weights: float = 0.1
    validation: float = 0.05
    predictions: float = 0.05


@dataclass(frozen=True)
class TrustConfig:
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    top_k: int = 0  # keep the k best-scored neighbours (self always kept); 0 keeps all
    threshold: float | None = None  # drop neighbours whose weight falls below it
    fedavg_weights: Literal["uniform", "metropolis_hastings", "data_size"] = "uniform"
    weights_compare: Literal["update", "adapter"] = "update"
    # A neighbour's update (its distance from the shared init) may be at most this many times as long
    # as the peer's own, else it is dropped: a scaled or extreme update never reaches the aggregate.
    # 0 turns the check off.
    max_norm_ratio: float = 10.0
    # The robust baselines (schemes "median", "trimmed-mean", "krum"), which ignore trust:
    trim_fraction: float = 0.2  # trimmed-mean drops this share of the values at each end, per coordinate
    krum_byzantine: int = 1  # Krum's f: attackers assumed among a peer's neighbours
    predictions_top_k: int = 32  # next-token distributions are compared on their top-k tokens
    predictions_distance: Literal["kl", "l1"] = "kl"


@dataclass(frozen=True)
class MembershipConfig:
    """When a peer is in the swarm: rounds `join` <= r < `leave` (`[[network.membership]]`).

    Every peer computes the same plan from its config: nobody waits for a peer outside its rounds.
    """

    peer: str = ""
    join: int = 1  # the first round it takes part in; before it, it sits rounds out (a newcomer)
    leave: int | None = None  # the first round it no longer takes part in; None: it never leaves

    def takes_part(self, round_index: int) -> bool:
        return self.join <= round_index and (self.leave is None or round_index < self.leave)


@dataclass(frozen=True)
class NetworkConfig:
    """Faults of the in-memory transport as plain knobs, and who is in the swarm in which rounds."""

    drop_prob: float = 0.0
    delay_prob: float = 0.0  # chance a message arrives delay_s seconds late
    delay_s: float = 0.0
    churn_prob: float = 0.0  # chance a peer sits a round out (no training, no messages)
    # How long a peer waits for its neighbours' updates each round. The in-process runtime
    # runs on a virtual clock, so waiting there costs no wall time.
    round_timeout_s: float = 30.0
    encoding: Literal["fp32", "fp16", "bf16"] = "fp32"
    max_message_bytes: int = 256 * 1024 * 1024
    # Joins and leaves, in every runtime: peers not listed take part in every round.
    membership: tuple[MembershipConfig, ...] = ()

    def takes_part(self, peer: str, round_index: int) -> bool:
        return all(m.takes_part(round_index) for m in self.membership if m.peer == peer)


ATTACK_KINDS = ("noise", "sign_flip", "scale", "huge", "other_group", "free_rider", "stale", "metadata", "garbage")


@dataclass(frozen=True)
class AttackConfig:
    """Peers that attack their neighbours (p2pfed.attacks): `[[attack]]` tables of an experiment."""

    peers: tuple[str, ...] = ()
    kind: Literal["noise", "sign_flip", "scale", "huge", "other_group", "free_rider", "stale", "metadata",
                  "garbage"] = "scale"
    factor: float = 100.0  # scale: the multiplier; noise: the noise's length over the honest update's
    from_round: int = 1

    def validate(self, num_peers: int, where: str) -> None:
        _check(len(self.peers) >= 1, f"{where}.peers", "names no peer")
        for name in self.peers:
            _check(peer_index(name) < num_peers, f"{where}.peers", f"{name} is not one of peer0..peer{num_peers - 1}")
        _check(math.isfinite(self.factor) and self.factor > 0, f"{where}.factor", "must be a positive number")
        _check(self.from_round >= 1, f"{where}.from_round", "must be at least 1")


@dataclass(frozen=True)
class Sections:
    """The sections an experiment and each of its peers share: the same TOML tables in both files."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def sections(self) -> dict[str, Any]:
        """The shared sections by name, to build the other kind of config from this one."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Sections)}


@dataclass(frozen=True)
class ExperimentConfig(Sections):
    name: str = "experiment"
    num_peers: int = 8
    seeds: tuple[int, ...] = (0,)
    schemes: tuple[str, ...] = ("local", "fedavg", "validation")  # see strategies.parse_scheme
    # "inprocess": every peer in one process on an in-memory network (virtual clock);
    # "libp2p": each peer its own `p2pfed peer` process, talking libp2p over loopback.
    runtime: Literal["inprocess", "libp2p"] = "inprocess"
    workers: int = 1  # processes running (scheme, seed) jobs side by side
    output_dir: str = "runs"
    # Peer i gets profiles[i % len(profiles)]; empty: every peer takes the experiment's values.
    profiles: tuple[PeerProfile, ...] = ()
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    attack: tuple[AttackConfig, ...] = ()  # `[[attack]]` tables: hostile peers, for robustness studies
    # With attacks: also run every job without them and report the honest peers' clean perplexity.
    compare_clean: bool = False

    def validate(self) -> "ExperimentConfig":
        _check(self.num_peers >= 1, "num_peers", "must be at least 1")
        _check(len(self.seeds) >= 1, "seeds", "needs at least one seed")
        _check(len(self.schemes) >= 1, "schemes", "needs at least one scheme")
        _check(len(set(self.schemes)) == len(self.schemes), "schemes", "lists a scheme twice")
        _check_finite(self)  # NaN or inf in any number crashes later, or silently poisons the weights
        _check(self.workers >= 1, "workers", "must be at least 1")
        _check(self.model.context >= 8, "model.context", "must be at least 8")
        _check(self.model.n_embd % self.model.n_head == 0, "model.n_embd", "must be a multiple of model.n_head")
        _check(self.lora.rank >= 1, "lora.rank", "must be at least 1")
        _check(self.lora.alpha > 0, "lora.alpha", "must be positive (0 would switch every adapter off)")
        _check(self.model.pretrain_lr > 0, "model.pretrain_lr", "must be positive")
        for i, profile in enumerate(self.profiles):
            _check(profile.rank is None or profile.rank >= 1, f"profiles[{i}].rank", "must be at least 1")
            _check(profile.specialists is None or profile.specialists >= 1, f"profiles[{i}].specialists",
                   "must be at least 1")
        e = self.experts
        _check(e.top_k >= 1, "experts.top_k", "must be at least 1")
        _check(e.router_every >= 1, "experts.router_every", "must be at least 1")
        _check(e.router_steps >= 0, "experts.router_steps", "must not be negative")
        _check(e.router_lr > 0, "experts.router_lr", "must be positive")
        _check(e.load_balancing >= 0, "experts.load_balancing", "must not be negative")
        self.topology.checked_params()
        for i, attack in enumerate(self.attack):
            attack.validate(self.num_peers, f"attack[{i}]")
        attackers = [name for attack in self.attack for name in attack.peers]
        _check(len(set(attackers)) == len(attackers), "attack", "lists a peer in two attacks")
        _check(len(self.data.groups) >= 1, "data.groups", "needs at least one group")
        _check(0.0 < self.data.own_fraction <= 1.0, "data.own_fraction", "must be in (0, 1]")
        _check(self.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be positive")
        _check(2 <= self.data.block_len <= self.model.context + 1 or self.model.source != "tiny",
               "data.block_len", f"must be in [2, model.context + 1 = {self.model.context + 1}]")
        for name in ("train_blocks", "val_blocks", "test_blocks"):
            _check(getattr(self.data, name) >= 1, f"data.{name}", "must be at least 1")
        t = self.training
        _check(t.rounds >= 1, "training.rounds", "must be at least 1")
        _check(t.local_steps >= 1, "training.local_steps", "must be at least 1")
        _check(t.warmup_steps >= 0, "training.warmup_steps", "must not be negative")
        _check(t.batch_size >= 1, "training.batch_size", "must be at least 1")
        _check(t.lr > 0, "training.lr", "must be positive")
        _check(t.weight_decay >= 0, "training.weight_decay", "must not be negative")
        _check(t.eval_every >= 1, "training.eval_every", "must be at least 1")
        for scheme, tau in dataclasses.asdict(self.trust.temperature).items():
            _check(tau > 0, f"trust.temperature.{scheme}", "must be positive")
        _check(self.trust.top_k >= 0, "trust.top_k", "must not be negative")
        threshold = self.trust.threshold
        _check(threshold is None or 0 <= threshold < 1, "trust.threshold", "must be in [0, 1)")
        _check(self.trust.predictions_top_k >= 1, "trust.predictions_top_k", "must be at least 1")
        _check(self.trust.max_norm_ratio >= 0, "trust.max_norm_ratio", "must not be negative (0 turns it off)")
        _check(0 <= self.trust.trim_fraction < 0.5, "trust.trim_fraction", "must be in [0, 0.5)")
        _check(self.trust.krum_byzantine >= 0, "trust.krum_byzantine", "must not be negative")
        n = self.network
        for name in ("drop_prob", "delay_prob", "churn_prob"):
            _check(0.0 <= getattr(n, name) < 1.0, f"network.{name}", "must be in [0, 1)")
        _check(n.delay_s >= 0, "network.delay_s", "must not be negative")
        _check(n.round_timeout_s > 0, "network.round_timeout_s", "must be positive")
        _check(n.max_message_bytes > 0, "network.max_message_bytes", "must be positive")
        for i, m in enumerate(n.membership):
            where = f"network.membership[{i}]"
            _check(_PEER_NAME.fullmatch(m.peer) is not None and peer_index(m.peer) < self.num_peers,
                   f"{where}.peer", f"{m.peer!r} is not one of peer0..peer{self.num_peers - 1}")
            _check(m.join >= 1, f"{where}.join", "must be at least 1")
            _check(m.leave is None or m.leave > m.join, f"{where}.leave", f"must be after join ({m.join})")
        listed = [m.peer for m in n.membership]
        _check(len(set(listed)) == len(listed), "network.membership", "lists a peer twice")
        return self

    def profile_of(self, index: int) -> PeerProfile:
        return self.profiles[index % len(self.profiles)] if self.profiles else PeerProfile()

    def rank_of(self, index: int) -> int:
        return self.profile_of(index).rank or self.lora.rank


@dataclass(frozen=True)
class NeighbourConfig:
    name: str  # its peer name (peer0, peer1, ...), as in the swarm's results
    peer_id: str  # its libp2p peer ID: Noise authenticates the connection against it
    addrs: tuple[str, ...] = ()  # multiaddrs to dial it at; empty for a neighbour that dials this peer


@dataclass(frozen=True)
class PeerConfig(Sections):
    """One peer as its own process or inside an app (`p2pfed peer PEER.toml`, `async with Peer(config)`).

    Its data is its share of a split: peer `name`'s blocks of the `data` split among `num_peers` with
    `seed`. A peer with its own text alone sets data.source to its folder, one group, and num_peers = 1.
    """

    name: str = "peer0"
    scheme: str = "validation"  # see strategies.parse_scheme
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
    threads: int = 1  # torch threads; 0 leaves torch's default
    attack: AttackConfig | None = None  # this peer attacks its neighbours (robustness studies only)
    # A resampled topology (params.resample_every): the peer computes its neighbours of each round from it
    # and the seed, among those `neighbours` lists. None: the listed neighbours, every round.
    topology: TopologyConfig | None = None

    def as_experiment(self) -> ExperimentConfig:
        """The experiment this peer is one of: checks every shared section the same way."""
        return ExperimentConfig(num_peers=self.num_peers, seeds=(self.seed,), schemes=(self.scheme,),
                                profiles=(self.profile,), attack=(self.attack,) if self.attack else (),
                                topology=self.topology or TopologyConfig(), **self.sections())

    def validate(self) -> "PeerConfig":
        self.as_experiment().validate()
        _check_finite(self)
        _check(peer_index(self.name) < self.num_peers, "name", f"must be one of peer0..peer{self.num_peers - 1}")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1")
        _check(self.startup_timeout_s >= 0, "startup_timeout_s", "must not be negative")
        _check(self.threads >= 0, "threads", "must not be negative")
        if self.attack is not None:
            self.attack.validate(self.num_peers, "attack")
        names = [n.name for n in self.neighbours]
        _check(len(set(names)) == len(names), "neighbours", "lists a neighbour twice")
        _check(self.name not in names, "neighbours", "lists the peer itself")
        return self


def _check_finite(config: Any, where: str = "") -> None:
    """Every float of `config` (nested sections included) is a finite number."""
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_finite(item, f"{key}[{i}].")
        elif isinstance(value, float):
            _check(math.isfinite(value), key, f"must be a finite number, got {value}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")
