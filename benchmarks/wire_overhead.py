"""Wire bytes of an adapter update (p2pfed.net.wire.encode_update) against the raw bytes of its tensors.

Two adapters, LoRA on GPT-2's c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj with peft's shapes
(lora_A: rank x in, lora_B: out x rank), named as p2pfed names them on the wire:

  tiny        the default experiment's model: 2 layers, n_embd 64, rank 8 (16 tensors, 64 KiB as fp32)
  gpt2_small  GPT-2-small-like: 12 layers of 768, rank 16 (96 tensors, 9.4 MB as fp32)

For each encoding (fp32, fp16, bf16): the framing overhead, wire bytes over the tensors' raw bytes in that
encoding, less one; and the half-precision wire sizes over fp32's. Sizes do not depend on the values.

    .venv/bin/python benchmarks/wire_overhead.py

Targets, for the gpt2_small adapter: overhead < 2% in every encoding, and bf16 halves the bytes (bf16 wire
<= 0.51 x fp32 wire). The tiny adapter's figures are information: each tensor's name, dtype and shape take
about 70 bytes: 1.8% of the fp32 adapter (64 KiB), 3.6% of the half-precision one.
"""

from __future__ import annotations

import torch

from p2pfed.net.wire import ENCODINGS, UpdateMessage, encode_update

ADAPTERS = {  # name: (layers, n_embd, rank)
    "tiny": (2, 64, 8),
    "gpt2_small": (12, 768, 16),
}
TARGET_OVERHEAD_PCT = 2.0
TARGET_HALF = 0.51
_BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}


def gpt2_lora_shapes(layers: int, n_embd: int, rank: int) -> dict[str, tuple[int, int]]:
    """Wire name -> shape of every LoRA tensor on a GPT-2 model's attention and MLP linears."""
    linears = {"attn.c_attn": (n_embd, 3 * n_embd), "attn.c_proj": (n_embd, n_embd),
               "mlp.c_fc": (n_embd, 4 * n_embd), "mlp.c_proj": (4 * n_embd, n_embd)}
    shapes = {}
    for layer in range(layers):
        for path, (fan_in, fan_out) in linears.items():
            shapes[f"transformer.h.{layer}.{path}.lora_A"] = (rank, fan_in)
            shapes[f"transformer.h.{layer}.{path}.lora_B"] = (fan_out, rank)
    return shapes


def measure(layers: int, n_embd: int, rank: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.02
               for name, shape in gpt2_lora_shapes(layers, n_embd, rank).items()}
    # A realistic envelope: a 52-character libp2p peer ID as the sender, round numbers of a few digits.
    message = UpdateMessage(sender="12D3KooW" + "x" * 44, round=123, tensors=tensors, degree=7, num_samples=81920)
    elements = sum(t.numel() for t in tensors.values())
    wire = {encoding: len(encode_update(message, encoding)) for encoding in ENCODINGS}
    result: dict = {"tensors": len(tensors), "elements": elements, "wire_bytes": wire}
    for encoding in ENCODINGS:
        raw = elements * _BYTES_PER_ELEMENT[encoding]
        result[f"{encoding}_overhead_pct"] = 100 * (wire[encoding] / raw - 1)
    for encoding in ("fp16", "bf16"):
        result[f"{encoding}_over_fp32"] = wire[encoding] / wire["fp32"]
    return result


def main() -> dict:
    print("wire bytes of an update (msgpack framing) against its raw tensor bytes")
    results = {}
    for name, (layers, n_embd, rank) in ADAPTERS.items():
        r = results[name] = measure(layers, n_embd, rank)
        print(f"  {name:10s} {layers:2d} layers x {n_embd:3d}, rank {rank:2d}: {r['tensors']:3d} tensors, "
              f"{r['elements'] * 4 / 1e6:6.3f} MB as fp32")
        print("             overhead " + "  ".join(f"{e} {r[f'{e}_overhead_pct']:5.2f}%" for e in ENCODINGS)
              + f"   wire fp16/fp32 {r['fp16_over_fp32']:.3f}  bf16/fp32 {r['bf16_over_fp32']:.3f}")
    print(f"  targets (gpt2_small): overhead < {TARGET_OVERHEAD_PCT:g}%, bf16/fp32 <= {TARGET_HALF}")
    return results


if __name__ == "__main__":
    main()
