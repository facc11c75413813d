"""Configuration files: TOML in, checked dataclasses out, with the key in every error.

`load_experiment` and `load_peer` read a file, apply `--set KEY=VALUE` overrides, resolve the files it
names (topologies, profiles) and check everything that can be checked before any work starts:
value ranges, topology parameters, scheme names and ranks.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from p2pfed.config import ConfigError, ExperimentConfig, PeerConfig, TopologyConfig
from p2pfed.strategies import check_schemes


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
        candidate = _find(value, base_dir)
        table = load_toml(candidate)
        if isinstance(table.get("path"), str) and table["path"] and not Path(table["path"]).is_absolute():
            table["path"] = str((candidate.parent / table["path"]).resolve())
        return table
    return value


def _find(value: str, base_dir: Path) -> Path:
    candidate = Path(value)
    for root in (base_dir, Path.cwd()):
        if (root / candidate).is_file():
            return root / candidate
    return candidate


def resolve_profiles(value: Any, base_dir: Path) -> Any:
    """`profiles` lists tables or paths of peers/*.toml files; a file's profile is named after it by default."""
    if not isinstance(value, list):
        return value
    resolved = []
    for item in value:
        if isinstance(item, str):
            path = _find(item, base_dir)
            item = {"name": path.stem, **load_toml(path)}
        resolved.append(item)
    return resolved


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    data = load_toml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    if "topology" in data:
        data["topology"] = resolve_topology(data["topology"], base_dir)
    if "profiles" in data:
        data["profiles"] = resolve_profiles(data["profiles"], base_dir)
    config = from_dict(ExperimentConfig, data).validate()
    check_schemes(config)
    return config


def load_peer(path: str | Path | None = None, overrides: list[str] | None = None) -> PeerConfig:
    data = load_toml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    if isinstance(data.get("profile"), str):
        data["profile"] = resolve_profiles([data["profile"]], base_dir)[0]
    config = from_dict(PeerConfig, data).validate()
    check_schemes(config.as_experiment())
    return config


def load_topology(path: str | Path) -> TopologyConfig:
    """A topologies/*.toml file; a relative edge-list `path` is taken from the file's folder."""
    config = from_dict(TopologyConfig, resolve_topology(str(path), Path.cwd()), "topology")
    config.checked_params()  # unknown generators and parameters fail at load time, not mid-run
    return config


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
