"""Byzantine-robust aggregation baselines: coordinate-wise median, trimmed mean, (multi-)Krum.

Pure tensor math over `states`, a mapping peer name -> {tensor name -> Tensor}, like
`p2pfed.aggregate.weighted_average` but without trust weights: these rules are the
baselines that defend by statistics alone (Flower's FedMedian, FedTrimmedAvg, Krum and
MultiKrum). With n peers, per coordinate x_1 <= ... <= x_n (sorted values):

  median:        x_{(n+1)/2} for odd n; (x_{n/2} + x_{n/2+1}) / 2 for even n.
  trimmed mean:  c = floor(beta * n), 0 <= beta < 1/2;  (1 / (n - 2c)) * sum_{i=c+1}^{n-c} x_i.
  Krum score:    s(i) = sum of the m smallest ||theta_i - theta_j||^2 over j != i, with
                 m = max(1, n - f - 2) capped at n - 1; theta_i is all of peer i's tensors
                 flattened together. Krum keeps argmin_i s(i); multi-Krum keeps the `keep`
                 lowest scores and averages them with equal weights.

Non-finite entries (inf, -inf, NaN). A NaN has no rank and an inf would either be trimmed
or turn a mean into inf/NaN, so the coordinate-wise rules drop non-finite values first and
apply the rule to the k finite values left at that coordinate: the median is the median of
those k; the trimmed mean still trims c = floor(beta * n) (n counts every peer, so a peer
that sends NaN does not shrink the trim budget the others are held to) from each end,
reduced to floor((k - 1) / 2) when fewer than 2c + 1 finite values are left, which makes it
the median of the finite values. So one attacker among two or more peers can never make an
output coordinate non-finite; a coordinate with no finite value at all is NaN. For Krum a
distance involving a non-finite entry is +inf, and a peer whose own state has a non-finite
entry ranks after every finite peer whatever the scores, so it is chosen only when `keep`
exceeds the number of finite peers (the multi-Krum mean is then non-finite).

Determinism: peers are processed in sorted-name order, sums run in float64 in an order
fixed by the values (sorted coordinates, sorted distances) or by the names, and Krum ties
break by name, so results are bit-reproducible and independent of dict insertion order.
Outputs are fresh float32 tensors on the device of the first peer by name; float64 inside
keeps means of large finite float32 values from overflowing (a -0.0 may come out as +0.0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from p2pfed.aggregate import check_same_layout

__all__ = ["coordinate_median", "trimmed_mean", "krum_select", "multi_krum"]


def coordinate_median(states: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise median over peers of every tensor, ignoring non-finite entries.

    For an even count the mean of the two middle values: it is the symmetric choice
    (median(-x) = -median(x), as numpy and Flower's FedMedian compute it), whereas
    torch.median's lower middle value biases every coordinate downwards.
    """
    peers, device = _checked(states)
    # Cutting (k - 1) // 2 from each end of k finite values leaves the middle one or two.
    return {name: _trim_finite(states, peers, name, device, cut=None) for name in states[peers[0]]}


def trimmed_mean(states: Mapping[str, Mapping[str, Tensor]], trim_fraction: float) -> dict[str, Tensor]:
    """Element-wise mean after dropping the floor(trim_fraction * n) largest and smallest values.

    trim_fraction must lie in [0, 0.5); 0 (or too few peers to trim one) is the plain mean.
    Non-finite entries are dropped before trimming (see the module docstring).
    """
    if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, (int, float)) \
            or not 0.0 <= trim_fraction < 0.5:  # the comparison also rejects NaN
        raise ValueError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")
    peers, device = _checked(states)
    cut = math.floor(trim_fraction * len(peers))
    return {name: _trim_finite(states, peers, name, device, cut=cut) for name in states[peers[0]]}


def krum_select(
    states: Mapping[str, Mapping[str, Tensor]], num_byzantine: int, keep: int = 1
) -> list[str]:
    """The `keep` peers with the lowest Krum scores, best first (Krum for keep=1, multi-Krum above).

    Each peer's score sums its squared distances to its m = max(1, n - f - 2) closest other
    peers (at most n - 1 exist; a lone peer scores 0 and is chosen). Krum's guarantee needs
    n >= 2f + 3; below that the rule still runs with at least one neighbour rather than fail,
    since a peer cannot stop a round because neighbours dropped out. Ranking is by
    (state has a non-finite entry, score, name), so ties are deterministic.
    """
    _check_count("num_byzantine", num_byzantine, minimum=0)
    peers, device = _checked(states)
    _check_count("keep", keep, minimum=1)
    if keep > len(peers):
        raise ValueError(f"keep must be at most the number of peers ({len(peers)}), got {keep}")

    n = len(peers)
    distances = _squared_distances(states, peers, device)
    finite_state = [all(bool(torch.isfinite(t).all()) for t in states[p].values()) for p in peers]
    neighbours = min(max(1, n - num_byzantine - 2), n - 1)
    scores: list[float] = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        # Summing the sorted smallest distances fixes the addition order by value.
        scores.append(float(torch.sort(others).values[:neighbours].sum()))
    ranked = sorted(range(n), key=lambda i: (not finite_state[i], scores[i], peers[i]))
    return [peers[i] for i in ranked[:keep]]


def multi_krum(
    states: Mapping[str, Mapping[str, Tensor]], num_byzantine: int, keep: int
) -> dict[str, Tensor]:
    """The plain mean of the `keep` peers `krum_select` chooses (keep=1: a copy of Krum's pick)."""
    chosen = sorted(krum_select(states, num_byzantine, keep))  # sum in name order, not rank order
    device = _device_of(states, sorted(states))
    result: dict[str, Tensor] = {}
    for name in states[chosen[0]]:
        # Starting from the first state rather than zeros makes keep=1 an exact copy.
        total = _f64(states[chosen[0]][name], device).clone()
        for peer in chosen[1:]:
            total.add_(_f64(states[peer][name], device))
        result[name] = (total / len(chosen)).to(torch.float32)
    return result


# ---------------------------------------------------------------------------


def _checked(states: Mapping[str, Mapping[str, Tensor]]) -> tuple[list[str], torch.device | None]:
    """Sorted peer names and the output device; ValueError for no peers or differing layouts."""
    if not states:
        raise ValueError("need at least one peer's state")
    peers = sorted(states)
    reference = states[peers[0]]
    for peer in peers[1:]:
        check_same_layout(reference, states[peer], f"state of {peer!r}")
    return peers, _device_of(states, peers)


def _device_of(states: Mapping[str, Mapping[str, Tensor]], peers: list[str]) -> torch.device | None:
    first = states[peers[0]]
    return next(iter(first.values())).device if first else None


def _check_count(what: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _f64(tensor: Tensor, device: torch.device | None) -> Tensor:
    return tensor.detach().to(device=device, dtype=torch.float64)


def _trim_finite(
    states: Mapping[str, Mapping[str, Tensor]],
    peers: list[str],
    name: str,
    device: torch.device | None,
    cut: int | None,
) -> Tensor:
    """Mean of each coordinate's finite values after cutting min(cut, (k - 1) // 2) from each end.

    cut=None is the median (the largest possible cut). A coordinate with k = 0 finite values is NaN.
    """
    shape = states[peers[0]][name].shape
    stacked = torch.stack([_f64(states[p][name], device).reshape(-1) for p in peers])  # (n, numel)
    finite = torch.isfinite(stacked)
    # +inf in place of every non-finite entry sorts them after the k finite values.
    ordered = torch.sort(torch.where(finite, stacked, math.inf), dim=0).values
    k = finite.sum(dim=0)
    most = torch.div(k - 1, 2, rounding_mode="floor").clamp(min=0)
    c = most if cut is None else most.clamp(max=cut)
    rank = torch.arange(len(peers), device=ordered.device).unsqueeze(1)
    kept = (rank >= c) & (rank < k - c)
    total = torch.where(kept, ordered, 0.0).sum(dim=0)  # a -0.0 may come out as +0.0
    count = kept.sum(dim=0)
    mean = torch.where(count > 0, total / count.clamp(min=1), math.nan)
    return mean.to(torch.float32).reshape(shape)


def _squared_distances(
    states: Mapping[str, Mapping[str, Tensor]], peers: list[str], device: torch.device | None
) -> Tensor:
    """(n, n) float64 matrix of ||theta_i - theta_j||^2 over all tensors; +inf where non-finite.

    Accumulated tensor by tensor (no full flattened copy per peer) from explicit differences,
    not ||a||^2 + ||b||^2 - 2ab, which cancels badly for nearby peers. In float64 squares of
    float32 differences cannot overflow.
    """
    n = len(peers)
    distances = torch.zeros(n, n, dtype=torch.float64, device=device)
    for name in sorted(states[peers[0]]):  # a fixed addition order across tensors
        stacked = torch.stack([_f64(states[p][name], device).reshape(-1) for p in peers])
        for i in range(n - 1):
            d = (stacked[i + 1 :] - stacked[i]).square().sum(dim=1)
            distances[i, i + 1 :] += d
            distances[i + 1 :, i] += d
    # inf - inf and NaN give NaN: such a pair is infinitely far apart.
    return torch.where(torch.isfinite(distances), distances, math.inf)
