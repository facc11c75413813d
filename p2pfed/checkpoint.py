"""A peer's resumable state on disk: adapter, optimizers, batch streams, trust, round and history.

Layout of a checkpoint folder (it may be the peer's state folder; only these names are touched):

    CURRENT                  the name of the committed generation folder; written last, by an atomic rename
    ckpt-<round>-<hex>/      one generation: tensors.safetensors + state.json (written last inside it)

Saving writes a fresh generation folder, fsyncs it, then renames a new CURRENT over the old one. A directory
cannot be renamed over a non-empty one, so swapping folders by renames leaves a moment with neither at the
final name; swapping the one-line pointer file is a single atomic step. A crash at any point therefore leaves
CURRENT naming the old or the new complete generation; other ckpt-* folders are leftovers, ignored on load
and removed by the next save.

No pickle and no torch.load: tensors go to safetensors, everything else to JSON, where a tensor is
{"$tensor": key}, a tuple {"$tuple": [...]}, and a dict with non-string keys (optimizer state is keyed by
parameter index) {"$dict": [[key, value], ...]}, so optimizer state dicts round-trip exactly, tuples included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from p2pfed.data import BatchStreamState

FORMAT_VERSION = 1
_KIND = "p2pfed-peer-checkpoint"
_CURRENT = "CURRENT"
_TENSORS = "tensors.safetensors"
_STATE = "state.json"
_GENERATION = re.compile(r"ckpt-\d+-[0-9a-f]+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back: corrupt, partial, or from another format version."""


@dataclass(eq=False)  # eq=False: tensors have no single truth value to compare by
class PeerCheckpoint:
    round: int  # the last completed round
    steps: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the whole adapter state, shared and local
    optimizers: dict[str, dict] = field(default_factory=dict)  # name -> torch optimizer state_dict()
    streams: dict[str, BatchStreamState] = field(default_factory=dict)  # e.g. "train", "val"
    trust: dict[str, float] = field(default_factory=dict)  # the last aggregation weights
    history: list[dict] = field(default_factory=list)  # JSON-able round records
    meta: dict = field(default_factory=dict)  # JSON-able: peer name, config hash, ...


def save_checkpoint(directory: str | os.PathLike, checkpoint: PeerCheckpoint) -> Path:
    """Atomically make `checkpoint` the one in `directory`; returns the generation folder written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    streams = {name: {"generator": s.generator, "permutation": s.permutation, "position": s.position,
                      "num_blocks": s.num_blocks} for name, s in checkpoint.streams.items()}
    document = {
        "kind": _KIND, "format": FORMAT_VERSION, "round": int(checkpoint.round), "steps": int(checkpoint.steps),
        "trust": {str(k): float(v) for k, v in checkpoint.trust.items()},
        **{name: _encode(value, name, tensors) for name, value in [
            ("tensors", checkpoint.tensors), ("optimizers", checkpoint.optimizers), ("streams", streams),
            ("history", checkpoint.history), ("meta", checkpoint.meta)]},
    }
    blob = safetensors.torch.save(tensors)
    document["tensors_sha256"] = hashlib.sha256(blob).hexdigest()  # catches truncation and bit rot on load
    text = json.dumps(document, indent=1, allow_nan=True).encode("utf-8")

    folder = directory / f"ckpt-{int(checkpoint.round):06d}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    _write(folder / _TENSORS, blob)
    _write(folder / _STATE, text)
    _fsync_dir(folder)
    pointer = directory / f"{_CURRENT}.tmp"
    _write(pointer, folder.name.encode("utf-8"))
    os.replace(pointer, directory / _CURRENT)  # the commit point
    _fsync_dir(directory)
    for old in directory.iterdir():
        if old != folder and _GENERATION.fullmatch(old.name) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)  # a leftover is harmless; never fail a committed save
    return folder


def load_checkpoint(directory: str | os.PathLike) -> PeerCheckpoint | None:
    """The committed checkpoint in `directory`, or None when none was ever committed there."""
    directory = Path(directory)
    try:
        name = (directory / _CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None  # also after a crash during the very first save: its folder was never committed
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{directory / _CURRENT}: unreadable ({error})") from error
    folder = directory / name
    if not _GENERATION.fullmatch(name) or not folder.is_dir():
        raise CheckpointError(f"{directory / _CURRENT} names {name!r}, which is not a checkpoint folder in "
                              f"{directory}; the checkpoint is damaged (move the folder away to start afresh)")
    try:
        document = json.loads((folder / _STATE).read_bytes())
        blob = (folder / _TENSORS).read_bytes()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: missing or unreadable checkpoint file ({error})") from error
    if not isinstance(document, dict) or document.get("kind") != _KIND:
        raise CheckpointError(f"{folder / _STATE}: not a p2pfed peer checkpoint")
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format version {document.get('format')!r}, but this p2pfed "
                              f"reads version {FORMAT_VERSION}; resume with the version that wrote it, or move "
                              f"the folder away to start afresh")
    if hashlib.sha256(blob).hexdigest() != document.get("tensors_sha256"):
        raise CheckpointError(f"{folder / _TENSORS}: contents do not match the checksum in {_STATE} "
                              f"(truncated or corrupted on disk)")
    try:
        if not all(type(document[k]) is int for k in ("round", "steps")):
            raise TypeError("round and steps must be integers")
        tensors = safetensors.torch.load(blob)
        streams = _decode(document["streams"], tensors)
        return PeerCheckpoint(
            round=document["round"], steps=document["steps"], trust=document["trust"],
            tensors=_decode(document["tensors"], tensors), optimizers=_decode(document["optimizers"], tensors),
            streams={name: BatchStreamState(**fields) for name, fields in streams.items()},
            history=_decode(document["history"], tensors), meta=_decode(document["meta"], tensors),
        )
    except (KeyError, TypeError, ValueError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{folder}: damaged checkpoint ({type(error).__name__}: {error})") from error


# -- JSON with tensors by reference ------------------------------------------------------------------------

def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, its tensors moved into `tensors` under keys named by their path ("optimizers/adapter/...")."""
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"checkpoint: two tensors would be stored as {path!r}; avoid '/' in names")
        # A CPU copy with its own storage: safetensors refuses tensors that share memory.
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": path}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint: {path} has a key that is neither str nor int")
        return {"$dict": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: cannot store {path} of type {type(value).__name__} (JSON values and tensors only)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            return tensors[value["$tensor"]]
        if set(value) == {"$tuple"}:
            return tuple(_decode(v, tensors) for v in value["$tuple"])
        if set(value) == {"$dict"}:
            return {k: _decode(v, tensors) for k, v in value["$dict"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


# -- durable writes -----------------------------------------------------------------------------------------

def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the new names (files in a folder, CURRENT's rename) durable; POSIX only, Windows has no such call.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
