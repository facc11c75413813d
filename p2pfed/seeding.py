"""Seeds derived from a base seed and names, so that no result depends on global RNG state."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for (seed, *parts): the same on every machine and in every process."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def uniform(seed: int, *parts: object) -> float:
    """A uniform draw in [0, 1) that depends only on its arguments (not on call order)."""
    return derive_seed(seed, *parts) / float(1 << 63)
