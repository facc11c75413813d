"""Routing statistics of CoMiGS expert layers: how much of the gate weight each expert gets.

Per expert layer kind (the module path without its block, e.g. "mlp.c_fc", summed over the
blocks), each expert's share of the gate weight over all tokens: share_e = sum_t g_te /
sum_t sum_e' g_te'. With the default top-2 of two experts this is the mean router probability.
It shows whether a peer's router leans on its specialist ("s1") or its generalist ("g1").
RoundRecord.routing holds it for every evaluated round, measured on the peer's test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from p2pfed.experts import MixtureOfLoraExperts
from p2pfed.model import AdapterHost


def layer_kind(path: str) -> str:
    """ "transformer.h.3.mlp.c_fc" -> "mlp.c_fc": what follows the last numeric component (the block index)."""
    parts = path.split(".")
    block = max((i for i, part in enumerate(parts) if part.isdigit()), default=-1)
    return ".".join(parts[block + 1:]) or path


def expert_labels(n_generalists: int, n_specialists: int) -> list[str]:
    return [f"g{i + 1}" for i in range(n_generalists)] + [f"s{i + 1}" for i in range(n_specialists)]


@dataclass
class GateTally:
    """Gate weight summed over tokens, per layer kind; fed by forward hooks while `attached`."""

    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, layer: MixtureOfLoraExperts) -> None:
        gates = layer.last_routing.gates.detach().sum(0).double()
        self.totals[kind] = self.totals[kind] + gates if kind in self.totals else gates
        self.labels[kind] = expert_labels(layer.generalist_A.shape[0], layer.specialist_A.shape[0])

    def shares(self) -> dict[str, dict[str, float]]:
        out = {}
        for kind, total in self.totals.items():
            mass = float(total.sum())
            out[kind] = {label: round(float(value) / mass, 4) if mass > 0 else 0.0
                         for label, value in zip(self.labels[kind], total)}
        return out


@torch.inference_mode()
def routing_shares(host: AdapterHost, adapter: Mapping[str, torch.Tensor], blocks: torch.Tensor,
                   batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Each expert's share of the gate weight on `blocks`, per expert layer kind; {} without expert layers."""
    tally = GateTally()
    layers = [(layer_kind(path), module) for path, module in host.model.named_modules()
              if isinstance(module, MixtureOfLoraExperts)]
    if not layers:
        return {}
    handles = [module.register_forward_hook(lambda layer, _in, _out, kind=kind: tally.add(kind, layer))
               for kind, module in layers]
    try:
        with host.using(adapter) as model:
            for start in range(0, len(blocks), batch_size):
                model(input_ids=blocks[start:start + batch_size].to(host.device))
    finally:
        for handle in handles:
            handle.remove()
    return tally.shares()


# ---------------------------------------------------------------------------
# In a run's summary: the specialists' share by data group (report.py).

def specialist_share(routing: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per layer kind, the share of the gate weight that went to specialists (s1, s2, ...)."""
    return {kind: sum(v for label, v in shares.items() if label.startswith("s")) for kind, shares in routing.items()}


def routing_summary(jobs) -> dict[str, dict[str, dict[str, float]]]:
    """Per data group (each seed's groups), per layer kind: the specialists' share in each peer's last evaluated
    round, mean, min and max over the group's peers and the seeds. {} for schemes without expert layers."""
    shares: dict[str, dict[str, list[float]]] = {}
    for job in jobs:
        for name, peer in job.peers.items():
            last = next((r.routing for r in reversed(peer.rounds) if r.routing), None)
            if last is None:
                continue
            group = job.groups.get(name, "-") if job.groups else "-"
            for kind, share in specialist_share(last).items():
                shares.setdefault(group, {}).setdefault(kind, []).append(share)
    return {group: {kind: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for kind, v in kinds.items()}
            for group, kinds in sorted(shares.items())}


def print_routing_table(summary: dict, console) -> None:
    """The specialists' share of the gate weight by scheme and data group, for schemes with expert layers."""
    from rich.table import Table

    rows = {name: row["routing"] for name, row in summary["schemes"].items() if row.get("routing")}
    if not rows:
        return
    kinds = sorted({kind for groups in rows.values() for kinds in groups.values() for kind in kinds})
    table = Table(title="Routing: the specialists' share of the gate weight on the test split, last evaluated "
                        "round, mean [min, max] over a group's peers and seeds")
    for column in ("scheme", "group", *kinds):
        table.add_column(column, justify="left" if column in ("scheme", "group") else "right")
    for name, groups in rows.items():
        for group, by_kind in groups.items():
            cells = [f"{c['mean']:.2f} [{c['min']:.2f}, {c['max']:.2f}]" if (c := by_kind.get(kind)) else "-"
                     for kind in kinds]
            table.add_row(name, group, *cells)
    console.print(table)
