"""The message format for adapter updates: msgpack with a strict schema and raw tensor bytes.

Everything a peer receives is untrusted. Decoding never runs pickle or torch.load (either
executes code chosen by the sender), caps sizes and nesting depth before msgpack parses
anything, bounds every number it passes on, and turns every kind of malformed input into a
`WireError`, so a transport can drop a bad message and carry on. Error messages never repr()
a received value: they name types and lengths, validated ints, and short escaped prefixes of
strings already checked to be strings.

Layout (msgpack, bin type on):
    {"v": 1, "sender": str, "round": int, "degree": int, "num_samples": int,
     "tensors": {name: {"dtype": "float32" | "float16" | "bfloat16", "shape": [int, ...], "data": bin}}}
`data` holds the tensor's elements in C order, little-endian. encode_update starts each `data` at a multiple
of 4 bytes into the message, and decode_update returns float32 tensors that view the received buffer there
instead of copies (p2pfed.net.tensor_codec): a received tensor is read-only, and its buffer lives as long as it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from p2pfed.config import NetworkConfig
from p2pfed.net import tensor_codec

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
# Containers nest at most 4 deep in the layout: message map > tensors map > entry map > shape array.
_MAX_DEPTH = 4

# torch.frombuffer reads native byte order and the format is little-endian; torch has no
# big-endian builds we run on, so refuse loudly rather than decode garbage.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("p2pfed.net.wire assumes a little-endian machine")


class WireError(ValueError):
    """A message is malformed, oversized, or does not match what the receiver expects."""


@dataclass(frozen=True)
class WireLimits:
    max_bytes: int = NetworkConfig.max_message_bytes  # checked before anything is parsed
    max_tensors: int = 4096
    max_name_length: int = 256  # characters, for the sender and for tensor names
    max_dims: int = 4
    # Largest |element| accepted; NaN and inf are always refused. LoRA factors are O(1): A starts
    # at Kaiming scale (|a| <= 1 / sqrt(fan_in)), B at zero, and trained values stay well under 10.
    # 1e4 leaves three orders of magnitude of headroom, yet a product B @ A (rank 64: at most
    # 64 * 1e8) summed over a million neighbours stays near 1e16, far below float32's 3.4e38,
    # so no aggregate overflows to inf.
    max_abs_value: float = 1e4
    max_degree: int = 1_000_000  # neighbours a peer can claim (Metropolis-Hastings weights)
    # Training tokens a peer can claim (data-size weights): 2**40 is about 1.1e12, more than any
    # one peer trains on, and a million such claims still sum below 2**63.
    max_num_samples: int = 2**40


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
    entries = []
    for name, tensor in message.tensors.items():
        if not isinstance(name, str) or not name:
            raise WireError(f"tensor name {name!r} must be a non-empty string")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise WireError(f"tensor {name!r} must be a floating-point torch.Tensor")
        wire = tensor.detach().to(device="cpu", dtype=wire_dtype).contiguous()
        # fp16 overflows to inf above 65504; the receiver would reject it, so fail here instead.
        if not bool(torch.isfinite(wire).all()):
            raise WireError(f"tensor {name!r} has non-finite values as {dtype_name}")
        # A uint8 view of the flat tensor gives its raw bytes for any dtype (bf16 included), joined below
        # without another copy.
        entries.append((name, list(wire.shape), memoryview(wire.reshape(-1).view(torch.uint8).numpy())))
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(_TOP_KEYS))]
    for key in ("v", "sender", "round", "degree", "num_samples"):
        parts += [packer.pack(key), packer.pack(VERSION if key == "v" else getattr(message, key))]
    parts += [packer.pack("tensors"), packer.pack_map_header(len(entries))]
    position = sum(map(len, parts))
    for name, shape, raw in entries:
        # Each tensor's data aligned in the message, so that receivers can view it where it lies.
        head = packer.pack(name)
        head += tensor_codec.entry_head(packer, dtype_name, shape, raw.nbytes, position + len(head))
        parts += [head, raw]
        position += len(head) + raw.nbytes
    return b"".join(parts)


# ---------------------------------------------------------------------------
# Decoding: untrusted bytes in, a validated UpdateMessage or a WireError out.

def decode_update(
    data: bytes,
    expected_shapes: Mapping[str, tuple[int | None, ...]] | None = None,
    limits: WireLimits = WireLimits(),
) -> UpdateMessage:
    try:
        return _decode(data, expected_shapes, limits)
    except WireError:
        raise
    # _decode's checks are meant to leave nothing else, but a receiver must be able to drop any
    # message with one except clause: whatever slips through (MemoryError, a torch ValueError, ...)
    # is still "this message is bad". Only the type is shown; its text may quote the input.
    except Exception as exc:
        raise WireError(f"malformed message ({type(exc).__name__})") from exc


def _decode(
    data: bytes,
    expected_shapes: Mapping[str, tuple[int | None, ...]] | None,
    limits: WireLimits,
) -> UpdateMessage:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")  # flat bytes, whatever the buffer's format
    if view.nbytes > limits.max_bytes:
        raise WireError(f"message is {view.nbytes} bytes, over the limit of {limits.max_bytes}")
    data_starts = _prescan(view, limits)
    obj = _unpack(view, limits)

    if not isinstance(obj, dict):
        raise WireError(f"message must be a map, got {type(obj).__name__}")
    _require_keys(obj, _TOP_KEYS, "message")
    version = obj["v"]
    if type(version) is not int or version != VERSION:
        raise WireError(f"unsupported version (expected int {VERSION}, got {_describe(version)})")
    sender = _require_name(obj["sender"], "sender", limits)
    round_index = _require_count(obj["round"], "round")
    degree = _require_count(obj["degree"], "degree", limits.max_degree)
    num_samples = _require_count(obj["num_samples"], "num_samples", limits.max_num_samples)

    entries = obj["tensors"]
    if not isinstance(entries, dict):
        raise WireError(f"tensors must be a map, got {type(entries).__name__}")
    if len(entries) > limits.max_tensors:
        raise WireError(f"{len(entries)} tensors, over the limit of {limits.max_tensors}")
    # Validate every entry before building any tensor: schema errors are cheap to find.
    specs = [_parse_entry(name, entry, limits) for name, entry in entries.items()]
    if expected_shapes is not None:
        _check_expected(specs, expected_shapes)

    # The pre-scan met the bin payloads in stream order; in a valid message they are the tensors' data, which
    # the tensors then view in place (tensor_codec). Any other bins: the data is copied.
    if len(data_starts) != len(specs):
        data_starts = [None] * len(specs)
    words = tensor_codec.payload_words(view) if specs else None
    # The receiver's own name strings, where it gave them: a message held until aggregation keeps no copies.
    own_names = {name: name for name in expected_shapes or ()}
    tensors = {}
    for (name, dtype, shape, raw), start in zip(specs, data_starts):
        tensor = tensor_codec.shared_tensor(view, words, start, raw, dtype, shape)
        problem = tensor_codec.value_problem(tensor, limits.max_abs_value)
        if problem:
            raise WireError(f"tensor {_quote(name)} {problem}")
        tensors[own_names.get(name, name)] = tensor
    return UpdateMessage(sender=sender, round=round_index, tensors=tensors, degree=degree, num_samples=num_samples)


# Pre-scan of the msgpack bytes. msgpack has no depth option: the C unpacker stops at its fixed
# stack of 1024 levels, the pure-Python fallback (MSGPACK_PUREPYTHON=1) at Python's recursion
# limit (fewer levels the deeper its caller), both with StackError, and below that they hand back
# objects nested deep enough to break recursive code after them (repr() of a 1,000-deep shape
# raised RecursionError). So the structure is walked first, without recursion or allocating
# anything: one step per object, str and bin payloads skipped by their declared length.
_SCALAR, _STR, _BIN, _ARRAY, _MAP, _REFUSED = range(6)


def _lead_byte_table() -> tuple[tuple[int, int, int], ...]:
    """For each first byte of a msgpack object: (kind, width, length).

    width: bytes of the scalar's payload (_SCALAR) or of the length that follows (0: the length is
    `length`, packed in the byte itself, for fixstr, fixarray and fixmap).
    """
    table = []
    for b in range(256):
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):  # fixints, nil, false, true
            entry = (_SCALAR, 0, 0)
        elif b <= 0x8F:
            entry = (_MAP, 0, b & 0x0F)
        elif b <= 0x9F:
            entry = (_ARRAY, 0, b & 0x0F)
        elif b <= 0xBF:
            entry = (_STR, 0, b & 0x1F)
        elif 0xC4 <= b <= 0xC6:
            entry = (_BIN, 1 << (b - 0xC4), 0)
        elif b in (0xCA, 0xCB):  # float32, float64
            entry = (_SCALAR, 4 if b == 0xCA else 8, 0)
        elif 0xCC <= b <= 0xD3:  # uint8..uint64, int8..int64
            entry = (_SCALAR, 1 << ((b - 0xCC) % 4), 0)
        elif 0xD9 <= b <= 0xDB:
            entry = (_STR, 1 << (b - 0xD9), 0)
        elif b in (0xDC, 0xDD):
            entry = (_ARRAY, 2 if b == 0xDC else 4, 0)
        elif b in (0xDE, 0xDF):
            entry = (_MAP, 2 if b == 0xDE else 4, 0)
        else:  # 0xC1 (never used) and the extension types, which the format does not use
            entry = (_REFUSED, 0, 0)
        table.append(entry)
    return tuple(table)


_LEAD_BYTES = _lead_byte_table()


def _max_str_len(limits: WireLimits) -> int:
    # Strings are capped in UTF-8 bytes (up to 4 per character); names are checked in characters
    # after unpacking, with a clearer message.
    return 4 * max(limits.max_name_length, _SCHEMA_KEY_LEN)


def _max_map_len(limits: WireLimits) -> int:
    return max(limits.max_tensors, len(_TOP_KEYS))


def _prescan(view: memoryview, limits: WireLimits) -> list[int]:
    """Check that `view` holds one msgpack object whose shape a valid message could have.

    Bounds depth, container and string lengths, and the number of objects (so the walk costs at
    most a few tens of thousands of steps, whatever the size), and checks every declared length
    against the bytes that are left, so the parser never allocates for a forged length.
    Returns where each bin payload starts, in stream order.
    """
    end = len(view)
    max_str = _max_str_len(limits)
    max_map = _max_map_len(limits)
    # The most objects a valid message holds: the message map, its 6 keys and 6 values, and per
    # tensor its name, its entry map, 3 keys, 3 values and the shape's dimensions.
    budget = 13 + limits.max_tensors * (8 + limits.max_dims)
    bin_starts = []
    pending = [1]  # objects still to read in each open container, the whole message outermost
    pos = 0
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        budget -= 1
        if budget < 0:
            raise WireError("message holds more msgpack objects than any valid update")
        if pos >= end:
            raise WireError("message is truncated")
        kind, width, length = _LEAD_BYTES[view[pos]]
        pos += 1
        if kind == _SCALAR:
            pos += width
            continue
        if kind == _REFUSED:
            raise WireError("message uses a msgpack extension type or the reserved byte 0xc1")
        if width:
            if pos + width > end:
                raise WireError("message is truncated")
            length = int.from_bytes(view[pos:pos + width], "big")
            pos += width
        if kind == _STR or kind == _BIN:
            cap = max_str if kind == _STR else limits.max_bytes
            if length > cap:
                raise WireError(f"{'str' if kind == _STR else 'bin'} of {length} bytes, over the limit of {cap}")
            if kind == _BIN:
                bin_starts.append(pos)
            pos += length
            continue
        if kind == _ARRAY and length > limits.max_dims:
            raise WireError(f"array of {length} items, over the limit of {limits.max_dims} (max_dims)")
        if kind == _MAP and length > max_map:
            raise WireError(f"map of {length} entries, over the limit of {max_map} (max_tensors)")
        if len(pending) > _MAX_DEPTH:
            raise WireError(f"message nests containers more than {_MAX_DEPTH} levels deep")
        items = length if kind == _ARRAY else 2 * length
        if items > end - pos:  # every item takes at least one byte
            raise WireError("message is truncated")
        if items:
            pending.append(items)
    # Skipped payloads may run past the end; one check here covers them all.
    if pos > end:
        raise WireError("message is truncated")
    if pos < end:
        raise WireError(f"{end - pos} bytes after the message")
    return bin_starts


def _unpack(view: memoryview, limits: WireLimits) -> Any:
    try:
        return msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            use_list=True,
            # The same caps as the pre-scan, should msgpack ever be called without it.
            max_str_len=_max_str_len(limits),
            max_bin_len=limits.max_bytes,
            max_map_len=_max_map_len(limits),
            max_array_len=limits.max_dims,
            max_ext_len=0,  # the format has no extension types
        )
    # After the pre-scan, what is left is mostly bad UTF-8 and non-str map keys; msgpack's
    # text can quote the input, so only the type is shown.
    except Exception as exc:
        raise WireError(f"not a valid msgpack message ({type(exc).__name__})") from exc


def _quote(text: str, keep: int = 96) -> str:
    """A short, escaped, one-line prefix of a received string (only ever called on a str).

    96 characters keep a real tensor name whole (GPT-2's are about 60).
    """
    return ascii(text[:keep]) + ("..." if len(text) > keep else "")


def _describe(value: Any) -> str:
    """A received value of unknown type, safe to log: a str as a short quoted prefix, anything else by type."""
    return _quote(value) if isinstance(value, str) else type(value).__name__


def _require_keys(obj: dict, expected: frozenset[str], where: str) -> None:
    keys = set(obj)
    if keys != expected:
        missing = sorted(expected - keys)
        unexpected = [_describe(key) for key in list(keys - expected)[:8]]
        more = f", ... ({len(keys - expected) - 8} more)" if len(keys - expected) > 8 else ""
        raise WireError(f"{where} keys wrong: missing {missing}, unexpected [{', '.join(sorted(unexpected))}{more}]")


def _require_count(value: Any, field: str, maximum: int | None = None) -> int:
    # bool is a subclass of int; a True round is a type error, not round 1.
    if type(value) is not int:
        raise WireError(f"{field} must be an int, got {type(value).__name__}")
    if value < 0:
        raise WireError(f"{field} must not be negative")
    if maximum is not None and value > maximum:
        raise WireError(f"{field} is over the limit of {maximum}")
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
    where = f"tensor {_quote(name)}"
    if not isinstance(entry, dict):
        raise WireError(f"{where} must be a map, got {type(entry).__name__}")
    _require_keys(entry, _TENSOR_KEYS, where)
    dtype_name, shape, raw = entry["dtype"], entry["shape"], entry["data"]
    if not isinstance(dtype_name, str) or dtype_name not in _WIRE_DTYPES:
        raise WireError(f"{where}: dtype {_describe(dtype_name)} is not one of {', '.join(_WIRE_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > limits.max_dims:
        raise WireError(f"{where}: shape must be a list of at most {limits.max_dims} ints, got {type(shape).__name__}")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise WireError(f"{where}: shape must hold non-negative ints, got {type(dim).__name__}")
    # With a zero dimension the other dimensions are unconstrained by the data length;
    # cap them anyway so torch never sees a shape whose strides overflow.
    if math.prod(max(dim, 1) for dim in shape) > limits.max_bytes:
        raise WireError(f"{where}: shape is too large")
    if not isinstance(raw, bytes):
        raise WireError(f"{where}: data must be bin, got {type(raw).__name__}")
    dtype = _WIRE_DTYPES[dtype_name]
    expected_len = math.prod(shape) * dtype.itemsize
    # From here on the shape is a short list of bounded ints: safe to show.
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
            raise WireError(f"tensor {_quote(name)} has shape {list(shape)}, expected {list(expected)}")


def _preview(names: list[str], keep: int = 8) -> str:
    # A hostile message can carry thousands of names; the error only needs a few.
    shown = ", ".join(map(_quote, names[:keep]))
    more = f", ... ({len(names) - keep} more)" if len(names) > keep else ""
    return f"[{shown}{more}]"
