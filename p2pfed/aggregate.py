"""Aggregation of shared adapter tensors: weighted averages and FlexLoRA rank projection.

Pure tensor math; the weights come from `p2pfed.trust`. Formulas: docs/algorithms.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "weighted_average",
    "LoraFactors",
    "product_sq_norm",
    "flexlora_project",
    "dense_project",
    "zero_padded_average",
    "lora_pairs",
    "project_adapter",
]

WEIGHT_SUM_TOLERANCE = 1e-6


def weighted_average(
    states: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float]
) -> dict[str, Tensor]:
    """theta = sum_j w_j theta_j for every tensor name (A and B each, as in section 1).

    Every state needs a weight (0 is fine); a peer with weight 0 may be absent from
    `states`, one with a positive weight may not. Weights must be non-negative and sum to
    1. The result is float32 on the device of the first positively weighted state (in
    `weights` order), in fresh tensors that never alias an input.
    """
    _check_weights(weights)
    unweighted = sorted(set(states) - set(weights))
    if unweighted:
        raise ValueError(f"states of {unweighted} have no weight")
    missing = sorted(p for p, w in weights.items() if w > 0 and p not in states)
    if missing:
        raise ValueError(f"no state for {missing}, whose weights are positive")

    # Non-negative weights summing to 1 guarantee at least one contributor.
    contributing = [(p, w) for p, w in weights.items() if w > 0]
    reference = states[contributing[0][0]]
    for peer, state in states.items():
        check_same_layout(reference, state, f"state of {peer!r}")

    device = next(iter(reference.values())).device if reference else None
    result: dict[str, Tensor] = {}
    for name, tensor in reference.items():
        total = torch.zeros(tensor.shape, dtype=torch.float32, device=device)
        for peer, weight in contributing:
            total.add_(states[peer][name].detach().to(device=device, dtype=torch.float32), alpha=weight)
        result[name] = total
    return result


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA module's factors: Delta W = scale * B @ A."""

    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    scale: float  # alpha / r, or alpha / sqrt(r) for rsLoRA

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"expected A (r, in) and B (out, r), got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        """The dense update scale * B @ A (out, in); for tests and small layers."""
        return self.scale * (self.B @ self.A)


def flexlora_project(
    factors: Sequence[LoraFactors], weights: Sequence[float], rank: int, scale: float
) -> LoraFactors:
    """Best rank-`rank` factors of Delta W = sum_j w_j s_j B_j A_j, without forming Delta W.

    Bs = [w_j s_j B_j] (out x R) and As = [A_j] (R x in), R = sum r_j, give
    Delta W = Bs @ As. Thin QR Bs = Q1 R1 and As^T = Q2 R2 make
    Delta W = Q1 (R1 R2^T) Q2^T, so the SVD of the small core R1 R2^T gives Delta W's:
    U = Q1 U_c, V = Q2 V_c. Cost O((out + in) R^2) instead of O(out * in * min(out, in)).
    Each neighbour's own scale s_j multiplies its product (the reference code mixed
    alpha/r with alpha/sqrt(r)); the result's B is divided by the receiver's `scale`.
    Peers with weight 0 are skipped. float64 inside, float32 out.
    """
    out_dim, in_dim, kept = _prepare(factors, weights, rank, scale)
    device = factors[0].A.device
    if not kept:
        return _factors_from_svd(None, None, None, rank, scale, out_dim, in_dim, device)
    b_stack = torch.cat([w * f.scale * _f64(f.B, device) for f, w in kept], dim=1)
    a_stack = torch.cat([_f64(f.A, device) for f, _ in kept], dim=0)
    q1, r1 = torch.linalg.qr(b_stack)
    q2, r2 = torch.linalg.qr(a_stack.T)
    u_core, singular, vh_core = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    return _factors_from_svd(q1 @ u_core, singular, (q2 @ vh_core.T).T, rank, scale, out_dim, in_dim, device)


def dense_project(
    factors: Sequence[LoraFactors], weights: Sequence[float], rank: int, scale: float
) -> LoraFactors:
    """The same projection by a dense SVD of Delta W: the oracle for tests and benchmarks."""
    out_dim, in_dim, kept = _prepare(factors, weights, rank, scale)
    device = factors[0].A.device
    if not kept:
        return _factors_from_svd(None, None, None, rank, scale, out_dim, in_dim, device)
    dense = sum(w * f.scale * (_f64(f.B, device) @ _f64(f.A, device)) for f, w in kept)
    u, singular, vh = torch.linalg.svd(dense, full_matrices=False)
    return _factors_from_svd(u, singular, vh, rank, scale, out_dim, in_dim, device)


def zero_padded_average(
    factors: Sequence[LoraFactors], weights: Sequence[float], rank: int, scale: float | None = None
) -> LoraFactors:
    """The naive baseline FlexLoRA improves on: average A and B separately.

    Each A is padded with zero rows and each B with zero columns to the largest rank, the
    padded factors are averaged with `weights`, and the result is truncated or zero-padded
    to `rank`. Mean(B) @ mean(A) is not the mean of B_j @ A_j, and scales are ignored:
    that is the point of the baseline. The result carries `scale`; None takes the common
    scale of `factors` (an error if they differ).
    """
    out_dim, in_dim, _ = _prepare(factors, weights, rank, scale=1.0)
    if scale is None:
        scales = {f.scale for f in factors}
        if len(scales) != 1:
            raise ValueError(f"factors have different scales {sorted(scales)}; pass scale")
        scale = scales.pop()
    device = factors[0].A.device
    width = max(rank, max(f.rank for f in factors))
    a_sum = torch.zeros(width, in_dim, dtype=torch.float64, device=device)
    b_sum = torch.zeros(out_dim, width, dtype=torch.float64, device=device)
    for f, w in zip(factors, weights):
        a_sum[: f.rank] += w * _f64(f.A, device)
        b_sum[:, : f.rank] += w * _f64(f.B, device)
    return LoraFactors(
        A=a_sum[:rank].to(torch.float32), B=b_sum[:, :rank].to(torch.float32), scale=scale
    )


def product_sq_norm(factors: LoraFactors) -> float:
    """||s B A||_F^2 without forming B A: s^2 sum((B^T B) * (A A^T))."""
    b, a = factors.B.double(), factors.A.double()
    return factors.scale ** 2 * float(((b.T @ b) * (a @ a.T)).sum())


def lora_pairs(tensors: Mapping[str, Tensor], scale_of: Callable[[int], float]) -> dict[str, LoraFactors]:
    """Group "<module>.lora_A" / "<module>.lora_B" tensors into factors, each with the scale of its rank.

    Raises ValueError for a tensor that is not half of a 2-D LoRA pair, or for a pair whose ranks
    disagree: rank-flexible aggregation is defined for plain LoRA factors only.
    """
    pairs: dict[str, LoraFactors] = {}
    for name in tensors:
        prefix, _, part = name.rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise ValueError(f"{name!r} is not a LoRA factor: rank-flexible aggregation takes lora_A/lora_B only")
        if prefix in pairs:
            continue
        a, b = tensors.get(f"{prefix}.lora_A"), tensors.get(f"{prefix}.lora_B")
        if a is None or b is None:
            raise ValueError(f"{prefix}: lora_A and lora_B must come together")
        factors = LoraFactors(A=a, B=b, scale=1.0)  # checks the shapes
        pairs[prefix] = LoraFactors(A=a, B=b, scale=scale_of(factors.rank))
    return pairs


def project_adapter(
    states: Mapping[str, Mapping[str, Tensor]],
    weights: Mapping[str, float],
    own: str,
    scale_of: Callable[[int], float],
    method: str = "flexlora",
) -> dict[str, Tensor]:
    """Aggregate whole LoRA adapters of possibly different ranks onto `own`'s rank, layer by layer.

    "flexlora": the best rank-r_own factors of sum_j w_j s_j B_j A_j; "zero_padded": the baseline
    that averages zero-padded A and B. Peers with weight 0 are left out.
    """
    if method not in ("flexlora", "zero_padded"):
        raise ValueError(f"unknown projection {method!r}")
    _check_weights({p: weights.get(p, 0.0) for p in states})
    peers = [p for p in states if weights.get(p, 0.0) > 0 or p == own]
    by_peer = {p: lora_pairs(states[p], scale_of) for p in peers}
    merged: dict[str, Tensor] = {}
    for prefix, mine in by_peer[own].items():
        missing = [p for p in peers if prefix not in by_peer[p]]
        if missing:
            raise ValueError(f"{missing} sent no factors for {prefix}")
        factors = [by_peer[p][prefix] for p in peers]
        peer_weights = [weights.get(p, 0.0) for p in peers]
        if method == "flexlora":
            result = flexlora_project(factors, peer_weights, mine.rank, mine.scale)
        else:
            result = zero_padded_average(factors, peer_weights, mine.rank, mine.scale)
        merged[f"{prefix}.lora_A"], merged[f"{prefix}.lora_B"] = result.A, result.B
    return merged


# ---------------------------------------------------------------------------


def _f64(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.detach().to(device=device, dtype=torch.float64)


def _check_weights(weights: Mapping[str, float]) -> None:
    negative = sorted(p for p, w in weights.items() if not w >= 0)  # also catches NaN
    if negative:
        raise ValueError(f"weights of {negative} are negative or NaN")
    total = sum(weights.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"weights must sum to 1, got {total!r}")


def check_same_layout(reference: Mapping[str, Tensor], state: Mapping[str, Tensor], what: str) -> None:
    """Raise ValueError unless `state` has exactly `reference`'s tensor names and shapes."""
    if set(state) != set(reference):
        missing = sorted(set(reference) - set(state))
        extra = sorted(set(state) - set(reference))
        raise ValueError(f"{what} has different tensors (missing {missing}, extra {extra})")
    for name, tensor in reference.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"expected {tuple(tensor.shape)}")


def _prepare(
    factors: Sequence[LoraFactors], weights: Sequence[float], rank: int, scale: float
) -> tuple[int, int, list[tuple[LoraFactors, float]]]:
    """Check the inputs; return (out, in, the factors with non-zero weight)."""
    if not factors:
        raise ValueError("need at least one set of factors")
    if len(factors) != len(weights):
        raise ValueError(f"{len(factors)} factors but {len(weights)} weights")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
    out_dim, in_dim = factors[0].B.shape[0], factors[0].A.shape[1]
    for j, f in enumerate(factors):
        if (f.B.shape[0], f.A.shape[1]) != (out_dim, in_dim):
            raise ValueError(
                f"factors {j} adapt a ({f.B.shape[0]} x {f.A.shape[1]}) layer, "
                f"factors 0 a ({out_dim} x {in_dim}) one"
            )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {list(weights)}")
    return out_dim, in_dim, [(f, w) for f, w in zip(factors, weights) if w != 0]


def _factors_from_svd(
    u: Tensor | None,
    singular: Tensor | None,
    vh: Tensor | None,
    rank: int,
    scale: float,
    out_dim: int,
    in_dim: int,
    device: torch.device,
) -> LoraFactors:
    """A = V^T[:rank], B = U[:, :rank] diag(S[:rank]) / scale, completed to `rank`.

    When fewer than `rank` singular directions exist, B gets zero columns (the product is
    unchanged) but A gets orthonormal rows orthogonal to the others rather than zeros: a
    LoRA direction with a zero row of A and a zero column of B receives no gradient in
    either factor and would stay dead for the rest of training.
    """
    a = torch.zeros(rank, in_dim, dtype=torch.float64, device=device)
    b = torch.zeros(out_dim, rank, dtype=torch.float64, device=device)
    found = 0
    if singular is not None:
        found = min(rank, singular.shape[0])
        a[:found] = vh[:found]
        b[:, :found] = u[:, :found] * (singular[:found] / scale)
    fill = min(rank, in_dim) - found
    if fill > 0:
        # Householder QR always returns orthonormal columns, whatever the appended columns are.
        basis = torch.cat([a[:found].T, torch.eye(in_dim, fill, dtype=torch.float64, device=device)], dim=1)
        q, _ = torch.linalg.qr(basis)
        a[found : found + fill] = q[:, found : found + fill].T
    return LoraFactors(A=a.to(torch.float32), B=b.to(torch.float32), scale=scale)
