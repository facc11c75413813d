"""The topology section: a networkx generator and its parameters, or an edge list."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pfed.config.checks import ConfigError, is_int


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
        if resample_every is not None and not (is_int(resample_every) and resample_every >= 1):
            raise ConfigError(f"topology.params.{RESAMPLE_KEY}: must be an integer >= 1, got {resample_every!r}")
        for key in sorted(params):
            if key not in spec:
                known = ", ".join([*spec, RESAMPLE_KEY])
                raise ConfigError(
                    f"topology.params.{key}: unknown parameter for generator {self.generator!r} (known: {known})")
            kind, _ = spec[key]
            value = params[key]
            if kind is int and not is_int(value):
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

