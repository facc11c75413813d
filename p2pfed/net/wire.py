"""The message format for adapter updates: msgpack with a strict schema and raw tensor bytes.

Everything a peer receives is untrusted. Decoding never runs pickle or torch.load (either
executes code chosen by the sender), caps sizes before allocating, and turns every kind of
malformed input into a `WireError`, so a transport can drop a bad message and carry on.

Layout (msgpack, bin type on):
    {"v": 1, "sender": str, "round": int, "degree": int, "num_samples": int,
     "tensors": {name: {"dtype": "float32" | "float16" | "bfloat16", "shape": [int, ...], "data": bin}}}
`data` holds the tensor's elements in C order, little-endian.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

VERSION = 1
ENCODINGS = ("fp32", "fp16", "bf16")

# encoding name -> (dtype name on the wire, torch dtype)
_ENCODING_DTYPES = {
    "fp32": ("float32", torch.float32),
    "fp16": ("float16", torch.float16),
    "bf16": ("bfloat16", torch.bfloat16),
}
_WIRE_DTYPES = {name: dtype for name, dtype in _ENCODING_DTYPES.values()}
_TOP_KEYS = frozenset({"v", "sender", "round", "degree", "num_samples", "tensors"})
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
_SCHEMA_KEY_LEN = max(len(k) for k in (*_TOP_KEYS, *_TENSOR_KEYS, *_WIRE_DTYPES))

# torch.frombuffer reads native byte order and the format is little-endian; torch has no
# big-endian builds we run on, so refuse loudly rather than decode garbage.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("p2pfed.net.wire assumes a little-endian machine")


class WireError(ValueError):
    """A message is malformed, oversized, or does not match what the receiver expects."""


@dataclass(frozen=True)
class WireLimits:
    max_bytes: int = 256 * 1024 * 1024  # checked before anything is parsed
    max_tensors: int = 4096
    max_name_length: int = 256  # characters, for the sender and for tensor names
    max_dims: int = 4


@dataclass(frozen=True)
class UpdateMessage:
    sender: str  # peer name
    round: int  # >= 0
    tensors: dict[str, torch.Tensor]
    degree: int = 0  # sender's number of neighbours (lets receivers compute Metropolis-Hastings weights)
    num_samples: int = 0  # sender's training tokens (for data-size weighting)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Raw fp32 payload size, the baseline for overhead ratios."""
    return sum(t.numel() * 4 for t in tensors.values())


# ---------------------------------------------------------------------------
# Encoding: our own messages, so errors here are bugs in the caller; still WireError, so a
# message the receiver would reject (NaN, fp16 overflow) is caught where it is made.

def encode_update(message: UpdateMessage, encoding: str = "fp32") -> bytes:
    if encoding not in _ENCODING_DTYPES:
        raise WireError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    dtype_name, wire_dtype = _ENCODING_DTYPES[encoding]
    if not isinstance(message.sender, str) or not message.sender:
        raise WireError("sender must be a non-empty string")
    for field in ("round", "degree", "num_samples"):
        _require_count(getattr(message, field), field)
    tensors = {}
    for name, tensor in message.tensors.items():
        if not isinstance(name, str) or not name:
            raise WireError(f"tensor name {name!r} must be a non-empty string")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise WireError(f"tensor {name!r} must be a floating-point torch.Tensor")
        wire = tensor.detach().to(device="cpu", dtype=wire_dtype).contiguous()
        # fp16 overflows to inf above 65504; the receiver would reject it, so fail here instead.
        if not bool(torch.isfinite(wire).all()):
            raise WireError(f"tensor {name!r} has non-finite values as {dtype_name}")
        # A uint8 view of the flat tensor gives its raw bytes for any dtype (bf16 included),
        # and msgpack packs the memoryview without another copy.
        raw = memoryview(wire.reshape(-1).view(torch.uint8).numpy())
        tensors[name] = {"dtype": dtype_name, "shape": list(wire.shape), "data": raw}
    return msgpack.packb(
        {
            "v": VERSION,
            "sender": message.sender,
            "round": message.round,
            "degree": message.degree,
            "num_samples": message.num_samples,
            "tensors": tensors,
        },
        use_bin_type=True,
    )


# ---------------------------------------------------------------------------
# Decoding: untrusted bytes in, a validated UpdateMessage or a WireError out.

def decode_update(
    data: bytes,
    expected_shapes: Mapping[str, tuple[int | None, ...]] | None = None,
    limits: WireLimits = WireLimits(),
) -> UpdateMessage:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > limits.max_bytes:
        raise WireError(f"message is {size} bytes, over the limit of {limits.max_bytes}")
    obj = _unpack(data, limits)

    if not isinstance(obj, dict):
        raise WireError(f"message must be a map, got {type(obj).__name__}")
    _require_keys(obj, _TOP_KEYS, "message")
    version = obj["v"]
    if type(version) is not int or version != VERSION:
        raise WireError(f"unsupported version {version!r} (expected {VERSION})")
    sender = _require_name(obj["sender"], "sender", limits)
    counts = {field: _require_count(obj[field], field) for field in ("round", "degree", "num_samples")}

    entries = obj["tensors"]
    if not isinstance(entries, dict):
        raise WireError(f"tensors must be a map, got {type(entries).__name__}")
    if len(entries) > limits.max_tensors:
        raise WireError(f"{len(entries)} tensors, over the limit of {limits.max_tensors}")
    # Validate every entry before building any tensor: schema errors are cheap to find.
    specs = [_parse_entry(name, entry, limits) for name, entry in entries.items()]
    if expected_shapes is not None:
        _check_expected(specs, expected_shapes)

    tensors = {}
    for name, dtype, shape, raw in specs:
        tensor = _build_tensor(dtype, shape, raw)
        if not bool(torch.isfinite(tensor).all()):
            raise WireError(f"tensor {name!r} has non-finite values (NaN or inf)")
        tensors[name] = tensor
    return UpdateMessage(sender=sender, tensors=tensors, **counts)


def _unpack(data: bytes | bytearray | memoryview, limits: WireLimits) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            # Caps from the limits, so a forged length prefix cannot make msgpack allocate.
            # Strings are capped in UTF-8 bytes (up to 4 per character); names are checked
            # in characters afterwards, with a clearer message.
            max_str_len=4 * max(limits.max_name_length, _SCHEMA_KEY_LEN),
            max_bin_len=limits.max_bytes,
            max_map_len=max(limits.max_tensors, len(_TOP_KEYS)),
            max_array_len=limits.max_dims,
            max_ext_len=0,  # the format has no extension types
        )
    # msgpack raises ExtraData, FormatError, StackError, ValueError (OutOfData, bad UTF-8,
    # limits), TypeError and more; for a pure parse of untrusted bytes each means "malformed".
    except Exception as exc:
        raise WireError(f"not a valid msgpack message: {type(exc).__name__}: {exc}") from exc


def _require_keys(obj: dict, expected: frozenset[str], where: str) -> None:
    keys = set(obj)
    if keys != expected:
        missing = sorted(expected - keys)
        unexpected = sorted(map(repr, keys - expected))
        raise WireError(f"{where} keys wrong: missing {missing}, unexpected [{', '.join(unexpected)}]")


def _require_count(value: Any, field: str) -> int:
    # bool is a subclass of int; a True round is a type error, not round 1.
    if type(value) is not int:
        raise WireError(f"{field} must be an int, got {type(value).__name__}")
    if value < 0:
        raise WireError(f"{field} must not be negative, got {value}")
    return value


def _require_name(value: Any, field: str, limits: WireLimits) -> str:
    if not isinstance(value, str):
        raise WireError(f"{field} must be a string, got {type(value).__name__}")
    if not value:
        raise WireError(f"{field} must not be empty")
    if len(value) > limits.max_name_length:
        raise WireError(f"{field} is {len(value)} characters, over the limit of {limits.max_name_length}")
    return value


def _parse_entry(name: Any, entry: Any, limits: WireLimits) -> tuple[str, torch.dtype, tuple[int, ...], bytes]:
    name = _require_name(name, "tensor name", limits)
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise WireError(f"{where} must be a map, got {type(entry).__name__}")
    _require_keys(entry, _TENSOR_KEYS, where)
    dtype_name, shape, raw = entry["dtype"], entry["shape"], entry["data"]
    if not isinstance(dtype_name, str) or dtype_name not in _WIRE_DTYPES:
        raise WireError(f"{where}: dtype {dtype_name!r} is not one of {', '.join(_WIRE_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > limits.max_dims:
        raise WireError(f"{where}: shape must be a list of at most {limits.max_dims} ints, got {shape!r}")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise WireError(f"{where}: shape {shape!r} must hold non-negative ints")
    # With a zero dimension the other dimensions are unconstrained by the data length;
    # cap them anyway so torch never sees a shape whose strides overflow.
    if math.prod(max(dim, 1) for dim in shape) > limits.max_bytes:
        raise WireError(f"{where}: shape {shape!r} is too large")
    if not isinstance(raw, bytes):
        raise WireError(f"{where}: data must be bin, got {type(raw).__name__}")
    dtype = _WIRE_DTYPES[dtype_name]
    expected_len = math.prod(shape) * dtype.itemsize
    if len(raw) != expected_len:
        raise WireError(f"{where}: data is {len(raw)} bytes, shape {shape} as {dtype_name} needs {expected_len}")
    return name, dtype, tuple(shape), raw


def _check_expected(specs: list, expected_shapes: Mapping[str, tuple[int | None, ...]]) -> None:
    names = {name for name, *_ in specs}
    missing = sorted(set(expected_shapes) - names)
    unexpected = sorted(names - set(expected_shapes))
    if missing or unexpected:
        raise WireError(f"tensor names do not match: missing {_preview(missing)}, unexpected {_preview(unexpected)}")
    for name, _, shape, _ in specs:
        expected = tuple(expected_shapes[name])
        # None leaves a dimension free: a neighbour's LoRA rank when ranks may differ (FlexLoRA).
        if len(shape) != len(expected) or any(e is not None and e != d for e, d in zip(expected, shape)):
            raise WireError(f"tensor {name!r} has shape {list(shape)}, expected {list(expected_shapes[name])}")


def _preview(names: list[str], keep: int = 8) -> str:
    # A hostile message can carry thousands of names; the error only needs a few.
    shown = ", ".join(map(repr, names[:keep]))
    more = f", ... ({len(names) - keep} more)" if len(names) > keep else ""
    return f"[{shown}{more}]"


def _build_tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    if not raw:
        return torch.zeros(shape, dtype=torch.float32)  # frombuffer refuses empty buffers
    # bytes are immutable and torch.frombuffer would share them; one copy into a bytearray
    # gives a writable buffer the tensor owns (fp32 then needs no further copy).
    tensor = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    return tensor if dtype == torch.float32 else tensor.to(torch.float32)
