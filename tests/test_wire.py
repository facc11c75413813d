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


def assert_valid(message: UpdateMessage) -> None:
    assert isinstance(message.sender, str) and message.sender
    for value in (message.round, message.degree, message.num_samples):
        assert type(value) is int and value >= 0
    for tensor in message.tensors.values():
        assert tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()


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


def test_decoded_tensors_are_writable_and_owned():
    data = encode_update(make_message())
    decoded = decode_update(data)
    tensor = next(iter(decoded.tensors.values()))
    before = bytes(data)
    tensor.add_(1.0)  # would fail or corrupt the input if it shared the received buffer
    assert data == before


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
        (lambda e: e.update(shape=[1, 1, 1, 1, e["shape"][0] * e["shape"][1]]), "max_array_len"),
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
# Properties: no input makes decode_update raise anything but WireError.

_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SMALL_VALID = encode_update(make_message(tensors={"a": torch.randn(2, 3), "b": torch.randn(4)}, round=3))


@_FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_wire_error(data):
    try:
        message = decode_update(data)
    except WireError:
        return
    assert_valid(message)


@_FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(_SMALL_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(_SMALL_VALID)),
)
def test_mutated_valid_message_only_raises_wire_error(edits, cut):
    data = bytearray(_SMALL_VALID)
    for position, value in edits:
        data[position] = value
    try:
        message = decode_update(bytes(data[:cut]) if cut < len(data) else bytes(data))
    except WireError:
        return
    assert_valid(message)
