"""What a peer's rounds leave behind: one RoundRecord per round, a PeerResult per peer (JSON both ways)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoundRecord:
    round: int  # 0 is before any training
    steps: int
    train_loss: float | None
    test_ppl: float | None
    trust: dict[str, float]  # this round's weights over self and neighbours ({} when it did not aggregate)
    missing: tuple[str, ...]  # neighbours whose update did not arrive by the deadline
    bytes_sent: int
    online: bool = True  # False: the peer sat the round out (churn, before it joined or after it left)
    # The neighbours it had this round (they change on a resampled graph or when peers join and leave);
    # () for round 0 and rounds it sat out. Histories written before this field existed read back as ().
    neighbours: tuple[str, ...] = ()
    val_loss: float | None = None  # the adapter's validation loss after the round (training.select_best)
    # CoMiGS: per expert layer kind ("mlp.c_fc"), each expert's share of the gate weight on the test split
    # ("g1" generalists, then "s1" specialists); {} without experts or when not evaluated (p2pfed.routing).
    routing: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "RoundRecord":
        """From `dataclasses.asdict` output read back from JSON (lists back to tuples)."""
        return cls(**{**data, "missing": tuple(data["missing"]), "neighbours": tuple(data.get("neighbours", ()))})


@dataclass(frozen=True)
class Selected:
    """The adapter a peer keeps under training.select_best: that of its lowest validation loss."""

    round: int
    val_loss: float
    test_ppl: float


@dataclass
class PeerResult:
    name: str
    rounds: list[RoundRecord] = field(default_factory=list)
    selected: Selected | None = None  # None: training.select_best is off (or the peer never trained)

    @property
    def final_test_ppl(self) -> float:
        return next(r.test_ppl for r in reversed(self.rounds) if r.test_ppl is not None)

    @property
    def final_trust(self) -> dict[str, float]:
        return next((r.trust for r in reversed(self.rounds) if r.trust), {})

    @property
    def bytes_sent(self) -> int:
        return self.rounds[-1].bytes_sent if self.rounds else 0

    @property
    def selected_test_ppl(self) -> float:
        """The test perplexity of the model the peer keeps: the selected round's, else the last round's."""
        return self.selected.test_ppl if self.selected is not None else self.final_test_ppl

    def to_json(self) -> dict:
        data = {"name": self.name, "rounds": [dataclasses.asdict(r) for r in self.rounds]}
        if self.selected is not None:
            data["selected"] = dataclasses.asdict(self.selected)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "PeerResult":
        selected = Selected(**data["selected"]) if data.get("selected") else None
        return cls(name=data["name"], rounds=[RoundRecord.from_dict(r) for r in data["rounds"]], selected=selected)
