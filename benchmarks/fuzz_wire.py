"""Fuzz p2pfed.net.wire.decode_update: every input must decode to a valid message or raise WireError.

Feeds generated inputs to the decoder and counts what happens: accepted (and then checked: bounded
counts, finite float32 tensors within max_abs_value, the expected shapes when given), refused with
WireError, or any other exception, by type. Seeded, so a run is reproducible; exits non-zero if
anything but WireError escaped or an accepted message broke the limits.

    .venv/bin/python benchmarks/fuzz_wire.py [--count N] [--seed S]

The inputs, in equal shares, built from four valid messages: three small ones (fp32, fp16, bf16) and
the default tiny model's LoRA adapter (16 tensors, 64 KiB, fp32):

  random_bytes    random bytes, sometimes after a msgpack map header
  mutated         a valid message with bytes flipped, set to msgpack type bytes, inserted, deleted, repeated
  nesting_bomb    a field (or a tensor name) replaced by arrays or maps nested 5 to 100,000 deep
  type_confusion  a field (or a tensor name) replaced by a random value of any msgpack type
  truncated       a valid message cut short
  huge_length     str/bin/array/map/ext headers with forged lengths, in a field or at a random offset
  huge_values     elements such as 3e38, inf, NaN, 65504, or counts such as 2**63 and -2**63

`MSGPACK_PUREPYTHON=1` in the environment runs the same inputs through msgpack's pure-Python unpacker.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from p2pfed.net.wire import UpdateMessage, WireError, WireLimits, decode_update, encode_update

DEFAULT_COUNT = 100_000
_PLACEHOLDER = "@@FUZZ@@"
_FIELDS = ("v", "sender", "round", "degree", "num_samples", "tensors", "dtype", "shape", "data", "name")
_HOSTILE_STRINGS = ("", "x" * 300, "\n\x1b[31mfake log line\r", "\u202e\ud7ff\U0010ffff", "float32\x00", "float64")
_SPECIAL_FLOATS = (3e38, -3e38, float("inf"), float("-inf"), float("nan"), 65504.0, 1e4, -1e4, 1.0001e4, 1e-45, -0.0)
_SPECIAL_INTS = (0, 1, -1, 2**40, 2**40 + 1, 1_000_000, 1_000_001, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63))
# Headers whose declared length is huge, just over a limit, or more than the bytes that follow.
_FORGED_HEADERS = (
    b"\xc6\xff\xff\xff\xff", b"\xc6\x0f\xff\xff\xff", b"\xc5\xff\xff", b"\xc4\xff",  # bin32/16/8
    b"\xdb\xff\xff\xff\xff", b"\xda\x04\x01", b"\xd9\xff",  # str32/16/8
    b"\xdd\xff\xff\xff\xff", b"\xdc\x00\x05", b"\xdc\x00\x04", b"\x94",  # arrays
    b"\xdf\xff\xff\xff\xff", b"\xde\x10\x01", b"\xde\x10\x00", b"\x8f",  # maps
    b"\xc9\xff\xff\xff\xff", b"\xc7\x01\x00", b"\xd4\x00", b"\xd8\x00", b"\xc1",  # ext types, reserved byte
)
_TYPE_BYTES = (0xC1, 0xC4, 0xC6, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xCF, 0xD3, 0xCB, 0x9F, 0x8F, 0xBF, 0xFF, 0x00)


@dataclass(frozen=True)
class Seed:
    """A valid message: its bytes, its plain msgpack data, its shapes, and each field spliceable."""

    payload: bytes
    plain: dict
    expected: dict[str, tuple[int, ...]]
    around: dict[str, tuple[bytes, bytes]]  # field -> (bytes before, bytes after) its value


def _with_field(plain: dict, field: str, value: Any) -> dict:
    obj = {**plain, "tensors": {name: dict(entry) for name, entry in plain["tensors"].items()}}
    first = next(iter(obj["tensors"]))
    if field == "name":
        entries = list(obj["tensors"].items())
        obj["tensors"] = {value: entries[0][1], **dict(entries[1:])}
    elif field in ("dtype", "shape", "data"):
        obj["tensors"][first][field] = value
    else:
        obj[field] = value
    return obj


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def make_seeds() -> list[Seed]:
    generator = torch.Generator().manual_seed(0)
    shapes = [{"a": (2, 3), "b": (4,)}, {"m.lora_A": (4, 8), "m.lora_B": (8, 4), "s": ()}, {"e": (0, 3), "x": (1, 1, 2, 1)}]
    # And the default tiny model's adapter as it goes on the wire: 2 layers of 64, rank 8, 64 KiB.
    shapes.append({f"transformer.h.{layer}.{path}.lora_{ab}": ((8, fan_in) if ab == "A" else (fan_out, 8))
                   for layer in range(2)
                   for path, fan_in, fan_out in (("attn.c_attn", 64, 192), ("attn.c_proj", 64, 64),
                                                 ("mlp.c_fc", 64, 256), ("mlp.c_proj", 256, 64))
                   for ab in "AB"})
    seeds = []
    for shape_set, encoding in zip(shapes, ("fp32", "fp16", "bf16", "fp32")):
        tensors = {name: torch.randn(shape, generator=generator) for name, shape in shape_set.items()}
        payload = encode_update(UpdateMessage("peer-1", 3, tensors, degree=2, num_samples=1000), encoding)
        plain = msgpack.unpackb(payload, raw=False)
        around = {}
        for field in _FIELDS:
            spliced = _pack(_with_field(plain, field, _PLACEHOLDER))
            before, marker, after = spliced.partition(_pack(_PLACEHOLDER))
            assert marker and _pack(_PLACEHOLDER) not in after
            around[field] = (before, after)
        seeds.append(Seed(payload, plain, shape_set, around))
    return seeds


# ---------------------------------------------------------------------------
# Input generators: (random generator, seeds) -> bytes


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A value of any type msgpack packs (ext aside), nested at most 3 deep."""
    kind = rng.randrange(11 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(_SPECIAL_INTS)
    if kind == 3:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 4:
        return rng.choice((*_SPECIAL_FLOATS, rng.uniform(-1e6, 1e6)))
    if kind == 5:
        return rng.choice(_HOSTILE_STRINGS)
    if kind == 6:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 7:
        return rng.randbytes(rng.randrange(24))
    if kind == 8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = (lambda: rng.choice((0, -1, "k", "dtype", "shape", "data", b"v", "v", "")))
    return {keys(): random_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def gen_random_bytes(rng: random.Random, _seeds: list[Seed]) -> bytes:
    data = rng.randbytes(rng.choice((0, 1, 2, 8, 64, 512)))
    return (b"\x86" + data) if rng.random() < 0.3 else data


def gen_mutated(rng: random.Random, seeds: list[Seed]) -> bytes:
    data = bytearray(rng.choice(seeds).payload)
    for _ in range(rng.randint(1, 8)):
        if not data:
            break
        pos = rng.randrange(len(data))
        op = rng.randrange(5)
        if op == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos] = rng.choice(_TYPE_BYTES)
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del data[pos:pos + rng.randint(1, 16)]
        else:
            data[pos:pos] = data[pos:pos + rng.randint(1, 32)]
    return bytes(data)


def gen_nesting_bomb(rng: random.Random, seeds: list[Seed]) -> bytes:
    before, after = rng.choice(seeds).around[rng.choice(_FIELDS)]
    depth = rng.choice((5, 10, 100, 999, 1000, 1024, 1025, 100_000, rng.randint(5, 2000)))
    level = rng.choice((b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\x92\x00"))
    return before + level * depth + b"\x00" + after


def gen_type_confusion(rng: random.Random, seeds: list[Seed]) -> bytes:
    field = rng.choice(_FIELDS)
    value = random_value(rng)
    if field == "name" and isinstance(value, (list, dict)):
        value = repr(value)  # a dict key must be hashable; its text is as good a name as any
    return _pack(_with_field(rng.choice(seeds).plain, field, value))


def gen_truncated(rng: random.Random, seeds: list[Seed]) -> bytes:
    payload = rng.choice(seeds).payload
    return payload[:rng.randrange(len(payload))]


def gen_huge_length(rng: random.Random, seeds: list[Seed]) -> bytes:
    header = rng.choice(_FORGED_HEADERS)
    seed = rng.choice(seeds)
    if rng.random() < 0.5:
        before, after = seed.around[rng.choice(_FIELDS)]
        return before + header + after
    pos = rng.randrange(len(seed.payload))
    return seed.payload[:pos] + header + seed.payload[pos:]


def gen_huge_values(rng: random.Random, seeds: list[Seed]) -> bytes:
    seed = rng.choice(seeds)
    if rng.random() < 0.4:
        field = rng.choice(("v", "round", "degree", "num_samples"))
        return _pack(_with_field(seed.plain, field, rng.choice(_SPECIAL_INTS)))
    name, entry = rng.choice([(n, e) for n, e in seed.plain["tensors"].items() if e["data"]])
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[entry["dtype"]]
    values = torch.tensor([rng.choice(_SPECIAL_FLOATS) for _ in range(len(entry["data"]) // size)])
    wire = values.to(getattr(torch, entry["dtype"])).view(torch.uint8).numpy().tobytes()
    if rng.random() < 0.5:  # one bad element among the seed's own values
        pos = rng.randrange(len(entry["data"]) // size) * size
        wire = entry["data"][:pos] + wire[:size] + entry["data"][pos + size:]
    obj = _with_field(seed.plain, "tensors", {**seed.plain["tensors"], name: {**entry, "data": wire}})
    return _pack(obj)


GENERATORS: dict[str, Callable[[random.Random, list[Seed]], bytes]] = {
    "random_bytes": gen_random_bytes,
    "mutated": gen_mutated,
    "nesting_bomb": gen_nesting_bomb,
    "type_confusion": gen_type_confusion,
    "truncated": gen_truncated,
    "huge_length": gen_huge_length,
    "huge_values": gen_huge_values,
}


# ---------------------------------------------------------------------------


def violations(message: UpdateMessage, expected: Mapping[str, tuple[int, ...]] | None, limits: WireLimits) -> list[str]:
    """What an accepted message breaks of the decoder's promises (empty when nothing)."""
    problems = []
    if not isinstance(message.sender, str) or not 0 < len(message.sender) <= limits.max_name_length:
        problems.append("sender")
    for field, bound in (("round", 2**64), ("degree", limits.max_degree), ("num_samples", limits.max_num_samples)):
        value = getattr(message, field)
        if type(value) is not int or not 0 <= value <= bound:
            problems.append(field)
    if expected is not None and {n: tuple(t.shape) for n, t in message.tensors.items()} != dict(expected):
        problems.append("shapes")
    for tensor in message.tensors.values():
        if tensor.dtype != torch.float32 or not bool(torch.isfinite(tensor).all()):
            problems.append("values")
        elif tensor.numel() and tensor.abs().max().item() > limits.max_abs_value:
            problems.append("magnitude")
    return problems


def main(count: int = DEFAULT_COUNT, seed: int = 0, strict: bool = False) -> dict:
    """Run the fuzzer; with `strict`, raise SystemExit after the report if anything but WireError escaped."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    seeds = make_seeds()
    limits = WireLimits()
    kinds = list(GENERATORS)
    outcomes: dict[str, Counter] = {kind: Counter() for kind in kinds}
    first_failures: list[str] = []
    decode_time = 0.0
    start = time.perf_counter()
    for index in range(count):
        kind = kinds[index % len(kinds)]
        data = GENERATORS[kind](rng, seeds)
        # Half the inputs are checked against the shapes of the message they came from.
        expected = rng.choice(seeds).expected if rng.random() < 0.5 else None
        begin = time.perf_counter()
        try:
            message = decode_update(data, expected, limits)
        except WireError:
            outcome = "WireError"
        except BaseException as exc:  # noqa: BLE001 - counting exactly these is the point
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome = type(exc).__name__
            if len(first_failures) < 5:
                first_failures.append(f"{kind} #{index}: {outcome}, input {data[:64].hex()}...")
        else:
            problems = violations(message, expected, limits)
            outcome = "accepted" if not problems else "accepted but broke " + "+".join(problems)
        decode_time += time.perf_counter() - begin
        outcomes[kind][outcome] += 1
    elapsed = time.perf_counter() - start

    totals = sum(outcomes.values(), Counter())
    other = sum(n for outcome, n in totals.items() if outcome not in ("accepted", "WireError"))
    print(f"fuzzing wire.decode_update: {count} inputs, seed {seed}, "
          f"msgpack {'pure Python' if msgpack.Unpacker.__module__ == 'msgpack.fallback' else 'C extension'}")
    print(f"  {'kind':16s} {'inputs':>7s} {'accepted':>9s} {'WireError':>10s}  other")
    for kind in kinds:
        c = outcomes[kind]
        rest = ", ".join(f"{o} {n}" for o, n in c.items() if o not in ("accepted", "WireError")) or "-"
        print(f"  {kind:16s} {sum(c.values()):7d} {c['accepted']:9d} {c['WireError']:10d}  {rest}")
    print(f"  {'total':16s} {count:7d} {totals['accepted']:9d} {totals['WireError']:10d}  {other or '-'}")
    print(f"  {elapsed:.1f} s: {count / elapsed:,.0f} inputs/s generated and decoded; "
          f"decoding alone {count / decode_time:,.0f} inputs/s ({1e6 * decode_time / count:.1f} us each)")
    for failure in first_failures:
        print("  FAILURE " + failure)
    if strict and other:
        raise SystemExit(f"{other} inputs raised something other than WireError or broke the limits")
    return {"inputs": count, "accepted": totals["accepted"], "wire_error": totals["WireError"], "other": other,
            "seconds": elapsed, "per_second": count / elapsed, "decode_per_second": count / decode_time}


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"inputs to generate (default {DEFAULT_COUNT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    main(args.count, args.seed, strict=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
