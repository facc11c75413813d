"""Run every benchmark in this folder and print a summary of the ratios they measure (`make bench`).

A missed target is reported, not raised: on a shared machine one slow run is not a regression.
The exit status is non-zero only when a benchmark fails to run.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks import `common` as a sibling

from common import setup  # noqa: E402

# (module, how to call its main, [(label, key in its result, target test or None, target text)])
Check = tuple[str, str, Callable[[float], bool] | None, str]
BENCHMARKS: list[tuple[str, Callable, list[Check]]] = [
    ("swarm_overhead", lambda m: m.main(), [
        ("swarm / plain peft, peer-steps/s", "ratio_swarm_over_plain", lambda r: r >= 0.95, ">= 0.95"),
    ]),
    ("memory", lambda m: m.main(), [
        ("peak RSS of a 1,000-peer job, MB", "largest_peak_mb", lambda mb: mb < 2048, "< 2048"),
        ("heap trim: trimmed / untrimmed time", "trim_time_ratio", lambda r: r < 1.05, "< 1.05"),
    ]),
    ("trust_cost", lambda m: m.main(), [
        ("validation trust / training round", "validation_over_train", None, "(info)"),
        ("predictions trust / training round", "predictions_over_train", None, "(info)"),
        ("spread trust (default) / training round", "spread_over_train", lambda r: r <= 0.3, "<= 0.3"),
        ("adaptive trust / training round", "adaptive_over_train", None, "(info)"),
        ("validation in chunks of 8 / whole set", "chunks8_over_whole", None, "(info)"),
        ("looped / vmapped validation", "looped_over_vmap", None, "(info, > 1: vmap faster)"),
    ]),
    # Written separately; run with one thread like the rest.
    ("flexlora_projection", lambda m: m.main(threads=1), [
        ("dense SVD / QR + small SVD", "speedup_dense_over_qr", lambda r: r >= 10, ">= 10"),
    ]),
    ("expert_layer", lambda m: m.main(), [
        ("experts 1g+1s top-2 / LoRA 2r, n_embd 64", "n_embd_64.ratio_experts_vs_lora", lambda r: r <= 1.3, "<= 1.3"),
        ("experts 1g+1s top-2 / LoRA 2r, n_embd 256", "n_embd_256.ratio_experts_vs_lora", lambda r: r <= 1.3,
         "<= 1.3"),
    ]),
    ("libp2p_throughput", lambda m: m.main(), [
        ("libp2p / raw TCP, 1 MB update", "1 MB.ratio_libp2p_over_raw", lambda r: r >= 0.3, ">= 0.3"),
        ("libp2p / raw TCP, 10 MB update", "10 MB.ratio_libp2p_over_raw", lambda r: r >= 0.3, ">= 0.3"),
    ]),
    ("wire_overhead", lambda m: m.main(), [
        ("wire overhead %, GPT-2-small LoRA r16, fp32", "gpt2_small.fp32_overhead_pct", lambda p: p < 2, "< 2"),
        ("wire overhead %, GPT-2-small LoRA r16, bf16", "gpt2_small.bf16_overhead_pct", lambda p: p < 2, "< 2"),
        ("bf16 / fp32 wire bytes, GPT-2-small LoRA", "gpt2_small.bf16_over_fp32", lambda r: r <= 0.51, "<= 0.51"),
        ("wire overhead %, tiny LoRA r8, fp32", "tiny.fp32_overhead_pct", None, "(info)"),
        ("wire overhead %, tiny LoRA r8, bf16", "tiny.bf16_overhead_pct", None, "(info)"),
    ]),
    # A decoder exception other than WireError is a bug, not noise: strict makes it a failed run.
    ("fuzz_wire", lambda m: m.main(strict=True), [
        ("fuzz: inputs generated + decoded per s", "per_second", None, "(info)"),
        ("fuzz: other exceptions, 100k inputs", "other", lambda n: n == 0, "== 0"),
    ]),
    ("libp2p_swarm_round", lambda m: m.main(), [
        ("4-process libp2p / in-process round time", "ratio_libp2p_over_inprocess", None, "(info)"),
    ]),
    # Needs root (network namespaces): without it, it prints why and reports n/a.
    ("link_latency", lambda m: m.main(), [
        ("round time, 20 ms links / 0 ms", "ratio_20ms", None, "(info)"),
        ("round time, 100 ms links / 0 ms", "ratio_100ms", None, "(info)"),
        ("round time, 20 ms + 1% loss / 0 ms", "ratio_loss", None, "(info)"),
    ]),
    ("strangers", lambda m: m.main(), [
        ("stranger connections: RSS MB per 1,000", "rss_mb_per_1000", lambda mb: mb < 50, "< 50"),
        ("a neighbour delivers after them (1 = yes)", "neighbour_delivered", lambda ok: ok == 1, "= 1"),
    ]),
]


def lookup(result: dict, key: str):
    """A value by dotted path, for benchmarks that nest their results."""
    value = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def run(name: str, call: Callable) -> dict | None:
    if not (Path(__file__).resolve().parent / f"{name}.py").is_file():
        print(f"({name}.py is not here; skipped)")
        return None
    print(f"\n== {name}")
    start = time.perf_counter()
    try:
        result = call(importlib.import_module(name))
    except (Exception, SystemExit):  # SystemExit: a benchmark that refuses its own numbers
        traceback.print_exc()
        return {"failed": True}
    print(f"({time.perf_counter() - start:.0f} s)")
    return result


def main() -> int:
    setup()
    results = {name: run(name, call) for name, call, _ in BENCHMARKS}
    print("\n== summary")
    failed = False
    for name, _, checks in BENCHMARKS:
        result = results[name]
        if result is None:
            continue
        if result.get("failed"):
            failed = True
            print(f"  {name}: FAILED (see above)")
            continue
        for label, key, test, target in checks:
            value = lookup(result, key)
            verdict = "" if test is None or value is None else ("ok" if test(value) else "MISSED")
            shown = "n/a" if value is None else f"{value:8.2f}"
            print(f"  {label:42s} {shown:>8}  {target:24s} {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
