"""The wire format: round trips, size, and rejection of everything malformed."""

from __future__ import annotations

import io
import pickle

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfed.net.wire import (
    ENCODINGS,
    UpdateMessage,
    WireError,
    WireLimits,
    decode_update,
    encode_update,
    tensor_bytes,
)


def make_tensors(seed: int = 0, rank: int = 8, width: int = 64, layers: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.transformer.h.{layer}.attn.c_attn"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=gen)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(3 * width, rank, generator=gen)
    return tensors


def make_message(**overrides) -> UpdateMessage:
    fields = dict(sender="peer-3", round=7, tensors=make_tensors(), degree=4, num_samples=12345)
    fields.update(overrides)
    return UpdateMessage(**fields)


def raw_message(**overrides) -> dict:
    """A valid message as plain msgpack data, to corrupt one field at a time."""
    obj = msgpack.unpackb(encode_update(make_message()), raw=False)
    obj.update(overrides)
    return obj


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def first_entry(obj: dict) -> dict:
    return next(iter(obj["tensors"].values()))


def assert_valid(message: UpdateMessage, limits: WireLimits = WireLimits()) -> None:
    assert isinstance(message.sender, str) and 0 < len(message.sender) <= limits.max_name_length
    for value in (message.round, message.degree, message.num_samples):
        assert type(value) is int and value >= 0
    assert message.degree <= limits.max_degree and message.num_samples <= limits.max_num_samples
    for name, tensor in message.tensors.items():
        assert isinstance(name, str) and 0 < len(name) <= limits.max_name_length
        assert tensor.dtype == torch.float32 and tensor.dim() <= limits.max_dims
        assert torch.isfinite(tensor).all()
        assert tensor.numel() == 0 or tensor.abs().max().item() <= limits.max_abs_value


# ---------------------------------------------------------------------------
# Round trips and size


def test_round_trip_fp32_is_exact():
    message = make_message()
    decoded = decode_update(encode_update(message))
    assert (decoded.sender, decoded.round, decoded.degree, decoded.num_samples) == ("peer-3", 7, 4, 12345)
    assert list(decoded.tensors) == list(message.tensors)
    for name, tensor in message.tensors.items():
        assert decoded.tensors[name].dtype == torch.float32
        assert torch.equal(decoded.tensors[name], tensor)


@pytest.mark.parametrize(("encoding", "tolerance"), [("fp16", 1e-3), ("bf16", 1e-2)])
def test_round_trip_half_precision_error(encoding, tolerance):
    message = make_message()
    decoded = decode_update(encode_update(message, encoding))
    for name, tensor in message.tensors.items():
        got = decoded.tensors[name]
        assert got.dtype == torch.float32 and got.shape == tensor.shape
        relative = (got - tensor).abs() / tensor.abs().clamp_min(1e-3)
        assert relative.max() <= tolerance, name


def payload_span(payload) -> tuple[int, int]:
    start = torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
    return start, start + len(payload)


def test_fp32_tensors_view_the_received_buffer_and_half_precision_ones_are_converted():
    # In-process payloads and libp2p frame bodies are bytes; a caller may hand a bytearray or a memoryview.
    for payload_of in (bytes, bytearray, lambda data: memoryview(bytearray(data))):
        payload = payload_of(encode_update(make_message()))
        start, end = payload_span(payload)
        for name, tensor in decode_update(payload).tensors.items():
            assert start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= end, name  # no copy
            assert tensor.data_ptr() % 4 == 0 and torch.equal(tensor, make_tensors()[name])
    for encoding in ("fp16", "bf16"):
        payload = bytearray(encode_update(make_message(), encoding))
        start, end = payload_span(payload)
        assert not any(start <= t.data_ptr() < end for t in decode_update(payload).tensors.values())


def test_a_received_tensor_keeps_its_buffer_alive():
    tensor = decode_update(bytes(encode_update(make_message()))).tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    assert torch.equal(tensor, make_tensors()["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"])


def test_every_data_field_is_aligned_whatever_the_names_and_shapes():
    for sender in ("p", "peer-10", "a-much-longer-peer-name"):
        for names in (("a",), ("ab", "abc", "abcd"), ("x" * 37, "y")):
            tensors = {name: torch.randn(i + 1, 3) for i, name in enumerate(names)}
            payload = bytearray(encode_update(make_message(sender=sender, tensors=tensors)))
            start, end = payload_span(payload)
            decoded = decode_update(payload)
            assert all((t.data_ptr() - start) % 4 == 0 and start <= t.data_ptr() < end for t in decoded.tensors.values())
            assert all(torch.equal(decoded.tensors[n], t) for n, t in tensors.items())


def test_any_valid_encoding_decodes_the_same_copied_where_it_cannot_be_viewed():
    """Shortest-form msgpack (how the format was first written) puts data anywhere: copied, same values."""
    message = make_message()
    plain = bytearray(pack(msgpack.unpackb(encode_update(message), raw=False)))
    start, end = payload_span(plain)
    decoded = decode_update(plain)
    for name, tensor in message.tensors.items():
        assert torch.equal(decoded.tensors[name], tensor)
        viewed = start <= decoded.tensors[name].data_ptr() < end
        assert viewed == (bytes(plain).find(tensor.numpy().tobytes()) % 4 == 0), name


def test_duplicate_keys_never_pair_a_tensor_with_another_tensors_bytes():
    """msgpack keeps the last of duplicate keys; the bytes a tensor views must still be its own."""
    first, second = torch.full((4,), 1.0), torch.full((4,), 2.0)
    entry = lambda t: {"dtype": "float32", "shape": [4], "data": t.numpy().tobytes()}  # noqa: E731
    head = pack({k: v for k, v in raw_message().items() if k != "tensors"})[1:]  # the top map's pairs, its header cut
    # {"t1": 5, "t2": <second>, "t1": <first>} as msgpack: "t1" ends up first in the dict, with the last bin
    tensors = b"\x83" + pack("t1") + pack(5) + pack("t2") + pack(entry(second)) + pack("t1") + pack(entry(first))
    payload = bytes([0x86]) + head + pack("tensors") + tensors
    decoded = decode_update(payload)
    assert torch.equal(decoded.tensors["t1"], first) and torch.equal(decoded.tensors["t2"], second)


def test_encode_accepts_non_contiguous_grad_and_odd_shapes():
    weight = torch.randn(6, 4, requires_grad=True)
    tensors = {"t": weight.t(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "f64": torch.ones(2, dtype=torch.float64)}
    for encoding in ENCODINGS:
        decoded = decode_update(encode_update(make_message(tensors=tensors), encoding))
        assert {name: t.shape for name, t in decoded.tensors.items()} == {name: t.shape for name, t in tensors.items()}
    decoded = decode_update(encode_update(make_message(tensors=tensors)))
    assert torch.equal(decoded.tensors["t"], weight.detach().t())
    assert decoded.tensors["scalar"].item() == 2.5


def test_half_precision_payload_is_half_of_fp32():
    tensors = make_tensors(width=512)
    message = make_message(tensors=tensors)
    fp32 = len(encode_update(message, "fp32"))
    for encoding in ("fp16", "bf16"):
        size = len(encode_update(message, encoding))
        assert tensor_bytes(tensors) / 2 <= size <= 0.51 * fp32, encoding


def test_framing_overhead_below_two_percent_for_few_mb_adapter():
    tensors = make_tensors(rank=16, width=768, layers=12)  # ~4.7 MB of fp32
    raw = tensor_bytes(tensors)
    assert raw > 2_000_000
    encoded = len(encode_update(make_message(tensors=tensors)))
    assert (encoded - raw) / raw < 0.02


def test_tensor_bytes_counts_fp32():
    assert tensor_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}) == (12 + 5) * 4


def test_encode_rejects_bad_messages():
    with pytest.raises(WireError, match="encoding"):
        encode_update(make_message(), "int8")
    with pytest.raises(WireError, match="sender"):
        encode_update(make_message(sender=""))
    with pytest.raises(WireError, match="round"):
        encode_update(make_message(round=-1))
    with pytest.raises(WireError, match="floating-point"):
        encode_update(make_message(tensors={"x": torch.arange(3)}))
    with pytest.raises(WireError, match="'x'.*non-finite"):
        encode_update(make_message(tensors={"x": torch.tensor([float("nan")])}))
    # fp16 tops out at 65504: the overflow is caught by the sender.
    with pytest.raises(WireError, match="'big'.*float16"):
        encode_update(make_message(tensors={"big": torch.tensor([1e6])}), "fp16")


# ---------------------------------------------------------------------------
# Expected shapes


def expected_of(message: UpdateMessage) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in message.tensors.items()}


def test_expected_shapes_match():
    message = make_message()
    decoded = decode_update(encode_update(message), expected_of(message))
    assert set(decoded.tensors) == set(message.tensors)


def test_expected_shapes_mismatch():
    message = make_message()
    expected = expected_of(message)
    name = next(iter(expected))
    expected[name] = (1, 2)
    with pytest.raises(WireError, match="shape"):
        decode_update(encode_update(message), expected)


def test_expected_shapes_missing_and_unexpected_names():
    message = make_message()
    expected = expected_of(message)
    dropped = next(iter(expected))
    del expected[dropped]
    with pytest.raises(WireError, match=f"unexpected \\['{dropped}'\\]"):
        decode_update(encode_update(message), expected)
    expected = expected_of(message) | {"extra.lora_A.weight": (8, 64)}
    with pytest.raises(WireError, match="missing \\['extra.lora_A.weight'\\]"):
        decode_update(encode_update(message), expected)


# ---------------------------------------------------------------------------
# Rejection of bad values and bad bytes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_rejected_naming_tensor(bad, dtype):
    torch_dtype = getattr(torch, dtype)
    values = torch.tensor([1.0, bad, 2.0], dtype=torch_dtype)
    obj = raw_message(tensors={"poisoned": {
        "dtype": dtype, "shape": [3], "data": values.view(torch.uint8).numpy().tobytes()}})
    with pytest.raises(WireError, match="'poisoned'.*non-finite"):
        decode_update(pack(obj))


def test_oversized_rejected_before_parsing(monkeypatch):
    data = encode_update(make_message())
    calls = []
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: calls.append(1))
    with pytest.raises(WireError, match="over the limit"):
        decode_update(data, limits=WireLimits(max_bytes=len(data) - 1))
    assert calls == []  # never reached the parser


def test_limits_on_count_names_and_dims():
    message = make_message()
    data = encode_update(message)
    with pytest.raises(WireError):
        decode_update(data, limits=WireLimits(max_tensors=len(message.tensors) - 1))
    with pytest.raises(WireError, match="sender"):
        decode_update(encode_update(make_message(sender="x" * 300)))
    with pytest.raises(WireError, match="tensor name"):
        decode_update(encode_update(make_message(tensors={"n" * 257: torch.zeros(1)})))
    deep = {"deep": torch.zeros(1, 1, 1, 1, 1)}
    with pytest.raises(WireError):
        decode_update(encode_update(make_message(tensors=deep)))
    decode_update(encode_update(make_message(tensors=deep)), limits=WireLimits(max_dims=5))


def test_truncated_and_garbage_rejected():
    data = encode_update(make_message())
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(WireError):
            decode_update(data[:cut])
    with pytest.raises(WireError):
        decode_update(data + b"\x00")  # trailing bytes
    with pytest.raises(WireError):
        decode_update(b"\xc1" * 64)  # 0xc1 is never used in msgpack
    with pytest.raises(WireError):
        decode_update(b"\x91" * 100_000)  # deeply nested arrays
    with pytest.raises(WireError):
        decode_update("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"round": "7"}, "round must be an int"),
        ({"round": True}, "round must be an int"),
        ({"degree": False}, "degree must be an int"),
        ({"round": -1}, "round must not be negative"),
        ({"num_samples": 1.5}, "num_samples must be an int"),
        ({"v": 2}, "version"),
        ({"v": True}, "version"),
        ({"sender": ""}, "sender must not be empty"),
        ({"sender": b"peer"}, "sender must be a string"),
        ({"tensors": []}, "tensors must be a map"),
        ({"extra": 1}, "unexpected \\['extra'\\]"),
    ],
)
def test_wrong_top_level_fields_rejected(overrides, match):
    with pytest.raises(WireError, match=match):
        decode_update(pack(raw_message(**overrides)))


def test_missing_top_level_key_rejected():
    obj = raw_message()
    del obj["degree"]
    with pytest.raises(WireError, match="missing \\['degree'\\]"):
        decode_update(pack(obj))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda e: e.update(data=e["data"][:-4]), "bytes"),
        (lambda e: e.update(data=e["data"] + b"\x00"), "bytes"),
        (lambda e: e.update(dtype="float64"), "dtype"),
        (lambda e: e.update(dtype="int8"), "dtype"),
        (lambda e: e.update(shape=[1, 1, 1, 1, e["shape"][0] * e["shape"][1]]), "max_dims"),
        (lambda e: e.update(shape=[-1, 8]), "shape"),
        (lambda e: e.update(shape=[True, 8]), "shape"),
        (lambda e: e.update(shape="8,64"), "shape"),
        (lambda e: e.update(shape=[0, 2**62, 2**62]), "shape"),
        (lambda e: e.update(data="text"), "data must be bin"),
        (lambda e: e.pop("dtype"), "missing \\['dtype'\\]"),
        (lambda e: e.update(pickle=b""), "unexpected"),
    ],
)
def test_wrong_tensor_entry_rejected(change, match):
    obj = raw_message()
    change(first_entry(obj))
    with pytest.raises(WireError, match=match):
        decode_update(pack(obj))


def test_non_str_tensor_name_rejected():
    obj = raw_message()
    obj["tensors"] = {b"raw-name": first_entry(obj)}
    with pytest.raises(WireError, match="tensor name must be a string"):
        decode_update(pack(obj))


# Set only if a payload below were ever unpickled.
_UNPICKLED: list[str] = []


def _mark_unpickled(tag: str) -> None:
    _UNPICKLED.append(tag)


class _Trap:
    def __reduce__(self):
        return (_mark_unpickled, ("executed",))


def test_pickle_payloads_rejected_without_running_them():
    payloads = [
        pickle.dumps(_Trap()),
        pickle.dumps({"v": 1, "sender": "p", "round": 0, "tensors": {"a": torch.zeros(2)}}),
    ]
    buffer = io.BytesIO()
    torch.save(make_tensors(), buffer)
    payloads.append(buffer.getvalue())
    for payload in payloads:
        with pytest.raises(WireError):
            decode_update(payload)
    # A pickle smuggled into a tensor's bytes is just (wrong-length) floats.
    obj = raw_message()
    first_entry(obj)["data"] = pickle.dumps(_Trap())
    with pytest.raises(WireError):
        decode_update(pack(obj))
    assert _UNPICKLED == []


# ---------------------------------------------------------------------------
# Hostile structure: nesting bombs, forged lengths, hostile strings, escaping exceptions.

_PLACEHOLDER = "@@PLACEHOLDER@@"
# Where a value can sit in a message: a top-level field, a tensor entry's field, or a tensor name.
_FIELDS = ("v", "sender", "round", "degree", "num_samples", "tensors", "dtype", "shape", "data", "name")


def message_with(field: str, value, message: UpdateMessage | None = None) -> dict:
    """A valid message (as plain msgpack data) with one field, or the first tensor's name, replaced."""
    obj = msgpack.unpackb(encode_update(message or make_message()), raw=False)
    if field == "name":
        entries = list(obj["tensors"].items())
        obj["tensors"] = {value: entries[0][1], **dict(entries[1:])}
    elif field in ("dtype", "shape", "data"):
        first_entry(obj)[field] = value
    else:
        obj[field] = value
    return obj


def splice(field: str, packed_value: bytes, message: UpdateMessage | None = None) -> bytes:
    """A valid message whose `field` holds raw msgpack bytes, such as ones msgpack.packb will not produce."""
    data = pack(message_with(field, _PLACEHOLDER, message))
    marker = pack(_PLACEHOLDER)
    assert data.count(marker) == 1
    return data.replace(marker, packed_value)


def nesting_bomb(depth: int, kind: str = "array") -> bytes:
    """`depth` containers, one inside the other: 1 byte per level (arrays) or 3 (maps)."""
    return (b"\x91" if kind == "array" else b"\x81\xa1k") * depth + b"\x00"


@pytest.mark.parametrize("depth", [5, 10, 100, 1000, 100_000])
@pytest.mark.parametrize("field", _FIELDS)
def test_nesting_bomb_in_any_field_is_refused_before_parsing(field, depth, monkeypatch):
    # Once found with depth ~1,000 in `shape`: msgpack accepted it and the error message's repr()
    # raised RecursionError. Now the pre-scan refuses it before msgpack runs at all.
    bombs = [splice(field, nesting_bomb(depth, kind)) for kind in ("array", "map")]
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: pytest.fail("reached the parser"))
    for bomb in bombs:
        with pytest.raises(WireError, match="more than 4 levels deep") as error:
            decode_update(bomb)
        assert len(str(error.value)) < 100


def test_nesting_within_the_schema_depth_is_not_refused_for_depth():
    # A shape of one-element lists: depth 5 in all, refused; the pre-scan allows 4, the schema's depth.
    with pytest.raises(WireError, match="levels deep"):
        decode_update(pack(message_with("shape", [[8], 64])))
    # A list for `v` (depth 2) passes the pre-scan and fails the schema check, naming only the type.
    with pytest.raises(WireError, match="version.*got list"):
        decode_update(pack(message_with("v", [[[1]]])))


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_nesting_bomb_refused_with_the_pure_python_unpacker(depth, monkeypatch):
    # msgpack's C unpacker stops at its 1024-level stack, but the pure-Python fallback
    # (MSGPACK_PUREPYTHON=1) only at the recursion limit: the bound must not come from msgpack.
    import msgpack.fallback

    monkeypatch.setattr(msgpack, "unpackb", msgpack.fallback.unpackb)
    with pytest.raises(WireError, match="levels deep"):
        decode_update(splice("shape", nesting_bomb(depth)))
    assert decode_update(encode_update(make_message())).sender == "peer-3"


_FORGED = [
    (b"\xc6\x0f\xff\xff\xff", "truncated"),  # bin32 of 256 MiB - 1, none of it sent
    (b"\xc6\xff\xff\xff\xff", "bin of 4294967295 bytes, over the limit"),
    (b"\xdb\xff\xff\xff\xff", "str of 4294967295 bytes, over the limit"),
    (b"\xdd\xff\xff\xff\xff", "array of 4294967295 items, over the limit"),
    (b"\xdf\xff\xff\xff\xff", "map of 4294967295 entries, over the limit"),
    (b"\xde\x10\x00", "truncated"),  # map16 of 4096 entries, none sent
    (b"\xdc\x00\x04", "truncated"),  # array16 of 4 items, none sent
    (b"\xc7\x01\x00\x00", "extension"),
    (b"\xd4\x00\x00", "extension"),
    (b"\xc1", "reserved"),
]


@pytest.mark.parametrize(("header", "match"), _FORGED)
def test_forged_lengths_and_refused_types_never_reach_the_parser(header, match, monkeypatch):
    # A small message, so a forged count of items is more than the bytes left after it.
    small = make_message(tensors={"a": torch.zeros(2, 3)})
    spliced = {field: splice(field, header, small) for field in ("data", "shape", "sender", "tensors", "name")}
    monkeypatch.setattr(msgpack, "unpackb", lambda *a, **k: pytest.fail("reached the parser"))
    with pytest.raises(WireError, match=match):
        decode_update(header)
    for data in spliced.values():
        # Inside a message the same bytes may trip the depth bound first.
        with pytest.raises(WireError, match=f"{match}|levels deep"):
            decode_update(data)


def test_object_count_is_bounded_by_what_a_valid_message_can_hold():
    limits = WireLimits(max_tensors=16)
    # 16 maps of 16 entries each: depth 2, every length within limits, 545 objects.
    inner = b"\xde\x00\x10" + b"\x00\x00" * 16
    bomb = b"\xde\x00\x10" + b"".join(bytes([i]) + inner for i in range(16))
    with pytest.raises(WireError, match="more msgpack objects than any valid update"):
        decode_update(bomb, limits=limits)
    decode_update(encode_update(make_message()), limits=limits)  # 4 tensors: well within


def test_trailing_bytes_and_truncated_payloads_refused():
    data = encode_update(make_message())
    with pytest.raises(WireError, match="3 bytes after the message"):
        decode_update(data + b"\x00\x00\x00")
    with pytest.raises(WireError, match="truncated"):
        decode_update(data[:-1])  # inside the last tensor's bin payload


@pytest.mark.parametrize("field", ["dtype", "sender", "v", "name", "round", "shape"])
def test_hostile_strings_are_shown_short_escaped_and_on_one_line(field):
    hostile = "\n\x1b[31mFAKE LOG LINE\r\u202e" + "x" * 900
    with pytest.raises(WireError) as error:
        decode_update(pack(message_with(field, hostile)))
    text = str(error.value)
    assert len(text) < 300
    assert not any(c in text for c in "\n\r\x1b\u202e")
    assert "x" * 100 not in text


def test_many_unexpected_keys_are_summarised():
    obj = raw_message()
    first_entry(obj).update({f"junk-{i}": [i] for i in range(4000)})
    with pytest.raises(WireError, match="3992 more") as error:
        decode_update(pack(obj))
    assert len(str(error.value)) < 300


@pytest.mark.parametrize(("key", "match"), [(1, "ValueError"), (None, "ValueError"), (1.5, "ValueError"),
                                            (b"v", "unexpected \\[bytes\\]")])
def test_map_keys_of_other_types_refused(key, match):
    for where in ("message", "entry"):
        obj = raw_message()
        (obj if where == "message" else first_entry(obj))[key] = 1
        with pytest.raises(WireError, match=match):
            decode_update(pack(obj))


def test_invalid_utf8_refused():
    data = splice("sender", b"\xa2\xff\xfe")  # fixstr of 2 bytes that are not UTF-8
    with pytest.raises(WireError, match="UnicodeDecodeError"):
        decode_update(data)


@pytest.mark.parametrize("exc_type", [MemoryError, OverflowError, RecursionError, TypeError, ValueError, KeyError])
def test_any_other_exception_becomes_wire_error(exc_type, monkeypatch):
    # A last line of defence: whatever a future check misses is still a dropped message.
    def boom(*_args, **_kwargs):
        raise exc_type("'quoted' input \n that must not be shown")

    monkeypatch.setattr(torch, "frombuffer", boom)
    with pytest.raises(WireError, match=f"^malformed message \\({exc_type.__name__}\\)$") as error:
        decode_update(encode_update(make_message()))
    assert isinstance(error.value.__cause__, exc_type)


def test_buffers_of_other_formats_and_layouts():
    data = encode_update(make_message())
    assert decode_update(memoryview(data)).sender == "peer-3"
    assert decode_update(bytearray(data)).sender == "peer-3"
    padded = data + bytes(4 - len(data) % 4)  # 1 to 4 bytes after the message, a whole number of uint32
    with pytest.raises(WireError, match="bytes after the message"):
        decode_update(memoryview(padded).cast("I"))  # read as bytes, whatever the item format
    with pytest.raises(WireError):
        decode_update(memoryview(data)[::2])  # not contiguous


# ---------------------------------------------------------------------------
# Bounds on numbers: element magnitude, degree, num_samples.


def entry_of(values: torch.Tensor, dtype: str = "float32") -> dict:
    wire_values = values.to(getattr(torch, dtype))
    return {"dtype": dtype, "shape": list(values.shape), "data": wire_values.view(torch.uint8).numpy().tobytes()}


@pytest.mark.parametrize("big", [3e38, -3e38, 1e4 * 1.001, 65504.0, -2e4])
def test_finite_values_beyond_max_abs_value_refused(big):
    # 3e38 is finite as float32 and passed before; summed over neighbours it became inf.
    obj = raw_message(tensors={"big": entry_of(torch.tensor([0.5, big, -0.25]))})
    with pytest.raises(WireError, match="'big'.*beyond \\+-10000 \\(max_abs_value\\)"):
        decode_update(pack(obj))
    relaxed = WireLimits(max_abs_value=float(abs(big)) * 2)
    assert decode_update(pack(obj), limits=relaxed).tensors["big"][1].item() == pytest.approx(big)


def test_values_at_max_abs_value_accepted():
    obj = raw_message(tensors={"edge": entry_of(torch.tensor([1e4, -1e4, 0.0]))})
    assert decode_update(pack(obj)).tensors["edge"].abs().max().item() == 1e4


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_max_abs_value_applies_to_every_dtype(dtype):
    values = torch.tensor([4096.0, -4096.0, 0.0, 1.0])  # exact in all three
    obj = raw_message(tensors={"edge": entry_of(values, dtype)})
    assert torch.equal(decode_update(pack(obj), limits=WireLimits(max_abs_value=4096.0)).tensors["edge"], values)
    with pytest.raises(WireError, match="max_abs_value"):
        decode_update(pack(obj), limits=WireLimits(max_abs_value=4095.0))


def test_non_finite_refused_even_with_an_infinite_bound():
    # Found by the property test below: with max_abs_value=inf, |inf| <= bound held.
    for bad in (float("inf"), float("-inf"), float("nan")):
        obj = raw_message(tensors={"t": entry_of(torch.tensor([0.0, bad]))})
        with pytest.raises(WireError, match="non-finite"):
            decode_update(pack(obj), limits=WireLimits(max_abs_value=float("inf")))


@pytest.mark.parametrize("size", [1, 7, 8, 9, 33, 4096, 100_003])
def test_non_finite_anywhere_in_a_large_tensor_refused(size):
    # aminmax runs vectorised: a NaN in the tail or the head must still show.
    for position in sorted({0, size // 2, size - 1}):
        for bad in (float("nan"), float("inf"), float("-inf")):
            values = torch.zeros(size)
            values[position] = bad
            obj = raw_message(tensors={"t": entry_of(values)})
            with pytest.raises(WireError, match="non-finite"):
                decode_update(pack(obj))


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("num_samples", 2**63, False),
        ("num_samples", 2**64 - 1, False),
        ("num_samples", 2**40 + 1, False),
        ("num_samples", 2**40, True),
        ("degree", 1_000_001, False),
        ("degree", 2**63 - 1, False),
        ("degree", 1_000_000, True),
        ("degree", -(2**63), False),
        ("round", 2**64 - 1, True),  # rounds are compared with the receiver's own, not summed
    ],
)
def test_self_reported_counts_bounded(field, value, accepted):
    data = pack(raw_message(**{field: value}))
    if accepted:
        assert getattr(decode_update(data), field) == value
    else:
        with pytest.raises(WireError, match=field):
            decode_update(data)


def test_count_limits_are_configurable():
    data = pack(raw_message(degree=5, num_samples=100))
    with pytest.raises(WireError, match="degree is over the limit of 4"):
        decode_update(data, limits=WireLimits(max_degree=4))
    with pytest.raises(WireError, match="num_samples is over the limit of 99"):
        decode_update(data, limits=WireLimits(max_num_samples=99))


def test_max_bytes_default_is_the_network_config_default():
    from p2pfed.config import NetworkConfig

    assert WireLimits().max_bytes == NetworkConfig().max_message_bytes


# ---------------------------------------------------------------------------
# Properties: decode_update returns a valid message that matches the expected shapes, or raises
# WireError; never anything else. Deterministic (derandomize) and a few seconds in all.

_FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_SMALL = make_message(tensors={"a": torch.randn(2, 3), "b": torch.randn(4)}, round=3)
_SMALL_VALID = encode_update(_SMALL)
_SMALL_EXPECTED = {name: tuple(t.shape) for name, t in _SMALL.tensors.items()}


def decoded_or_refused(data: bytes, expected=_SMALL_EXPECTED, limits: WireLimits = WireLimits()):
    """The property itself: the message, checked against `expected` and `limits`, or None on WireError."""
    try:
        message = decode_update(data, expected, limits)
    except WireError as error:
        text = str(error)
        assert len(text) < 1000 and "\n" not in text
        return None
    assert_valid(message, limits)
    if expected is not None:
        assert set(message.tensors) == set(expected)
        for name, tensor in message.tensors.items():
            assert len(tensor.shape) == len(expected[name])
            assert all(e is None or e == d for e, d in zip(expected[name], tensor.shape))
    return message


# Every msgpack type the packer makes (no ext), nested a few levels: the type-confusion values.
_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
            | st.text(max_size=20) | st.text(min_size=250, max_size=300) | st.binary(max_size=64))
_keys = st.integers(-5, 5) | st.text(max_size=8) | st.binary(max_size=4)
_msgpack_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=5), max_leaves=12)


@_FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_wire_error(data):
    decoded_or_refused(data)
    decoded_or_refused(data, expected=None)


@_FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(_SMALL_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(_SMALL_VALID)),
)
def test_mutated_valid_message_only_raises_wire_error(edits, cut):
    data = bytearray(_SMALL_VALID)
    for position, value in edits:
        data[position] = value
    decoded_or_refused(bytes(data[:cut]))


@_FUZZ
@given(st.sampled_from(_FIELDS), st.data())
def test_any_field_of_any_msgpack_type_only_raises_wire_error(field, data):
    value = data.draw(_scalars if field == "name" else _msgpack_values)  # a name must be hashable
    decoded_or_refused(pack(message_with(field, value, _SMALL)))


@_FUZZ
# Depths around the limits that matter: the schema's 4, Python's recursion limit (about 1000, where
# repr() of a shape broke), msgpack's C stack (1024), and far beyond.
@given(st.sampled_from(_FIELDS), st.integers(0, 2000) | st.integers(990, 1030) | st.just(100_000),
       st.sampled_from(["array", "map"]))
def test_nesting_at_any_depth_only_raises_wire_error(field, depth, kind):
    message = decoded_or_refused(splice(field, nesting_bomb(depth, kind), _SMALL))
    assert depth == 0 or message is None  # a container where the schema has none is never valid


@_FUZZ
@given(st.sampled_from(_FIELDS), st.sampled_from(_FORGED), st.integers(0, 40))
def test_forged_lengths_anywhere_only_raise_wire_error(field, forged, tail):
    header, _ = forged
    assert decoded_or_refused(splice(field, header + b"\x00" * tail, _SMALL)) is None


@_FUZZ
@given(
    st.lists(st.floats(width=32), min_size=1, max_size=16),
    st.sampled_from(["float32", "float16", "bfloat16"]),
    st.sampled_from([1e4, 1.0, 3e38, float("inf")]),
)
def test_element_values_accepted_only_when_finite_and_in_bound(values, dtype, bound):
    exact = torch.tensor(values).to(getattr(torch, dtype)).float()  # what the receiver sees
    obj = raw_message(tensors={"x": entry_of(torch.tensor(values), dtype)})
    message = decoded_or_refused(pack(obj), {"x": (len(values),)}, WireLimits(max_abs_value=bound))
    in_bound = bool(torch.isfinite(exact).all()) and exact.abs().max().item() <= bound
    assert (message is not None) == in_bound
    if message is not None:
        assert torch.equal(message.tensors["x"], exact)


@_FUZZ
@given(st.sampled_from(["round", "degree", "num_samples"]), st.integers(-(2**63), 2**64 - 1))
def test_counts_accepted_only_within_bounds(field, value):
    limits = WireLimits()
    bound = {"round": 2**64, "degree": limits.max_degree, "num_samples": limits.max_num_samples}[field]
    message = decoded_or_refused(pack(raw_message(**{field: value})), None)
    assert (message is not None) == (0 <= value <= bound)


_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
_shapes = st.lists(st.integers(0, 5), max_size=4)


@_FUZZ
@given(st.dictionaries(_names, _shapes, min_size=1, max_size=6), st.sampled_from(ENCODINGS), st.data())
def test_valid_messages_round_trip_and_every_truncation_is_refused(shapes, encoding, data):
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    payload = encode_update(make_message(tensors=tensors), encoding)
    # Ranks left free where FlexLoRA would leave them: an expected dimension may be None.
    expected = {name: tuple(None if data.draw(st.booleans()) else d for d in shape) for name, shape in shapes.items()}
    message = decoded_or_refused(payload, expected)
    assert message is not None and {n: list(t.shape) for n, t in message.tensors.items()} == shapes
    # One msgpack object is prefix-free: no proper prefix of a message is a message.
    cut = data.draw(st.integers(0, len(payload) - 1))
    assert decoded_or_refused(payload[:cut], expected) is None
