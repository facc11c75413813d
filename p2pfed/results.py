"""results.json as typed Python: what `Swarm.run()` returns and `SwarmResult.load(RUN_DIR)` reads back.

`SwarmResult.from_json(data).to_json() == data` for every results.json p2pfed writes: the typed result holds the
same content, no more and no less (the run folder's path aside).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from p2pfed.config import ExperimentConfig
from p2pfed.load import from_dict, to_dict


@dataclass(frozen=True)
class Curve:
    """Test perplexity per round, mean over peers and seeds (rounds where it was evaluated)."""

    round: list[int]
    test_ppl_mean: list[float]


@dataclass(frozen=True)
class ProfileResult:
    test_ppl_mean: float
    test_ppl_std: float
    peers: int  # peers of this profile in a job


@dataclass(frozen=True)
class AttackResult:
    """The honest peers under attack, and the weight they put on the attackers each round."""

    attackers: list[str]
    kinds: list[str]
    honest_test_ppl_mean: float
    honest_test_ppl_std: float
    attacker_trust: dict[str, list]  # {"round": [...], "mean": [...]}
    clean_test_ppl_mean: float | None = None  # the same jobs without the attackers (compare_clean)
    clean_test_ppl_std: float | None = None

    def to_json(self) -> dict:
        data = {"attackers": self.attackers, "kinds": self.kinds, "honest_test_ppl_mean": self.honest_test_ppl_mean,
                "honest_test_ppl_std": self.honest_test_ppl_std, "attacker_trust": self.attacker_trust}
        if self.clean_test_ppl_mean is not None:
            data.update(clean_test_ppl_mean=self.clean_test_ppl_mean, clean_test_ppl_std=self.clean_test_ppl_std)
        return data


@dataclass(frozen=True)
class SelectedResult:
    """training.select_best: the test perplexity of each peer's best-validation round (early stopping)."""

    test_ppl_mean: float
    test_ppl_std: float
    per_seed: dict[str, float]  # mean over peers, by seed
    round_mean: float  # the mean round the peers' selected adapters come from


@dataclass(frozen=True)
class SchemeResult:
    """One scheme (a row of the table): over every peer and seed of its jobs."""

    test_ppl_mean: float
    test_ppl_std: float
    per_peer: dict[str, float]  # each peer's final test perplexity, mean over seeds
    trust: dict[str, dict[str, float]]  # each peer's final trust row, mean over seeds
    bytes_sent: int  # the whole swarm's, mean over seeds
    per_seed: dict[str, float]  # mean over peers, by seed
    curve: Curve
    missing_updates: int
    by_profile: dict[str, ProfileResult]
    same_group_trust: float | None  # mean weight on self and same-group peers (each seed's groups); None: no trust
    attack: AttackResult | None = None
    selected: SelectedResult | None = None  # None: training.select_best was off
    # CoMiGS: per data group, per expert layer kind, the specialists' share of the gate weight
    # ({"mean", "min", "max"} over the group's peers and seeds); {} without expert layers.
    routing: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> SchemeResult:
        return cls(
            test_ppl_mean=data["test_ppl_mean"], test_ppl_std=data["test_ppl_std"], per_peer=data["per_peer"],
            trust=data["trust"], bytes_sent=data["bytes_sent"], per_seed=data["per_seed"],
            curve=Curve(**data["curve"]), missing_updates=data["missing_updates"],
            by_profile={name: ProfileResult(**row) for name, row in data.get("by_profile", {}).items()},
            same_group_trust=data.get("same_group_trust"),
            attack=AttackResult(**data["attack"]) if "attack" in data else None,
            selected=SelectedResult(**data["selected"]) if "selected" in data else None,
            routing=data.get("routing", {}))

    def to_json(self) -> dict:
        data = {"test_ppl_mean": self.test_ppl_mean, "test_ppl_std": self.test_ppl_std, "per_peer": self.per_peer,
                "trust": self.trust, "bytes_sent": self.bytes_sent, "per_seed": self.per_seed,
                "curve": {"round": self.curve.round, "test_ppl_mean": self.curve.test_ppl_mean},
                "missing_updates": self.missing_updates,
                "by_profile": {name: {"test_ppl_mean": p.test_ppl_mean, "test_ppl_std": p.test_ppl_std,
                                      "peers": p.peers} for name, p in self.by_profile.items()},
                "same_group_trust": self.same_group_trust}
        if self.selected is not None:
            data["selected"] = dataclasses.asdict(self.selected)
        if self.attack is not None:
            data["attack"] = self.attack.to_json()
        if self.routing:
            data["routing"] = self.routing
        return data


@dataclass(frozen=True)
class SwarmResult:
    """An experiment's results: results.json, typed. `config` is None for a swarm run by hand (p2pfed report on
    peers' state folders)."""

    schemes: dict[str, SchemeResult]
    config: ExperimentConfig | None
    seeds: list[int]
    groups: dict[str, str]  # each peer's data group in the first seed
    groups_by_seed: dict[str, dict[str, str]]  # each seed's (mixed and dirichlet splits differ by seed)
    profiles: dict[str, str]
    edges: list[list[str]]  # the first seed's graph
    edges_by_seed: dict[str, list[list[str]]]
    wall_time_s: float | None = None
    run_dir: Path | None = field(default=None, compare=False)  # where it was written, if anywhere

    @property
    def best(self) -> str:
        """The scheme with the lowest mean test perplexity."""
        return min(self.schemes, key=lambda s: self.schemes[s].test_ppl_mean)

    def test_ppl(self, scheme: str) -> float:
        return self.schemes[scheme].test_ppl_mean

    @classmethod
    def from_json(cls, data: dict, run_dir: str | Path | None = None) -> SwarmResult:
        config = data.get("config")
        return cls(
            schemes={name: SchemeResult.from_json(row) for name, row in data["schemes"].items()},
            config=from_dict(ExperimentConfig, config) if config is not None else None, seeds=data["seeds"],
            groups=data["groups"], groups_by_seed=data.get("groups_by_seed", {}), profiles=data["profiles"],
            edges=data["edges"], edges_by_seed=data.get("edges_by_seed", {}), wall_time_s=data.get("wall_time_s"),
            run_dir=Path(run_dir) if run_dir is not None else None)

    @classmethod
    def load(cls, run_dir: str | Path) -> SwarmResult:
        from p2pfed.report import load_results

        return cls.from_json(load_results(run_dir), run_dir)

    def to_json(self) -> dict:
        """results.json's content."""
        data = {"schemes": {name: row.to_json() for name, row in self.schemes.items()},
                "config": to_dict(self.config) if self.config is not None else None, "seeds": self.seeds,
                "groups": self.groups, "groups_by_seed": self.groups_by_seed, "profiles": self.profiles,
                "edges": self.edges, "edges_by_seed": self.edges_by_seed}
        if self.wall_time_s is not None:
            data["wall_time_s"] = self.wall_time_s
        return data

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)
