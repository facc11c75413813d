"""Configuration files: TOML in, checked dataclasses out, with the key in every error.

`load_experiment` and `load_peer` read a file, apply `--set KEY=VALUE` overrides, resolve the files it
names (topologies, profiles) and check everything that can be checked before any work starts:
value ranges, topology parameters, scheme names and ranks.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from p2pfed.config import ConfigError, ExperimentConfig, PeerConfig, from_dict
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
