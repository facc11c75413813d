"""Configuration errors, the checks that raise them, and peer names."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


PEER_NAME = re.compile(r"peer(0|[1-9][0-9]*)")


def peer_name(index: int) -> str:
    """The name of the peer at graph node `index`: its name in results and messages."""
    return f"peer{index}"


def peer_index(name: str) -> int:
    # No leading zeros, so that peer_name(peer_index(name)) == name always holds.
    match = PEER_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(f"{name!r} is not a peer name (expected peer0, peer1, ...)")
    return int(match.group(1))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_finite(config: Any, where: str = "") -> None:
    """Every float of `config` (nested sections included) is a finite number."""
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, key + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_finite(item, f"{key}[{i}].")
        elif isinstance(value, float):
            check(math.isfinite(value), key, f"must be a finite number, got {value}")
