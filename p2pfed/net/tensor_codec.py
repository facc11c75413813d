"""Where a tensor's bytes sit in an update message, and the tensors a receiver builds from them.

A peer on a complete graph of N peers holds N-1 neighbours' updates until it aggregates, and an in-process
swarm hands the same payload object to each of a sender's N-1 receivers. Built as copies, the updates of
one round would take N(N-1) update sizes; built as views of the received buffer, N (and each receiver's
tensor objects, about 0.6 KB per tensor). So the encoder puts
every tensor's data at a multiple of ALIGN bytes into the message, and the receiver views fp32 data where
it lies instead of copying it. The views are read-only by contract: nothing may write into a received
tensor (torch cannot mark a tensor read-only; tests/test_shared_updates.py checks every scheme).

Alignment costs a few bytes: the tensor entry's "data" and "dtype" keys may use a longer msgpack str header
than the shortest (str8 or str16 for a short string: valid msgpack that every decoder reads), and the data
always takes a bin32 header. Any other encoding of the same layout stays valid: data that sits misaligned,
or cannot be matched to its place in the buffer, is copied, as every tensor was before.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import msgpack
import torch

# Bytes a tensor's data is aligned to, from the start of the message (Python allocates a bytes object's
# data, and the libp2p endpoint's frame bodies, at 16-byte boundaries): 4, the size of the widest dtype.
ALIGN = 4
_BIN32 = b"\xc6"  # then the length in 4 bytes, big-endian
_TOO_LONG = 32  # the longest string a fixstr holds, plus one


def _str(text: str, extra: int) -> bytes:
    """`text` (under 32 bytes of UTF-8) as msgpack, with a header `extra` bytes (0, 1 or 2) longer than the shortest."""
    raw = text.encode()
    assert len(raw) < _TOO_LONG and extra in (0, 1, 2)
    header = (bytes([0xA0 | len(raw)]), bytes([0xD9, len(raw)]), bytes([0xDA, 0, len(raw)]))[extra]
    return header + raw


def entry_head(packer: msgpack.Packer, dtype_name: str, shape: Sequence[int], data_len: int, position: int) -> bytes:
    """One tensor entry's msgpack bytes up to its data, the map {"dtype", "shape", "data"}.

    `position` is where the entry starts in the message; the data that follows the returned bytes starts
    at a multiple of ALIGN.
    """
    middle = packer.pack(dtype_name) + _str("shape", 0) + packer.pack(list(shape))
    bin_header = _BIN32 + data_len.to_bytes(4, "big")
    unpadded = 1 + len(_str("dtype", 0)) + len(middle) + len(_str("data", 0)) + len(bin_header)
    pad = -(position + unpadded) % ALIGN
    data_extra = min(pad, 2)
    return (b"\x83" + _str("dtype", pad - data_extra) + middle + _str("data", data_extra) + bin_header)


def payload_words(buffer: memoryview) -> torch.Tensor | None:
    """The whole received `buffer` as one float32 tensor for the message's tensors to view, or None where the
    buffer does not start 4-byte aligned. One tensor, one storage per message: each of its tensors is then a
    slice (about 570 bytes of tensor object; a torch.frombuffer of its own took about 900 bytes more)."""
    if buffer.nbytes < ALIGN:
        return None
    with warnings.catch_warnings():
        # torch warns, once per process, that a tensor over a read-only buffer (bytes) could write into it:
        # these views are read-only by contract, which tests check.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        words = torch.frombuffer(buffer, dtype=torch.float32, count=buffer.nbytes // ALIGN)
    return words if words.data_ptr() % ALIGN == 0 else None


def shared_tensor(buffer: memoryview, words: torch.Tensor | None, start: int | None, raw: bytes,
                  dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor that `raw` holds (a tensor entry's data, as msgpack unpacked it).

    `start` is where the pre-scan found that data in the received `buffer`, `words` that buffer (payload_words).
    Where the data is there, aligned and the same bytes, a float32 tensor is a view of the buffer (no copy: the
    buffer lives as long as the tensor), and a half-precision one is converted straight from it; otherwise
    `raw` is copied, as every tensor was before.
    """
    if not raw:
        return torch.zeros(shape, dtype=torch.float32)  # frombuffer refuses empty buffers
    tensor = _view(buffer, words, start, raw, dtype) if words is not None and start is not None else None
    if tensor is None:
        # bytes are immutable and torch.frombuffer would share them; a bytearray is a buffer the tensor owns.
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype)
    tensor = tensor.view(shape)
    return tensor if dtype == torch.float32 else tensor.to(torch.float32)


def _view(buffer: memoryview, words: torch.Tensor, start: int, raw: bytes, dtype: torch.dtype) -> torch.Tensor | None:
    end = start + len(raw)
    # The pre-scan's offsets and msgpack's values are matched by order; a message with duplicate keys could
    # pair them wrongly, so the bytes are compared (a copy and a memcmp: about a microsecond per 4 KB).
    if start % ALIGN or end > words.numel() * ALIGN or buffer[start:end].tobytes() != raw:
        return None
    if dtype != torch.float32:
        return words.view(torch.uint8)[start:end].view(dtype)  # converted by the caller: nothing keeps this view
    # A slice of `words` itself: a tensor viewed back from uint8 would take about 900 bytes more.
    return words[start // ALIGN:end // ALIGN]


def value_problem(tensor: torch.Tensor, bound: float) -> str | None:
    """What is wrong with `tensor`'s values for an update (NaN, inf, or beyond +-bound), or None."""
    if not tensor.numel():
        return None
    # One pass, no temporary: aminmax propagates NaN and shows +-inf, and on a 10 MB tensor it
    # takes about 0.3 ms against 7 ms for isfinite().all().
    low, high = (value.item() for value in torch.aminmax(tensor))
    # Comparisons with NaN are False; the isfinite calls keep inf out even with an infinite bound.
    if -bound <= low and high <= bound and math.isfinite(low) and math.isfinite(high):
        return None
    if not bool(torch.isfinite(tensor).all()):  # only on the way out, for a clearer message
        return "has non-finite values (NaN or inf)"
    return f"has values beyond +-{bound:g} (max_abs_value)"
