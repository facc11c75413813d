"""Text per group -> token ids -> each peer's disjoint train / validation / test blocks.

Groups are the unit of heterogeneity (one language each in the built-in corpus). A peer draws its
blocks from the groups according to its mixture; no block is ever given out twice, across peers
and splits, so a peer's test text is never another peer's training text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from p2pfed.config import ConfigError, DataConfig

SPLITS = ("train", "val", "test")
_PRETRAIN_FILE = "pretrain.txt"


class ByteTokenizer:
    """UTF-8 bytes as token ids: a 256-token vocabulary that needs no download and keeps small models fast."""

    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A block boundary can cut a multi-byte character in two: replace, never raise.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Text sources.

def builtin_corpus_dir() -> Path:
    return Path(__file__).resolve().parent / "corpus"


def load_group_texts(source: str, groups: Sequence[str]) -> dict[str, str]:
    """The text of each group, from the built-in corpus or from a folder (see DataConfig.source)."""
    _check_unique(groups)
    if source == "builtin":
        root = builtin_corpus_dir()
        available = sorted(p.stem for p in root.glob("*.txt") if p.name != _PRETRAIN_FILE)
        texts = {}
        for group in groups:
            if group not in available:
                raise ConfigError(f"data.groups: no built-in group {group!r} (available: {', '.join(available)})")
            texts[group] = _read(root / f"{group}.txt")
        return texts

    root = Path(source).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.source: {source!r} is neither 'builtin' nor a folder")
    available = sorted({p.name for p in root.iterdir() if p.is_dir()} | {p.stem for p in root.glob("*.txt")})
    return {group: _read_group(root, group, available) for group in groups}


def _read_group(root: Path, group: str, available: list[str]) -> str:
    folder, file = root / group, root / f"{group}.txt"
    if folder.is_dir() and file.is_file():
        raise ConfigError(f"data.groups: {group!r} is both {folder} and {file}; keep one")
    if not folder.is_dir() and not file.is_file():
        raise ConfigError(f"data.groups: no group {group!r} in {root} (neither a sub-folder nor {group}.txt; "
                          f"available: {', '.join(available) or 'none'})")
    return read_text_source(folder if folder.is_dir() else file, "data.groups")


def read_text_source(path: Path, key: str = "data") -> str:
    """A .txt file, or every .txt file of a folder (sorted, joined by blank lines); `key` names the setting."""
    path = Path(path).expanduser()
    if path.is_dir():
        parts = sorted(path.glob("*.txt"))
        if not parts:
            raise ConfigError(f"{key}: {path} holds no .txt files")
        text = "\n\n".join(_read(p).strip("\n") for p in parts) + "\n"
    elif path.is_file():
        text = _read(path)
    else:
        raise ConfigError(f"{key}: {path} is neither a .txt file nor a folder")
    if not text.strip():
        raise ConfigError(f"{key}: {path} has no text")
    return text


def load_pretrain_text() -> str:
    """Generic text for pretraining the tiny base model: other languages than any built-in group."""
    return _read(builtin_corpus_dir() / _PRETRAIN_FILE)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error})") from error


def _check_unique(groups: Sequence[str]) -> None:
    duplicates = sorted({g for g in groups if list(groups).count(g) > 1})
    if duplicates:
        raise ConfigError(f"data.groups: {', '.join(duplicates)} listed more than once")


def tokenize_groups(texts: Mapping[str, str], encode: Callable[[str], list[int]]) -> dict[str, torch.Tensor]:
    return {group: torch.tensor(encode(text), dtype=torch.int64) for group, text in texts.items()}


# ---------------------------------------------------------------------------
# Splitting into peers.

@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare by
class PeerData:
    name: str
    train: torch.Tensor  # (n_train, block_len) int64
    val: torch.Tensor
    test: torch.Tensor
    mixture: dict[str, float]  # every group of data.groups, in order; proportions sum to 1

    @property
    def group(self) -> str:
        """The dominant group; ties go to the group listed first."""
        return max(self.mixture, key=lambda g: self.mixture[g])


def peer_groups(num_peers: int, groups: Sequence[str]) -> list[str]:
    """Contiguous assignment: with 8 peers and 2 groups, peers 0-3 get the first group, 4-7 the second."""
    return [groups[i * len(groups) // num_peers] for i in range(num_peers)]


def make_peer_data(tokens: Mapping[str, torch.Tensor], num_peers: int, config: DataConfig,
                   seed: int) -> list[PeerData]:
    """Disjoint blocks for every peer and split, drawn by each peer's mixture; same seed, same tensors."""
    groups = list(config.groups)
    _check_unique(groups)
    if num_peers < 1:
        raise ConfigError("num_peers: must be at least 1")
    missing = [g for g in groups if g not in tokens]
    if missing:
        raise ConfigError(f"data.groups: no tokens for {', '.join(missing)} (have: {', '.join(tokens)})")

    generator = torch.Generator().manual_seed(seed)
    blocks = {g: _cut_blocks(tokens[g], config.block_len) for g in groups}
    # One shuffled order per group; peers then take consecutive runs of it, so no block repeats.
    order = {g: torch.randperm(len(blocks[g]), generator=generator) for g in groups}

    mixtures = _mixtures(num_peers, groups, config, seed)
    sizes = {"train": config.train_blocks, "val": config.val_blocks, "test": config.test_blocks}
    counts = [{split: dict(zip(groups, _largest_remainder([m[g] for g in groups], sizes[split])))
               for split in SPLITS} for m in mixtures]
    _check_enough(blocks, counts, num_peers, config)

    cursor = dict.fromkeys(groups, 0)
    peers = []
    for i, (mixture, count) in enumerate(zip(mixtures, counts)):
        split_blocks = {}
        for split in SPLITS:
            parts = []
            for g in groups:
                n = count[split][g]
                parts.append(blocks[g][order[g][cursor[g]:cursor[g] + n]])
                cursor[g] += n
            rows = torch.cat(parts)
            # Interleave the groups so that any prefix of a split (a small validation batch) follows the mixture.
            split_blocks[split] = rows[torch.randperm(len(rows), generator=generator)]
        peers.append(PeerData(name=f"peer{i}", mixture=mixture, **split_blocks))
    return peers


def _cut_blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    n = len(stream) // block_len  # the tail shorter than a block is dropped
    return stream[: n * block_len].reshape(n, block_len)


def _mixtures(num_peers: int, groups: list[str], config: DataConfig, seed: int) -> list[dict[str, float]]:
    if config.split == "dirichlet":
        # numpy, not torch.distributions: the latter takes no generator, and global RNG is off limits.
        draws = np.random.default_rng(seed).dirichlet([config.dirichlet_alpha] * len(groups), size=num_peers)
        return [{g: float(p) for g, p in zip(groups, row)} for row in draws]
    if config.split not in ("specific", "mixed"):
        raise ConfigError(f"data.split: unknown split {config.split!r}")
    mixtures = []
    for own in peer_groups(num_peers, groups):
        weights = dict.fromkeys(groups, 0.0)
        if config.split == "specific":
            weights[own] = 1.0
        else:
            other = groups[(groups.index(own) + 1) % len(groups)]
            weights[own] += config.own_fraction
            weights[other] += 1.0 - config.own_fraction  # the own group again when it is the only one
        mixtures.append(weights)
    return mixtures


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """Integer counts summing to total, each as close to its share as possible (ties to the first)."""
    weight_sum = sum(weights)
    quotas = [w / weight_sum * total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _check_enough(blocks: Mapping[str, torch.Tensor], counts: list[dict[str, dict[str, int]]],
                  num_peers: int, config: DataConfig) -> None:
    needed = {g: sum(c[split][g] for c in counts for split in SPLITS) for g in blocks}
    short = [g for g in blocks if needed[g] > len(blocks[g])]
    if not short:
        return
    table = ", ".join(f"{g}: {len(blocks[g])} available, {needed[g]} needed" for g in blocks)
    raise ConfigError(
        f"data: not enough text in group {', '.join(map(repr, short))} for {num_peers} peers "
        f"(blocks of {config.block_len} tokens; {table}). Lower data.train_blocks ({config.train_blocks}), "
        f"data.val_blocks ({config.val_blocks}), data.test_blocks ({config.test_blocks}), num_peers "
        f"or data.block_len, or give the group more text."
    )


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare by
class BatchStreamState:
    """Where a BatchStream stands: enough to continue its exact batch sequence in another process."""

    generator: torch.Tensor  # the stream's torch.Generator state (uint8), after drawing `permutation`
    permutation: torch.Tensor | None  # the current epoch's block order (int64, CPU); None before the first batch
    position: int  # index in `permutation` of the next batch's first block
    num_blocks: int  # checked on restore: a state only fits a stream over as many blocks

    def __post_init__(self) -> None:
        # Checked here so that a damaged checkpoint fails when it is read, not batches later.
        if self.generator.dtype != torch.uint8 or self.generator.dim() != 1:
            raise ValueError("BatchStreamState.generator must be a 1-D uint8 tensor (torch.Generator.get_state())")
        if not (isinstance(self.position, int) and isinstance(self.num_blocks, int)):
            raise ValueError("BatchStreamState.position and num_blocks must be integers")
        if self.num_blocks < 1:
            raise ValueError(f"BatchStreamState.num_blocks must be at least 1, got {self.num_blocks}")
        if self.permutation is None:
            if self.position != 0:
                raise ValueError("BatchStreamState.position must be 0 before the first epoch")
            return
        if (self.permutation.dtype != torch.int64 or self.permutation.shape != (self.num_blocks,)
                or not torch.equal(self.permutation.sort().values, torch.arange(self.num_blocks))):
            raise ValueError(f"BatchStreamState.permutation must be a permutation of {self.num_blocks} block indices")
        if not 0 <= self.position <= self.num_blocks:
            raise ValueError(f"BatchStreamState.position {self.position} is outside 0..{self.num_blocks}")


class BatchStream(Iterator[torch.Tensor]):
    """Endless mini-batches; each epoch visits every block once in a fresh order (the last batch may be short).

    Resumable: `state()` snapshots it and `restore()` continues the same sequence, so a restarted peer trains
    on the batches it would have seen. The stream owns `generator`: drawing from it elsewhere changes the order.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, generator: torch.Generator):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(blocks) == 0:
            raise ValueError("batches() needs at least one block")
        self.blocks, self.batch_size, self.generator = blocks, batch_size, generator
        self._permutation: torch.Tensor | None = None  # on blocks.device; drawn lazily, as the old generator did
        self._position = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._permutation is None or self._position >= len(self.blocks):
            # Drawn at the first batch of an epoch, not after the last of the previous one: the same
            # generator draws as the generator function this replaces, hence the same batches.
            self._permutation = torch.randperm(len(self.blocks), generator=self.generator).to(self.blocks.device)
            self._position = 0
        start = self._position
        self._position += self.batch_size
        return self.blocks[self._permutation[start:self._position]]

    def state(self) -> BatchStreamState:
        permutation = None if self._permutation is None else self._permutation.to("cpu", copy=True)
        return BatchStreamState(self.generator.get_state(), permutation, min(self._position, len(self.blocks)),
                                len(self.blocks))

    def restore(self, state: BatchStreamState) -> None:
        """Continue from `state` (taken from a stream over the same blocks); sets the generator's state too."""
        if state.num_blocks != len(self.blocks):
            raise ValueError(f"cannot restore a batch stream over {state.num_blocks} blocks into one over "
                             f"{len(self.blocks)} blocks")
        try:
            self.generator.set_state(state.generator.clone())
        except RuntimeError as error:
            raise ValueError(f"BatchStreamState.generator does not fit this generator: {error}") from error
        self._permutation = None if state.permutation is None else state.permutation.to(self.blocks.device, copy=True)
        self._position = state.position


def batches(blocks: torch.Tensor, batch_size: int, generator: torch.Generator) -> BatchStream:
    """Endless, resumable mini-batches over `blocks` (see BatchStream)."""
    return BatchStream(blocks, batch_size, generator)
