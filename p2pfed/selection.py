"""Best-round selection (training.select_best): a peer keeps the adapter of its lowest validation loss.

Early stopping without stopping: training and gossip go on every round (neighbours still need this peer's
updates), but the model the peer ends with is the best one it held after any round, judged on its own
validation blocks only. The copy survives a restart through the checkpoint's meta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class BestRound:
    """The best round so far: its number, validation loss and a detached copy of the whole adapter."""

    round: int = 0
    val_loss: float = math.inf
    tensors: dict[str, torch.Tensor] | None = None

    def offer(self, round_index: int, val_loss: float, adapter: Mapping[str, torch.Tensor]) -> bool:
        """Keep `adapter` if its loss is strictly lower (the earliest of equal rounds stays); returns whether kept."""
        if not val_loss < self.val_loss:  # NaN never wins
            return False
        self.round, self.val_loss = round_index, val_loss
        self.tensors = {name: t.detach().clone() for name, t in adapter.items()}
        return True

    def to_meta(self) -> dict | None:
        if self.tensors is None:
            return None
        return {"round": self.round, "val_loss": self.val_loss, "tensors": self.tensors}

    @classmethod
    def from_meta(cls, meta: dict | None) -> "BestRound":
        if not meta:
            return cls()
        return cls(int(meta["round"]), float(meta["val_loss"]), dict(meta["tensors"]))
