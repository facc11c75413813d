"""FlexLoRA projection: QR + small SVD against the dense SVD, side by side in one run.

Layer: a GPT-2-small MLP up-projection, W of shape out x in = 3072 x 768 (in = the model
width 768, out = the 4x MLP width 3072). The aggregating peer and 8 neighbours, all rank
16, so R = 9 * 16 = 144 stacked directions; target rank 16. Prints median times, the speed
ratio dense / qr, and how closely the two results agree.

    .venv/bin/python benchmarks/flexlora_projection.py [--threads N] [--device cuda]

On a CPU shared with other busy processes, multi-threaded LAPACK can stall badly;
`--threads 1` gives steadier numbers there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from p2pfed.aggregate import LoraFactors, dense_project, flexlora_project
from p2pfed.config import lora_scale

OUT_DIM, IN_DIM = 3072, 768
NEIGHBOURS = 8
PEER_RANK = 16
TARGET_RANK = 16
ALPHA = 32.0


def _time(fn: Callable[[], LoraFactors], repeats: int, device: torch.device) -> tuple[float, LoraFactors]:
    result = fn()  # warm-up: first-call allocations and library loading are not the point
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        result = fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(repeats: int = 9, seed: int = 0, threads: int | None = None, device: str = "cpu") -> dict[str, float | int | str]:
    if threads is not None:
        torch.set_num_threads(threads)
    where = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    scale = lora_scale(ALPHA, PEER_RANK)
    factors = [
        LoraFactors(
            A=(torch.randn(PEER_RANK, IN_DIM, generator=gen) / IN_DIM**0.5).to(where),
            B=(torch.randn(OUT_DIM, PEER_RANK, generator=gen) * 0.01).to(where),
            scale=scale,
        )
        for _ in range(NEIGHBOURS + 1)
    ]
    weights = torch.softmax(torch.randn(NEIGHBOURS + 1, generator=gen), dim=0).tolist()
    target_scale = lora_scale(ALPHA, TARGET_RANK)

    qr_s, fast = _time(lambda: flexlora_project(factors, weights, TARGET_RANK, target_scale), repeats, where)
    dense_s, slow = _time(lambda: dense_project(factors, weights, TARGET_RANK, target_scale), repeats, where)

    fast_product = fast.scale * (fast.B.double() @ fast.A.double())
    slow_product = slow.scale * (slow.B.double() @ slow.A.double())
    relative_difference = ((fast_product - slow_product).norm() / slow_product.norm()).item()
    results = {
        "out": OUT_DIM,
        "in": IN_DIM,
        "adapters": NEIGHBOURS + 1,
        "peer_rank": PEER_RANK,
        "target_rank": TARGET_RANK,
        "device": str(where),
        "threads": torch.get_num_threads(),
        "qr_median_s": qr_s,
        "dense_median_s": dense_s,
        "speedup_dense_over_qr": dense_s / qr_s,
        "relative_difference": relative_difference,
    }
    print(
        f"W {OUT_DIM} x {IN_DIM}, {NEIGHBOURS} neighbours + self at rank {PEER_RANK} -> rank {TARGET_RANK}, "
        f"{where}, {torch.get_num_threads()} threads, median of {repeats}"
    )
    print(f"  qr + small svd : {qr_s * 1e3:9.2f} ms")
    print(f"  dense svd      : {dense_s * 1e3:9.2f} ms")
    print(f"  ratio dense/qr : {dense_s / qr_s:9.1f} x")
    print(f"  agreement      : relative Frobenius difference of the products {relative_difference:.2e}")
    if relative_difference > 1e-5:
        raise SystemExit(f"the two projections disagree: {relative_difference:.2e}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    main(repeats=args.repeats, threads=args.threads, device=args.device)
