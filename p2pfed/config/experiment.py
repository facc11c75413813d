"""An experiment: the shared sections, its peers, seeds, schemes and runtime (`p2pfed run EXPERIMENT.toml`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from p2pfed.config.checks import check, check_finite
from p2pfed.config.experts import ExpertsConfig
from p2pfed.config.network import AttackConfig, NetworkConfig
from p2pfed.config.sections import DataConfig, LoraConfig, ModelConfig, PeerProfile, TrainingConfig
from p2pfed.config.topology import TopologyConfig
from p2pfed.config.trust import TrustConfig


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
    schemes: tuple[str, ...] = ("local", "fedavg", "spread")  # see strategies.parse_scheme
    # "inprocess": every peer in one process on an in-memory network (virtual clock);
    # "libp2p": each peer its own `p2pfed peer` process, talking libp2p over loopback.
    runtime: Literal["inprocess", "libp2p"] = "inprocess"
    workers: int = 1  # processes running (scheme, seed) jobs side by side
    # Torch threads of each process while it runs jobs (a worker, or the caller for jobs run in it); 0: torch's
    # default. 1 by default: two one-thread workers beat one two-thread process, and sums depend on the count.
    threads: int = 1
    # Processes sharing one in-process job's peers (p2pfed.swarm_workers); same records as 1. Runs x workers.
    job_workers: int = 1
    output_dir: str = "runs"
    # Peer i gets profiles[i % len(profiles)]; empty: every peer takes the experiment's values.
    profiles: tuple[PeerProfile, ...] = ()
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    attack: tuple[AttackConfig, ...] = ()  # `[[attack]]` tables: hostile peers, for robustness studies
    # With attacks: also run every job without them and report the honest peers' clean perplexity.
    compare_clean: bool = False
    # Modules that register trust rules and aggregators (p2pfed.plugins): module names, or .py files from the
    # file's folder. Every process of the run imports them before it looks up a scheme.
    plugins: tuple[str, ...] = ()

    def validate(self) -> "ExperimentConfig":
        check(self.num_peers >= 1, "num_peers", "must be at least 1")
        check(len(self.seeds) >= 1, "seeds", "needs at least one seed")
        check(len(self.schemes) >= 1, "schemes", "needs at least one scheme")
        check(len(set(self.schemes)) == len(self.schemes), "schemes", "lists a scheme twice")
        check_finite(self)  # NaN or inf in any number crashes later, or silently poisons the weights
        check(self.workers >= 1, "workers", "must be at least 1")
        check(self.threads >= 0, "threads", "must not be negative (0: torch's default)")
        check(self.job_workers >= 1, "job_workers", "must be at least 1")
        for i, entry in enumerate(self.plugins):
            check(bool(entry.strip()), f"plugins[{i}]", "must name a module or a .py file")
        self.model.validate()
        self.lora.validate()
        for i, profile in enumerate(self.profiles):
            check(profile.rank is None or profile.rank >= 1, f"profiles[{i}].rank", "must be at least 1")
            check(profile.specialists is None or profile.specialists >= 1, f"profiles[{i}].specialists",
                  "must be at least 1")
        self.experts.validate()
        self.topology.checked_params()
        for i, attack in enumerate(self.attack):
            attack.validate(self.num_peers, f"attack[{i}]")
        attackers = [name for attack in self.attack for name in attack.peers]
        check(len(set(attackers)) == len(attackers), "attack", "lists a peer in two attacks")
        self.data.validate(self.model)
        self.training.validate()
        self.trust.validate()
        self.network.validate(self.num_peers)
        return self

    def profile_of(self, index: int) -> PeerProfile:
        return self.profiles[index % len(self.profiles)] if self.profiles else PeerProfile()

    def rank_of(self, index: int) -> int:
        return self.profile_of(index).rank or self.lora.rank

