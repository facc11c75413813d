"""What every benchmark here shares: one torch thread, quiet loading, interleaved timing.

The machine is shared with other busy processes, so absolute times swing. Each benchmark
therefore times its sides in one run, interleaved (A B A B ...), and compares medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from p2pfed.config import ExperimentConfig
from p2pfed.load import load_experiment

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPERIMENT = ROOT / "examples" / "default.toml"


def setup() -> None:
    """One thread, as the swarm runs; and no progress bars from Hugging Face in the output."""
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def default_config(*overrides: str) -> ExperimentConfig:
    return load_experiment(DEFAULT_EXPERIMENT, list(overrides))


def quiet(*_args, **_kwargs) -> None:
    """A `log` callback that drops messages (the base model is cached after the first load)."""


def interleaved(sides: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every side once per repetition, in turn, and collect its wall times in seconds.

    Warm-up runs (first-call allocations, lazy imports) are not counted. What a side returns is ignored.
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repetition in range(warmup + repeats):
        for name, side in sides.items():
            start = time.perf_counter()
            side()
            elapsed = time.perf_counter() - start
            if repetition >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
