import math

import pytest
import torch

from p2pfed.config import lora_scale
from p2pfed.aggregate import (
    LoraFactors,
    dense_project,
    flexlora_project,
    weighted_average,
    zero_padded_average,
)

# --- weighted_average ----------------------------------------------------------


def test_weighted_average_hand_tensors():
    states = {
        "me": {"A": torch.tensor([[1.0, 2.0]]), "B": torch.tensor([[0.0], [4.0]])},
        "x": {"A": torch.tensor([[3.0, 6.0]]), "B": torch.tensor([[8.0], [0.0]])},
    }
    out = weighted_average(states, {"me": 0.75, "x": 0.25})
    assert torch.equal(out["A"], torch.tensor([[1.5, 3.0]]))
    assert torch.equal(out["B"], torch.tensor([[2.0], [3.0]]))


def test_weighted_average_zero_weight_peer_may_be_absent():
    states = {"me": {"A": torch.ones(2, 2)}}
    out = weighted_average(states, {"me": 1.0, "gone": 0.0})
    assert torch.equal(out["A"], torch.ones(2, 2))


def test_weighted_average_result_is_float32_and_never_aliases():
    mine = {"A": torch.ones(2, 3, dtype=torch.bfloat16)}
    out = weighted_average({"me": mine}, {"me": 1.0})
    assert out["A"].dtype == torch.float32
    mine32 = {"A": torch.ones(2, 3)}
    out = weighted_average({"me": mine32}, {"me": 1.0})
    assert out["A"].data_ptr() != mine32["A"].data_ptr()
    out["A"].add_(1.0)
    assert torch.equal(mine32["A"], torch.ones(2, 3))


def test_weighted_average_weights_must_sum_to_one():
    states = {"me": {"A": torch.ones(1)}, "x": {"A": torch.ones(1)}}
    with pytest.raises(ValueError, match="sum to 1"):
        weighted_average(states, {"me": 0.5, "x": 0.4})
    weighted_average(states, {"me": 0.5, "x": 0.5 + 5e-7})  # within tolerance
    with pytest.raises(ValueError, match="negative"):
        weighted_average(states, {"me": 1.5, "x": -0.5})


def test_weighted_average_missing_positive_peer_and_unweighted_state():
    states = {"me": {"A": torch.ones(1)}}
    with pytest.raises(ValueError, match="'x'"):
        weighted_average(states, {"me": 0.5, "x": 0.5})
    with pytest.raises(ValueError, match="no weight"):
        weighted_average({"me": {"A": torch.ones(1)}, "y": {"A": torch.ones(1)}}, {"me": 1.0})


def test_weighted_average_shape_and_name_mismatch_name_the_tensor():
    states = {"me": {"A": torch.ones(2, 2), "B": torch.ones(2)}, "x": {"A": torch.ones(2, 3), "B": torch.ones(2)}}
    with pytest.raises(ValueError, match="'A'"):
        weighted_average(states, {"me": 0.5, "x": 0.5})
    states = {"me": {"A": torch.ones(2)}, "x": {"C": torch.ones(2)}}
    with pytest.raises(ValueError, match="C"):
        weighted_average(states, {"me": 0.5, "x": 0.5})


# --- FlexLoRA ------------------------------------------------------------------


def _random_factors(gen, out_dim, in_dim, rank, alpha=16.0, rslora=False):
    return LoraFactors(
        A=torch.randn(rank, in_dim, generator=gen),
        B=torch.randn(out_dim, rank, generator=gen),
        scale=lora_scale(alpha, rank, rslora),
    )


def _dense_aggregate(factors, weights):
    return sum(w * f.scale * (f.B.double() @ f.A.double()) for f, w in zip(factors, weights))


def _product(f):
    return f.scale * (f.B.double() @ f.A.double())


def _close(x, y, tol=1e-5):
    return (x - y).norm() <= tol * max(1.0, y.norm().item())


def test_lora_scale():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0
    with pytest.raises(ValueError):
        lora_scale(16, 0)


@pytest.mark.parametrize(
    "out_dim, in_dim, ranks, rank",
    [(20, 30, (4, 8, 2), 5), (6, 40, (4, 4), 3), (40, 7, (3, 5, 2), 4), (16, 16, (8,), 8), (12, 9, (2, 3), 5)],
)
def test_qr_projection_equals_dense_svd(out_dim, in_dim, ranks, rank):
    gen = torch.Generator().manual_seed(sum(ranks) + out_dim)
    factors = [_random_factors(gen, out_dim, in_dim, r, rslora=i % 2 == 1) for i, r in enumerate(ranks)]
    weights = torch.softmax(torch.randn(len(ranks), generator=gen), 0).tolist()
    scale = lora_scale(16.0, rank)
    fast = flexlora_project(factors, weights, rank, scale)
    slow = dense_project(factors, weights, rank, scale)
    assert fast.A.shape == (rank, in_dim) and fast.B.shape == (out_dim, rank)
    assert fast.A.dtype == fast.B.dtype == torch.float32
    assert _close(_product(fast), _product(slow))
    # Singular values: the column norms of B times the scale (A has orthonormal rows).
    assert torch.allclose(fast.B.double().norm(dim=0), slow.B.double().norm(dim=0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast.A.double() @ fast.A.double().T, torch.eye(rank, dtype=torch.float64), atol=1e-5)


def test_full_rank_budget_reproduces_the_average_update():
    gen = torch.Generator().manual_seed(3)
    factors = [_random_factors(gen, 24, 18, 4) for _ in range(3)]
    weights = [1 / 3] * 3
    result = flexlora_project(factors, weights, rank=12, scale=lora_scale(16.0, 12))
    assert _close(_product(result), _dense_aggregate(factors, weights))


def test_shared_subspace_is_recovered_at_the_common_rank():
    gen = torch.Generator().manual_seed(4)
    a0, b0 = torch.randn(4, 30, generator=gen), torch.randn(25, 4, generator=gen)
    factors = [
        LoraFactors(A=torch.randn(4, 4, generator=gen) @ a0, B=b0 @ torch.randn(4, 4, generator=gen), scale=4.0)
        for _ in range(5)
    ]
    weights = [0.2] * 5
    result = flexlora_project(factors, weights, rank=4, scale=4.0)
    assert _close(_product(result), _dense_aggregate(factors, weights))


def test_eckart_young_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(5)
    factors = [_random_factors(gen, 30, 20, r) for r in (6, 4, 8)]
    weights = [0.5, 0.3, 0.2]
    rank = 5
    dense = _dense_aggregate(factors, weights)
    result = flexlora_project(factors, weights, rank, scale=lora_scale(16.0, rank))
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    truncated = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    assert _close(_product(result), truncated)
    error = (dense - _product(result)).norm().item()
    assert error == pytest.approx(s[rank:].norm().item(), rel=1e-5)
    for _ in range(20):
        other = torch.randn(30, rank, generator=gen, dtype=torch.float64) @ torch.randn(
            rank, 20, generator=gen, dtype=torch.float64
        )
        # A random factorization, also at its best scaling, is never better.
        best = (dense * other).sum() / (other * other).sum()
        assert error <= (dense - best * other).norm().item()


@pytest.mark.parametrize("rslora", [False, True])
def test_single_peer_round_trips_its_own_product(rslora):
    gen = torch.Generator().manual_seed(6)
    own = _random_factors(gen, 16, 12, 4, alpha=8.0, rslora=rslora)
    result = flexlora_project([own], [1.0], rank=4, scale=own.scale)
    assert result.scale == own.scale
    assert _close(_product(result), _product(own))


def test_mixed_scales_each_neighbour_uses_its_own():
    gen = torch.Generator().manual_seed(7)
    a = _random_factors(gen, 10, 8, 2, alpha=16.0)  # scale 16 / 2 = 8
    b = _random_factors(gen, 10, 8, 4, alpha=12.0, rslora=True)  # scale 12 / sqrt(4) = 6
    c = _random_factors(gen, 10, 8, 3, alpha=6.0)  # scale 6 / 3 = 2
    weights = [0.2, 0.3, 0.5]
    result = flexlora_project([a, b, c], weights, rank=9, scale=lora_scale(16.0, 9, rslora=True))
    assert _close(_product(result), _dense_aggregate([a, b, c], weights))


def test_rank_above_available_directions_pads_b_with_zeros_and_keeps_a_alive():
    gen = torch.Generator().manual_seed(8)
    factors = [_random_factors(gen, 10, 12, 2) for _ in range(2)]
    result = flexlora_project(factors, [0.5, 0.5], rank=6, scale=1.0)
    assert result.A.shape == (6, 12) and result.B.shape == (10, 6)
    assert torch.count_nonzero(result.B[:, 4:]) == 0
    # A's extra rows are orthonormal and orthogonal to the used ones: those directions can train.
    assert torch.allclose(result.A @ result.A.T, torch.eye(6), atol=1e-5)
    assert _close(_product(result), _dense_aggregate(factors, [0.5, 0.5]))


def test_zero_update_still_gives_orthonormal_a():
    # At initialisation every B is zero: the projection must not produce a dead adapter.
    gen = torch.Generator().manual_seed(9)
    factors = [LoraFactors(A=torch.randn(4, 12, generator=gen), B=torch.zeros(8, 4), scale=2.0) for _ in range(2)]
    for project in (flexlora_project, dense_project):
        result = project(factors, [0.5, 0.5], rank=4, scale=2.0)
        assert torch.count_nonzero(result.B) == 0
        assert torch.allclose(result.A @ result.A.T, torch.eye(4), atol=1e-5)


def test_projection_rejects_bad_input():
    gen = torch.Generator().manual_seed(10)
    f = _random_factors(gen, 6, 5, 2)
    g = _random_factors(gen, 7, 5, 2)
    with pytest.raises(ValueError):
        flexlora_project([f, g], [0.5, 0.5], 2, 1.0)
    with pytest.raises(ValueError):
        flexlora_project([f], [0.5, 0.5], 2, 1.0)
    with pytest.raises(ValueError):
        flexlora_project([f], [1.0], 0, 1.0)
    with pytest.raises(ValueError):
        flexlora_project([], [], 2, 1.0)
    with pytest.raises(ValueError):
        LoraFactors(A=torch.zeros(2, 5), B=torch.zeros(6, 3), scale=1.0)


# --- the naive baseline --------------------------------------------------------


def test_zero_padded_average_hand_case():
    a = LoraFactors(A=torch.tensor([[1.0, 0.0]]), B=torch.tensor([[2.0], [0.0]]), scale=1.0)
    b = LoraFactors(A=torch.tensor([[0.0, 1.0], [1.0, 1.0]]), B=torch.tensor([[0.0, 2.0], [2.0, 0.0]]), scale=1.0)
    result = zero_padded_average([a, b], [0.5, 0.5], rank=3)
    assert torch.equal(result.A, torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]))
    assert torch.equal(result.B, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert result.scale == 1.0
    assert zero_padded_average([a, b], [0.5, 0.5], rank=1).A.shape == (1, 2)
    with pytest.raises(ValueError):
        zero_padded_average([a, LoraFactors(A=b.A, B=b.B, scale=2.0)], [0.5, 0.5], rank=1)


def test_flexlora_beats_the_zero_padded_average():
    gen = torch.Generator().manual_seed(11)
    factors = [_random_factors(gen, 20, 16, r, alpha=8.0) for r in (2, 4, 8)]
    weights = [1 / 3] * 3
    dense = _dense_aggregate(factors, weights)
    rank = 8
    flex = flexlora_project(factors, weights, rank, scale=lora_scale(8.0, rank))
    naive = zero_padded_average(factors, weights, rank, scale=lora_scale(8.0, rank))
    assert (dense - _product(flex)).norm() < (dense - _product(naive)).norm()
    assert not math.isclose((dense - _product(naive)).norm().item(), 0.0, abs_tol=1e-3)
