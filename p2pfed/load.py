"""Configuration files: TOML in, checked dataclasses out, with the key in every error.

`load_experiment` and `load_peer` read a file, apply `--set KEY=VALUE` overrides, resolve the paths and files
it names (a relative path from the file's folder; topologies, profiles) and check everything that can be
checked before any work starts: value ranges, topology parameters, scheme names and ranks.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from p2pfed.config import ConfigError, ExperimentConfig, PeerConfig, TopologyConfig
from p2pfed.plugins import is_plugin_path
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


# ---------------------------------------------------------------------------
# Paths: every relative path in a file is taken from that file's folder, one typed with --set from the
# working directory. Named topologies and profiles (`topology = "ring"`, `profile = "medium"`) are the
# repository's topologies/*.toml and peers/*.toml, found beside the package: the Makefile installs p2pfed
# editable, so the files users read and edit are the ones used, and examples and docs keep their paths.

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
PROFILES = Path(__file__).resolve().parent.parent / "peers"
# Keys that hold a path, by section; a value in SPECIAL is a name, not a path.
PATH_KEYS = {"": ("state_dir", "key_file", "output_dir"), "data": ("source",), "model": ("source", "cache_dir")}
SPECIAL = {("data", "source"): "builtin", ("model", "source"): "tiny"}
MUST_EXIST = {("data", "source"), ("model", "source")}


def resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """`data` (a file's table, or --set values) with every relative path made absolute against `base_dir`,
    and the topology and profile files it names read in. Absolute paths are left alone, so resolving
    again (the overrides, against the working directory) changes nothing already resolved."""
    for section, keys in PATH_KEYS.items():
        table = data.get(section) if section else data
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if not isinstance(value, str) or not value or value == SPECIAL.get((section, key)):
                continue
            where = f"{section}.{key}" if section else key
            table[key] = str(_absolute(value, base_dir))
            if (section, key) in MUST_EXIST and not Path(table[key]).exists():
                raise ConfigError(f"{where}: no such file or folder {table[key]} ({value!r} from {base_dir})")
    if "topology" in data:
        data["topology"] = resolve_topology(data["topology"], base_dir)
    if "profiles" in data:
        data["profiles"] = resolve_profiles(data["profiles"], base_dir)
    if isinstance(data.get("profile"), str):
        data["profile"] = resolve_profiles([data["profile"]], base_dir, "profile")[0]
    if isinstance(data.get("plugins"), list):
        data["plugins"] = resolve_plugins(data["plugins"], base_dir)
    return data


def _absolute(value: str, base_dir: Path) -> Path:
    return (base_dir / Path(value).expanduser()).resolve()


def resolve_topology(value: Any, base_dir: Path, where: str = "topology") -> Any:
    """A `topology` key: a table (its edge-list `path` from `base_dir`), the name of a shipped topology
    ("ring": topologies/ring.toml), or the path of a topology file (its `path` from that file's folder)."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and value["path"]:
            value = {**value, "path": str(_absolute(value["path"], base_dir))}
        return value
    if not isinstance(value, str):
        return value
    candidate = _file(value, base_dir, TOPOLOGIES, where, "{generator = ...}")
    return resolve_topology(load_toml(candidate), candidate.parent, where)


def _file(value: str, base_dir: Path, shipped: Path, where: str, table: str) -> Path:
    """The file a string names: a shipped one by its name ("ring"), else a path from `base_dir`."""
    if "/" in value or "\\" in value or value.endswith(".toml") or value.startswith((".", "~")):
        candidate = _absolute(value, base_dir)
        if not candidate.is_file():
            raise ConfigError(f"{where}: no such file {candidate} ({value!r} from {base_dir})")
        return candidate
    candidate = shipped / f"{value}.toml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in shipped.glob("*.toml"))) or "none found"
        raise ConfigError(f"{where}: no file named {value!r} ({candidate} does not exist; known: {known}); "
                          f"give a file's path or a table {table}")
    return candidate


def resolve_profiles(value: Any, base_dir: Path, where: str = "profiles") -> Any:
    """`profiles` lists tables, names of peers/*.toml files ("low") or paths of profile files; a file's profile
    is named after it by default."""
    if not isinstance(value, list):
        return value
    resolved = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            path = _file(item, base_dir, PROFILES, where if where == "profile" else f"{where}[{i}]", "{rank = ...}")
            item = {"name": path.stem, **load_toml(path)}
        resolved.append(item)
    return resolved


def resolve_plugins(value: list, base_dir: Path) -> list:
    """`plugins` with each file made absolute against `base_dir` (so that every process, wherever it runs
    from, imports the same file); module names stay as they are."""
    return [str(_absolute(entry, base_dir)) if isinstance(entry, str) and is_plugin_path(entry) else entry
            for entry in value]


def with_plugins(path: str | Path | None, overrides: list[str], plugins: list[str]) -> list[str]:
    """`overrides` and one more that appends `plugins` (from the working directory) to the file's and the
    overrides' own: `--plugin` as an override, for every command that loads a file with overrides."""
    if not plugins:
        return list(overrides)
    known = _load(path, overrides).get("plugins", [])
    if not isinstance(known, list):
        raise ConfigError(f"plugins: expected a list, got {known!r}")
    return [*overrides, f"plugins={json.dumps([*known, *resolve_plugins(list(plugins), Path.cwd())])}"]


def _load(path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """A file's table with its paths resolved against its folder, then the overrides against the working
    directory."""
    data = resolve_paths(load_toml(path), Path(path).resolve().parent) if path is not None else {}
    return resolve_paths(apply_overrides(data, list(overrides or [])), Path.cwd())


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    config = from_dict(ExperimentConfig, _load(path, overrides)).validate()
    check_schemes(config)
    return config


def load_peer(path: str | Path | None = None, overrides: list[str] | None = None) -> PeerConfig:
    config = from_dict(PeerConfig, _load(path, overrides)).validate()
    check_schemes(config.as_experiment())
    return config


def load_topology(path: str | Path) -> TopologyConfig:
    """A topologies/*.toml file (or a shipped topology's name); a relative edge-list `path` is taken from the
    file's folder."""
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
