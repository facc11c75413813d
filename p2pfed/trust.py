"""The math of trust: scores in, a probability vector over a peer's neighbourhood out.

Pure functions on plain dicts keyed by peer name, covering the peer itself and its
neighbours only (a peer never needs a global view). Nothing here runs a model: the
caller computes losses or predictions and hands the numbers in. Formulas: docs/algorithms.md.

Scores come from neighbours' updates, so they are untrusted: a non-finite score means no trust
(weight 0), never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from p2pfed.aggregate import LoraFactors, check_same_layout

__all__ = [
    "softmax_weights",
    "spread_width",
    "spread_weights",
    "sanitized_weights",
    "local_weights",
    "uniform_weights",
    "metropolis_hastings_weights",
    "data_size_weights",
    "cosine_scores",
    "product_cosine_scores",
    "oracle_weights",
    "predictions_distance",
]


def softmax_weights(
    scores: Mapping[str, float],
    self_name: str,
    temperature: float,
    top_k: int = 0,
    threshold: float | None = None,
) -> dict[str, float]:
    """w_j = softmax_j(S_j / temperature) over the peer and its neighbours.

    `top_k > 0` keeps the peer plus its k best-scored neighbours (ties broken by name so
    that every run picks the same ones); the rest get weight 0. `threshold` then drops
    neighbours (never the peer) whose weight is below it, in a single pass, and the
    survivors are renormalised. A score of -inf means "no trust" and gets weight 0; if
    every kept score is -inf the peer stays local. NaN and +inf (what an extreme neighbour
    can provoke) count as -inf; a non-finite score of the peer itself keeps it local. The
    result has every key of `scores` (dropped ones 0.0) and sums to 1.
    """
    if self_name not in scores:
        raise ValueError(f"scores must include the peer itself ({self_name!r})")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"top_k must not be negative, got {top_k}")
    if threshold is not None and math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    if not math.isfinite(scores[self_name]):
        return local_weights(self_name, (n for n in scores if n != self_name))
    # In a fixed order (the peer, then its neighbours by name), not in the order updates arrived: the row, and
    # the aggregate summed in its order, are then the same bits in every run and runtime.
    scores = {n: scores[n] if math.isfinite(scores[n]) else -math.inf for n in _canonical(scores, self_name)}

    kept = set(scores)
    if top_k > 0:
        neighbours = sorted((n for n in scores if n != self_name), key=lambda n: (-scores[n], n))
        kept = {self_name, *neighbours[:top_k]}

    best = max(scores[n] for n in kept)
    if best == -math.inf:
        return local_weights(self_name, (n for n in scores if n != self_name))
    # Subtract the max before dividing: (S - max) / tau <= 0 never overflows, even for tiny tau.
    raw = {n: math.exp((scores[n] - best) / temperature) if n in kept else 0.0 for n in scores}
    weights = _normalise(raw)

    if threshold is not None:
        survivors = {n: 0.0 if n != self_name and w < threshold else w for n, w in weights.items()}
        if sum(survivors.values()) == 0.0:
            # Only the peer survived, with a weight that underflowed to 0: it stays local.
            return local_weights(self_name, (n for n in scores if n != self_name))
        weights = _normalise(survivors)
    return weights


def spread_width(scores: Mapping[str, float], per_spread: float, floor: float, ceiling: float) -> float:
    """`per_spread` x the standard deviation of the finite scores, clamped to [floor, ceiling]: the width of
    spread_weights' kernel. The floor keeps a neighbourhood with no structure (all scores within noise) from
    having its noise magnified into sharp weights; the ceiling keeps one wild neighbour (a loss far off the
    rest) from widening the kernel over everyone."""
    finite = [v for v in scores.values() if math.isfinite(v)]
    if len(finite) < 2:
        return floor
    # Computed on the scores divided by the largest magnitude: untrusted scores near the float range do not
    # overflow the sum or the squares (a spread that is itself too large for a float gets the ceiling).
    scale = max(abs(v) for v in finite)
    if scale == 0:
        return floor
    unit = [v / scale for v in finite]
    mean = math.fsum(unit) / len(unit)
    spread = scale * math.sqrt(math.fsum((v - mean) ** 2 for v in unit) / len(unit))
    return min(ceiling, max(floor, per_spread * spread))


def spread_weights(
    scores: Mapping[str, float],
    self_name: str,
    per_spread: float,
    floor: float,
    ceiling: float,
    top_k: int = 0,
    threshold: float | None = None,
) -> dict[str, float]:
    """w_j ∝ exp(-((S_best - S_j) / h)^2), h = spread_width(scores): a Gaussian kernel on each score's gap to
    the best one. Flat while the gap is within the kernel's width (the peer's own group, as the oracle's
    uniform row), and falling off faster than any softmax beyond it (another group gets next to nothing even
    where it lies close). Tied to the spread, one setting of `per_spread` fits groups far apart and close ones.
    Non-finite scores, top_k and threshold as in softmax_weights (it computes the row)."""
    if self_name not in scores:
        raise ValueError(f"scores must include the peer itself ({self_name!r})")
    width = spread_width(scores, per_spread, floor, ceiling)
    finite = [v for v in scores.values() if math.isfinite(v)]
    best = max(finite, default=0.0)
    # A gap of 1e100 widths already weighs exactly 0: capped there, its square stays a finite float.
    kernel = {n: -min((best - v) / width, 1e100) ** 2 if math.isfinite(v) else -math.inf for n, v in scores.items()}
    return softmax_weights(kernel, self_name, 1.0, top_k, threshold)


def sanitized_weights(weights: Mapping[str, float], self_name: str) -> dict[str, float]:
    """`weights` as a probability vector: non-finite or negative entries become 0, then renormalised;
    with nothing left, the peer stays local."""
    if self_name not in weights:
        raise ValueError(f"weights must include the peer itself ({self_name!r})")
    clean = {n: w if math.isfinite(w) and w > 0 else 0.0 for n, w in weights.items()}
    if sum(clean.values()) <= 0 or not math.isfinite(sum(clean.values())):
        return local_weights(self_name, (n for n in weights if n != self_name))
    clean = {n: clean[n] for n in _canonical(clean, self_name)}
    if all(clean[n] == weights[n] for n in weights) and abs(math.fsum(clean.values()) - 1.0) <= 1e-9:
        return {n: weights[n] for n in clean}  # already a probability vector: keep it bit for bit
    return _normalise(clean)


def local_weights(self_name: str, neighbours: Iterable[str]) -> dict[str, float]:
    """No aggregation: the peer keeps its own adapter (weight 1), neighbours get 0."""
    names = _neighbourhood(self_name, neighbours)
    return {n: 1.0 if n == self_name else 0.0 for n in names}


def uniform_weights(self_name: str, neighbours: Iterable[str]) -> dict[str, float]:
    """Gossip averaging: 1 / |K(i)| for the peer and every neighbour."""
    names = _neighbourhood(self_name, neighbours)
    return {n: 1.0 / len(names) for n in names}


# A neighbour's self-reported data size counts at most this many times the peer's own: a liar cannot
# take the whole weight by claiming 2**63 tokens, while honest sizes within 10x of each other stay exact.
MAX_DATA_SIZE_RATIO = 10.0


def data_size_weights(self_name: str, own_samples: int, neighbour_samples: Mapping[str, int],
                      max_ratio: float = MAX_DATA_SIZE_RATIO) -> dict[str, float]:
    """FedAvg's classic weights: proportional to each peer's training tokens (neighbours report theirs,
    clipped to [0, max_ratio x the peer's own])."""
    cap = max_ratio * max(own_samples, 1)
    sizes = {self_name: own_samples, **{n: min(max(s, 0), cap) for n, s in neighbour_samples.items()}}
    total = sum(sizes.values())
    if total <= 0:
        return uniform_weights(self_name, neighbour_samples)
    return {n: size / total for n, size in sizes.items()}


def metropolis_hastings_weights(
    self_name: str, self_degree: int, neighbour_degrees: Mapping[str, int]
) -> dict[str, float]:
    """w_ij = 1 / (1 + max(deg_i, deg_j)), w_ii = 1 - sum_j w_ij.

    Degrees are graph degrees (neighbours report theirs in their messages).
    `neighbour_degrees` may list fewer peers than `self_degree` (a message was lost or a
    neighbour sat the round out): the missing share stays with the peer, so the row
    remains a probability vector and w_ii >= 1 / (1 + deg_i) > 0.
    """
    if self_name in neighbour_degrees:
        raise ValueError(f"neighbour_degrees must not include the peer itself ({self_name!r})")
    if len(neighbour_degrees) > self_degree:
        raise ValueError(
            f"{len(neighbour_degrees)} neighbours reported but the peer's degree is {self_degree}"
        )
    for name, degree in neighbour_degrees.items():
        if degree < 1:
            raise ValueError(f"degree of neighbour {name!r} must be at least 1, got {degree}")
    others = {n: 1.0 / (1 + max(self_degree, d)) for n, d in neighbour_degrees.items()}
    return {self_name: 1.0 - sum(others.values()), **others}


def cosine_scores(
    own: Mapping[str, Tensor],
    others: Mapping[str, Mapping[str, Tensor]],
    self_name: str,
    reference: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Cosine similarity of whole flattened adapters (every tensor, A and B together).

    With `reference` (the adapter at the last aggregation) the updates theta - reference
    are compared instead. The reference code averaged cosines of 4-dim rows of A and
    ignored B; comparing the whole vector is what the score means. The peer scores 1.0;
    a zero vector on either side scores 0.0 (no direction, no trust, and no NaN).
    """
    if self_name in others:
        raise ValueError(f"others must not include the peer itself ({self_name!r})")
    names = sorted(own)
    if reference is not None:
        check_same_layout(own, reference, "reference")
    # float64 so that near-parallel large vectors do not round past 1; every sum over tensors in name order and
    # exactly rounded (fsum), neighbours in name order: the same bits whatever order the updates arrived in.
    mine = {n: _delta(own[n], reference, n, own[n].device) for n in names}
    own_sq = math.fsum(float((mine[n] * mine[n]).sum()) for n in names)

    scores = {self_name: 1.0}
    for peer in sorted(others):
        state = others[peer]
        check_same_layout(own, state, f"adapter of {peer!r}")
        theirs = {n: _delta(state[n], reference, n, mine[n].device) for n in names}
        dot = math.fsum(float((mine[n] * theirs[n]).sum()) for n in names)
        other_sq = math.fsum(float((theirs[n] * theirs[n]).sum()) for n in names)
        denominator = math.sqrt(own_sq) * math.sqrt(other_sq)
        cosine = dot / denominator if denominator > 0 else 0.0
        scores[peer] = min(1.0, max(-1.0, cosine))
    return scores


def product_cosine_scores(
    own: Mapping[str, LoraFactors], others: Mapping[str, Mapping[str, LoraFactors]], self_name: str
) -> dict[str, float]:
    """Cosine similarity of the full updates s B A, over all layers, without forming them.

    The one comparison defined across ranks (FlexLoRA): <s B A, t D C>_F = s t sum((B^T D) * (A C^T)).
    Since every B starts at zero, s B A is also the update since the shared init.
    """
    if self_name in others:
        raise ValueError(f"others must not include the peer itself ({self_name!r})")

    def inner(x: Mapping[str, LoraFactors], y: Mapping[str, LoraFactors]) -> float:
        terms = []
        for prefix in sorted(x):  # layers in name order, summed exactly: independent of arrival order
            f, g = x[prefix], y[prefix]
            ab = f.B.double().T @ g.B.double()
            aa = f.A.double() @ g.A.double().T
            terms.append(f.scale * g.scale * float((ab * aa).sum()))
        return math.fsum(terms)

    own_sq = inner(own, own)
    scores = {self_name: 1.0}
    for peer in sorted(others):
        factors = others[peer]
        if set(factors) != set(own):
            raise ValueError(f"adapter of {peer!r} adapts different layers")
        denominator = math.sqrt(own_sq) * math.sqrt(inner(factors, factors))
        scores[peer] = min(1.0, max(-1.0, inner(own, factors) / denominator)) if denominator > 0 else 0.0
    return scores


def oracle_weights(self_name: str, mixtures: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Uniform over the peer and the neighbours whose dominant data group equals its own.

    The baseline that knows the synthetic split. `mixtures` maps each peer of K(i) to its
    data mixture (group -> share); the dominant group is the argmax, ties broken by group
    name. Neighbours of other groups get 0.
    """
    if self_name not in mixtures:
        raise ValueError(f"mixtures must include the peer itself ({self_name!r})")
    dominant = {peer: _dominant_group(peer, mix) for peer, mix in mixtures.items()}
    same = [p for p in mixtures if dominant[p] == dominant[self_name]]
    return {p: 1.0 / len(same) if p in same else 0.0 for p in mixtures}


def predictions_distance(
    own_top_logprobs: Tensor,
    own_top_index: Tensor,
    other_logprobs: Tensor,
    kind: str = "kl",
) -> Tensor:
    """Distance between a neighbour's next-token predictions and the peer's own.

    own_top_logprobs, own_top_index: (positions, k), the peer's own (full-vocabulary,
    not renormalised) log-probs of its top-k tokens and their indices.
    other_logprobs: (positions, vocab), the neighbour's full log-probs at those positions.

    Choice: both distributions are coarse-grained to k + 1 outcomes, the peer's own top-k
    tokens plus one bucket "every other token" holding the remaining mass. Then
      kl: mean over positions of KL(p || q) on those k + 1 outcomes,
      l1: mean over positions of sum_k |p_k - q_k| + |p_rest - q_rest|.
    Both are true divergences of the coarse-grained distributions (so lower bounds of the
    full KL / L1), are exactly 0 for identical predictions, and still see mass that the
    neighbour moves off the peer's top-k. Renormalising p alone over the top-k would not
    give 0 for identical predictions; renormalising both would be blind to that mass.
    Returns a 0-dim float32 tensor (+inf for kl where q gives 0 to a token p does not).
    """
    if kind not in ("kl", "l1"):
        raise ValueError(f"kind must be 'kl' or 'l1', got {kind!r}")
    if own_top_logprobs.dim() != 2 or own_top_logprobs.shape != own_top_index.shape:
        raise ValueError(
            "own_top_logprobs and own_top_index must both be (positions, k), got "
            f"{tuple(own_top_logprobs.shape)} and {tuple(own_top_index.shape)}"
        )
    if other_logprobs.dim() != 2 or other_logprobs.shape[0] != own_top_logprobs.shape[0]:
        raise ValueError(
            f"other_logprobs must be (positions={own_top_logprobs.shape[0]}, vocab), "
            f"got {tuple(other_logprobs.shape)}"
        )
    if own_top_logprobs.shape[0] == 0:
        raise ValueError("need at least one position")

    device = other_logprobs.device
    # Gather first so that only (positions, k) values are promoted to float64.
    log_q = other_logprobs.gather(1, own_top_index.to(device=device, dtype=torch.long))
    log_q = log_q.to(torch.float64)
    log_p = own_top_logprobs.to(device=device, dtype=torch.float64)
    p, q = log_p.exp(), log_q.exp()
    # Clamp: rounding in the inputs can push the summed top-k mass a hair above 1.
    p_rest = (1.0 - p.sum(dim=1)).clamp_min(0.0)
    q_rest = (1.0 - q.sum(dim=1)).clamp_min(0.0)

    if kind == "kl":
        top = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)
        # A vanishing rest bucket on q is rounding (e.g. k = vocab), not a real zero.
        rest = torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest.clamp_min(1e-30))
        per_position = top + rest
    else:
        per_position = (p - q).abs().sum(dim=1) + (p_rest - q_rest).abs()
    return per_position.mean().to(torch.float32)


# ---------------------------------------------------------------------------


def _normalise(raw: Mapping[str, float]) -> dict[str, float]:
    total = math.fsum(raw.values())  # exactly rounded: the same total in any order
    return {n: w / total for n, w in raw.items()}


def _canonical(row: Mapping[str, float], self_name: str) -> list[str]:
    """The peer first, then its neighbours by name: the one order rows are built and summed in."""
    return [self_name, *sorted(n for n in row if n != self_name)]


def _neighbourhood(self_name: str, neighbours: Iterable[str]) -> list[str]:
    names = [self_name, *neighbours]
    if len(set(names)) != len(names):
        raise ValueError(f"neighbours must be distinct and exclude the peer itself, got {names[1:]}")
    return names


def _dominant_group(peer: str, mixture: Mapping[str, float]) -> str:
    if not mixture:
        raise ValueError(f"mixture of {peer!r} is empty")
    return min(mixture.items(), key=lambda item: (-item[1], item[0]))[0]


def _delta(
    tensor: Tensor, reference: Mapping[str, Tensor] | None, name: str, device: torch.device
) -> Tensor:
    value = tensor.detach().to(device=device, dtype=torch.float64)
    if reference is not None:
        value = value - reference[name].detach().to(device=device, dtype=torch.float64)
    return value
