"""Typed configuration: TOML in, dataclasses out, clear errors for anything else.

Every default of the project lives in this module. Other modules receive these
dataclasses and never read TOML or invent defaults of their own.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMES = ("local", "fedavg", "weights", "validation", "predictions", "oracle")
Scheme = Literal["local", "fedavg", "weights", "validation", "predictions", "oracle"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


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


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    # Empty: every attention and MLP linear the model family is known to have.
    target_modules: tuple[str, ...] = ()
    rslora: bool = False


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
class TopologyConfig:
    # A networkx generator name, or "edge_list" with `path`.
    generator: str = "complete"
    params: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    seed: int | None = None  # None: the experiment seed


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
    fedavg_weights: Literal["uniform", "metropolis_hastings"] = "uniform"
    weights_compare: Literal["update", "adapter"] = "update"
    predictions_top_k: int = 32  # next-token distributions are compared on their top-k tokens
    predictions_distance: Literal["kl", "l1"] = "kl"


@dataclass(frozen=True)
class NetworkConfig:
    """Faults of the in-memory transport, as plain knobs."""

    drop_prob: float = 0.0
    delay_prob: float = 0.0  # chance a message arrives delay_s seconds late
    delay_s: float = 0.0
    churn_prob: float = 0.0  # chance a peer sits a round out (no training, no messages)
    # How long a peer waits for its neighbours' updates each round. The in-process runtime
    # runs on a virtual clock, so waiting there costs no wall time.
    round_timeout_s: float = 30.0
    encoding: Literal["fp32", "fp16", "bf16"] = "fp32"
    max_message_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    num_peers: int = 8
    seeds: tuple[int, ...] = (0,)
    schemes: tuple[Scheme, ...] = ("local", "fedavg", "validation")
    runtime: Literal["inprocess"] = "inprocess"
    workers: int = 1  # processes running (scheme, seed) jobs side by side
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def validate(self) -> "ExperimentConfig":
        _check(self.num_peers >= 1, "num_peers", "must be at least 1")
        _check(len(self.seeds) >= 1, "seeds", "needs at least one seed")
        _check(len(self.schemes) >= 1, "schemes", "needs at least one scheme")
        _check(len(set(self.schemes)) == len(self.schemes), "schemes", "lists a scheme twice")
        _check(self.workers >= 1, "workers", "must be at least 1")
        _check(self.model.context >= 8, "model.context", "must be at least 8")
        _check(self.model.n_embd % self.model.n_head == 0, "model.n_embd", "must be a multiple of model.n_head")
        _check(self.lora.rank >= 1, "lora.rank", "must be at least 1")
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
        _check(t.eval_every >= 1, "training.eval_every", "must be at least 1")
        for scheme, tau in dataclasses.asdict(self.trust.temperature).items():
            _check(tau > 0, f"trust.temperature.{scheme}", "must be positive")
        _check(self.trust.top_k >= 0, "trust.top_k", "must not be negative")
        _check(self.trust.predictions_top_k >= 1, "trust.predictions_top_k", "must be at least 1")
        n = self.network
        for name in ("drop_prob", "delay_prob", "churn_prob"):
            _check(0.0 <= getattr(n, name) < 1.0, f"network.{name}", "must be in [0, 1)")
        _check(n.delay_s >= 0, "network.delay_s", "must not be negative")
        _check(n.round_timeout_s > 0, "network.round_timeout_s", "must be positive")
        _check(n.max_message_bytes > 0, "network.max_message_bytes", "must be positive")
        return self


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ---------------------------------------------------------------------------
# Building dataclasses from plain data, with the key path in every error.

def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where + '.' if where else ''}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})"
        )
    values = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name)
              for name, value in data.items()}
    return cls(**values)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON/TOML-friendly data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


# ---------------------------------------------------------------------------
# Files and command-line overrides.

def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is read as TOML, else as a string."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    for assignment in assignments:
        path, value = parse_override(assignment)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: {part} is not a table")
            node = child
        node[path[-1]] = value
    return data


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from error


def resolve_topology(value: Any, base_dir: Path) -> dict[str, Any]:
    """The experiment's `topology` key is a table or the path of a topologies/*.toml file."""
    if isinstance(value, str):
        candidate = Path(value)
        for root in (base_dir, Path.cwd()):
            if (root / candidate).is_file():
                candidate = root / candidate
                break
        table = load_toml(candidate)
        if isinstance(table.get("path"), str) and table["path"] and not Path(table["path"]).is_absolute():
            table["path"] = str((candidate.parent / table["path"]).resolve())
        return table
    return value


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    data = load_toml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    if "topology" in data:
        data["topology"] = resolve_topology(data["topology"], base_dir)
    return from_dict(ExperimentConfig, data).validate()
