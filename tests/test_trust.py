import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed.trust import (
    cosine_scores,
    local_weights,
    metropolis_hastings_weights,
    oracle_weights,
    predictions_distance,
    sanitized_weights,
    softmax_weights,
    uniform_weights,
)


# --- softmax_weights -------------------------------------------------------


def test_softmax_hand_case_temperature_one():
    w = softmax_weights({"a": 0.0, "b": -1.0, "c": -2.0}, "a", temperature=1.0)
    z = 1 + math.exp(-1) + math.exp(-2)
    assert w == pytest.approx({"a": 1 / z, "b": math.exp(-1) / z, "c": math.exp(-2) / z})


def test_softmax_hand_case_temperature_half():
    # S / 0.5 = 0, -2, -4
    w = softmax_weights({"a": 0.0, "b": -1.0, "c": -2.0}, "b", temperature=0.5)
    z = 1 + math.exp(-2) + math.exp(-4)
    assert w == pytest.approx({"a": 1 / z, "b": math.exp(-2) / z, "c": math.exp(-4) / z})


def test_softmax_is_shift_invariant_and_handles_huge_scores():
    base = softmax_weights({"a": 0.0, "b": -1.0}, "a", temperature=1.0)
    shifted = softmax_weights({"a": 1e6, "b": 1e6 - 1.0}, "a", temperature=1.0)
    assert shifted == pytest.approx(base)


def test_small_temperature_tends_to_argmax():
    scores = {"me": -3.0, "x": -1.0, "y": -1.5}
    w = softmax_weights(scores, "me", temperature=1e-4)
    assert w["x"] == pytest.approx(1.0)
    assert w["me"] == pytest.approx(0.0, abs=1e-12)
    assert w["y"] == pytest.approx(0.0, abs=1e-12)


def test_large_temperature_tends_to_uniform():
    w = softmax_weights({"a": 0.0, "b": -1.0, "c": -2.0}, "a", temperature=1e9)
    assert w == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_top_k_keeps_self_even_when_worst():
    scores = {"me": -10.0, "a": 0.0, "b": -1.0, "c": -2.0}
    w = softmax_weights(scores, "me", temperature=1.0, top_k=1)
    z = 1 + math.exp(-10)
    assert w == pytest.approx({"me": math.exp(-10) / z, "a": 1 / z, "b": 0.0, "c": 0.0})
    assert set(w) == set(scores)


def test_top_k_breaks_ties_by_name():
    scores = {"me": 0.0, "zed": 1.0, "amy": 1.0, "bob": 1.0}
    w = softmax_weights(scores, "me", temperature=1.0, top_k=2)
    assert w["amy"] > 0 and w["bob"] > 0 and w["zed"] == 0.0


def test_top_k_larger_than_neighbourhood_keeps_all():
    scores = {"me": 0.0, "a": -1.0}
    assert softmax_weights(scores, "me", 1.0, top_k=5) == pytest.approx(softmax_weights(scores, "me", 1.0))


def test_threshold_drops_neighbours_never_self():
    scores = {"me": -5.0, "a": 0.0, "b": -3.0}
    # before the threshold: me ~ 0.0066, a ~ 0.946, b ~ 0.047
    w = softmax_weights(scores, "me", temperature=1.0, threshold=0.05)
    z = 1 + math.exp(-5)
    assert w == pytest.approx({"me": math.exp(-5) / z, "a": 1 / z, "b": 0.0})
    assert w["me"] > 0


def test_minus_infinity_scores_get_zero_and_all_minus_infinity_stays_local():
    w = softmax_weights({"me": 0.0, "a": -math.inf}, "me", 1.0)
    assert w == {"me": 1.0, "a": 0.0}
    w = softmax_weights({"me": -math.inf, "a": -math.inf}, "me", 1.0)
    assert w == {"me": 1.0, "a": 0.0}


def test_threshold_dropping_everyone_when_self_weight_underflows_stays_local():
    w = softmax_weights({"me": -1e4, "a": 0.0, "b": 0.0}, "me", temperature=1.0, threshold=0.9)
    assert w == {"me": 1.0, "a": 0.0, "b": 0.0}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(scores={"a": 0.0}, self_name="zz", temperature=1.0),
        dict(scores={"a": 0.0}, self_name="a", temperature=0.0),
        dict(scores={"a": 0.0}, self_name="a", temperature=1.0, top_k=-1),
    ],
)
def test_softmax_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        softmax_weights(**kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_neighbour_score_means_no_trust_not_an_error(bad):
    weights = softmax_weights({"a": -1.0, "b": bad, "c": -1.0}, "a", 0.1)
    assert weights["b"] == 0.0 and weights["a"] == pytest.approx(0.5) and weights["c"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_own_score_keeps_the_peer_local(bad):
    assert softmax_weights({"a": bad, "b": 0.0}, "a", 0.1) == {"a": 1.0, "b": 0.0}


@given(st.dictionaries(st.sampled_from(["b", "c", "d", "e"]),
                       st.floats(allow_nan=True, allow_infinity=True), max_size=4),
       st.floats(allow_nan=True, allow_infinity=True),
       st.floats(min_value=1e-6, max_value=1e3), st.integers(0, 3))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_trust_is_a_finite_probability_vector_for_any_scores(others, own, temperature, top_k):
    weights = softmax_weights({"a": own, **others}, "a", temperature, top_k)
    assert set(weights) == {"a", *others}
    assert all(math.isfinite(w) and w >= 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0)


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(allow_nan=True, allow_infinity=True),
                       min_size=1).filter(lambda d: "a" in d))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_sanitized_weights_are_a_probability_vector(weights):
    clean = sanitized_weights(weights, "a")
    assert all(math.isfinite(w) and w >= 0 for w in clean.values())
    assert sum(clean.values()) == pytest.approx(1.0)



@settings(max_examples=60, deadline=None)
@given(
    scores=st.dictionaries(
        st.text(alphabet="abcdef", min_size=1, max_size=3),
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False),
        min_size=1,
        max_size=7,
    ),
    temperature=st.floats(min_value=1e-4, max_value=1e4),
    top_k=st.integers(min_value=0, max_value=6),
    threshold=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),
)

def test_softmax_is_a_probability_vector(scores, temperature, top_k, threshold):
    self_name = sorted(scores)[0]
    w = softmax_weights(scores, self_name, temperature, top_k=top_k, threshold=threshold)
    assert set(w) == set(scores)
    assert all(v >= 0 for v in w.values())
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)


# --- local, uniform, Metropolis-Hastings -------------------------------------


def test_local_and_uniform():
    assert local_weights("me", ["a", "b"]) == {"me": 1.0, "a": 0.0, "b": 0.0}
    assert uniform_weights("me", ["a", "b", "c"]) == {"me": 0.25, "a": 0.25, "b": 0.25, "c": 0.25}
    assert uniform_weights("me", []) == {"me": 1.0}
    with pytest.raises(ValueError):
        uniform_weights("me", ["a", "me"])
    with pytest.raises(ValueError):
        local_weights("me", ["a", "a"])


def test_metropolis_hastings_hand_degrees():
    # deg(me) = 2; a has degree 1, b has degree 4.
    w = metropolis_hastings_weights("me", 2, {"a": 1, "b": 4})
    assert w == pytest.approx({"a": 1 / 3, "b": 1 / 5, "me": 1 - 1 / 3 - 1 / 5})


def test_metropolis_hastings_missing_neighbour_share_stays_with_self():
    w = metropolis_hastings_weights("me", 3, {"a": 3})
    assert w == pytest.approx({"me": 0.75, "a": 0.25})


def test_metropolis_hastings_rejects_inconsistent_degrees():
    with pytest.raises(ValueError):
        metropolis_hastings_weights("me", 1, {"a": 1, "b": 1})
    with pytest.raises(ValueError):
        metropolis_hastings_weights("me", 2, {"a": 0})
    with pytest.raises(ValueError):
        metropolis_hastings_weights("me", 2, {"me": 2})


# --- cosine_scores -----------------------------------------------------------


def _adapter(a, b):
    return {"layer.lora_A": torch.tensor(a, dtype=torch.float32), "layer.lora_B": torch.tensor(b, dtype=torch.float32)}


def test_cosine_parallel_orthogonal_opposite():
    own = _adapter([[1.0, 0.0]], [[0.0], [1.0]])
    others = {
        "parallel": _adapter([[3.0, 0.0]], [[0.0], [3.0]]),
        "orthogonal": _adapter([[0.0, 2.0]], [[5.0], [0.0]]),
        "opposite": _adapter([[-1.0, 0.0]], [[0.0], [-1.0]]),
    }
    s = cosine_scores(own, others, "me")
    assert s == pytest.approx({"me": 1.0, "parallel": 1.0, "orthogonal": 0.0, "opposite": -1.0})


def test_cosine_uses_all_tensors_not_just_a():
    # Same A, B differs in sign: vector (1, 0, 0, 1) vs (1, 0, 0, -1) -> cosine 0.
    own = _adapter([[1.0, 0.0]], [[0.0], [1.0]])
    s = cosine_scores(own, {"x": _adapter([[1.0, 0.0]], [[0.0], [-1.0]])}, "me")
    assert s["x"] == pytest.approx(0.0)


def test_cosine_hand_case():
    own = _adapter([[1.0, 2.0]], [[0.0], [2.0]])  # (1, 2, 0, 2)
    other = _adapter([[2.0, 0.0]], [[1.0], [1.0]])  # (2, 0, 1, 1)
    expected = (2 + 0 + 0 + 2) / (3 * math.sqrt(6))
    assert cosine_scores(own, {"x": other}, "me")["x"] == pytest.approx(expected)


def test_cosine_of_updates_with_reference():
    reference = _adapter([[1.0, 1.0]], [[1.0], [1.0]])
    own = _adapter([[2.0, 1.0]], [[1.0], [1.0]])  # update (1, 0, 0, 0)
    same_direction = _adapter([[3.0, 1.0]], [[1.0], [1.0]])  # update (2, 0, 0, 0)
    other_direction = _adapter([[1.0, 1.0]], [[1.0], [4.0]])  # update (0, 0, 0, 3)
    s = cosine_scores(own, {"s": same_direction, "o": other_direction}, "me", reference=reference)
    assert s == pytest.approx({"me": 1.0, "s": 1.0, "o": 0.0})
    # Without the reference the raw adapters are nearly parallel.
    assert cosine_scores(own, {"o": other_direction}, "me")["o"] > 0.5


def test_zero_update_scores_zero_not_nan():
    reference = _adapter([[1.0, 1.0]], [[1.0], [1.0]])
    s = cosine_scores(reference, {"x": _adapter([[2.0, 1.0]], [[1.0], [1.0]]), "y": reference}, "me", reference)
    assert s == {"me": 1.0, "x": 0.0, "y": 0.0}


def test_cosine_rejects_mismatched_adapters():
    own = _adapter([[1.0, 0.0]], [[0.0], [1.0]])
    with pytest.raises(ValueError, match="lora_A"):
        cosine_scores(own, {"x": _adapter([[1.0, 0.0, 0.0]], [[0.0], [1.0]])}, "me")
    with pytest.raises(ValueError):
        cosine_scores(own, {"x": {"layer.lora_A": torch.ones(1, 2)}}, "me")


# --- oracle ------------------------------------------------------------------


def test_oracle_weights_uniform_over_same_dominant_group():
    mixtures = {
        "me": {"english": 0.75, "italian": 0.25},
        "a": {"english": 0.6, "italian": 0.4},
        "b": {"english": 0.1, "italian": 0.9},
        "c": {"english": 1.0},
    }
    assert oracle_weights("me", mixtures) == pytest.approx({"me": 1 / 3, "a": 1 / 3, "b": 0.0, "c": 1 / 3})


def test_oracle_alone_in_its_group_stays_local():
    mixtures = {"me": {"x": 1.0}, "a": {"y": 1.0}}
    assert oracle_weights("me", mixtures) == {"me": 1.0, "a": 0.0}


# --- predictions_distance ------------------------------------------------------


def _own_top(logprobs, k):
    values, index = logprobs.topk(k, dim=-1)
    return values, index


@pytest.mark.parametrize("kind", ["kl", "l1"])
def test_predictions_distance_zero_for_identical_positive_otherwise(kind):
    gen = torch.Generator().manual_seed(0)
    own = torch.log_softmax(torch.randn(5, 50, generator=gen), dim=-1)
    other = torch.log_softmax(torch.randn(5, 50, generator=gen), dim=-1)
    values, index = _own_top(own, 8)
    same = predictions_distance(values, index, own, kind)
    assert same.dim() == 0
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert predictions_distance(values, index, other, kind).item() > 0.01


@pytest.mark.parametrize("kind", ["kl", "l1"])
def test_predictions_distance_sees_mass_moved_off_the_top_k(kind):
    # q keeps p's proportions on the top-2 but halves their mass: still a distance.
    own = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    other = torch.log(torch.tensor([[0.25, 0.15, 0.3, 0.3]]))
    values, index = _own_top(own, 2)
    assert predictions_distance(values, index, other, kind).item() > 0.1


def test_predictions_distance_l1_hand_case():
    # Own top-2: tokens 0, 1 with p = 0.5, 0.3 (rest 0.2).
    # Position 0: q = 0.4, 0.4 on them (rest 0.2) -> 0.1 + 0.1 + 0.0 = 0.2.
    # Position 1: q = 0.5, 0.1 (rest 0.4)         -> 0.0 + 0.2 + 0.2 = 0.4.
    own_values = torch.log(torch.tensor([[0.5, 0.3], [0.5, 0.3]]))
    own_index = torch.tensor([[0, 1], [0, 1]])
    other = torch.log(torch.tensor([[0.4, 0.4, 0.2], [0.5, 0.1, 0.4]]))
    d = predictions_distance(own_values, own_index, other, "l1")
    assert d.item() == pytest.approx(0.3, abs=1e-6)


def test_predictions_distance_kl_hand_case():
    own_values = torch.log(torch.tensor([[0.5, 0.3]]))
    own_index = torch.tensor([[0, 1]])
    other = torch.log(torch.tensor([[0.4, 0.4, 0.2]]))
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    d = predictions_distance(own_values, own_index, other, "kl")
    assert d.item() == pytest.approx(expected, abs=1e-6)


def test_predictions_distance_full_vocabulary_is_the_full_kl():
    gen = torch.Generator().manual_seed(1)
    own = torch.log_softmax(torch.randn(3, 10, generator=gen, dtype=torch.float64), dim=-1)
    other = torch.log_softmax(torch.randn(3, 10, generator=gen, dtype=torch.float64), dim=-1)
    values, index = _own_top(own, 10)
    full = (own.exp() * (own - other)).sum(-1).mean()
    assert predictions_distance(values, index, other, "kl").item() == pytest.approx(full.item(), rel=1e-5)


def test_predictions_distance_rejects_bad_shapes_and_kind():
    values, index = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        predictions_distance(values, index, torch.zeros(3, 10))
    with pytest.raises(ValueError):
        predictions_distance(values, index[:, :2], torch.zeros(2, 10))
    with pytest.raises(ValueError):
        predictions_distance(values, index, torch.zeros(2, 10), kind="js")


def test_data_size_weights_follow_the_reported_training_tokens():
    from p2pfed.trust import data_size_weights

    assert data_size_weights("me", 300, {"a": 100, "b": 600}) == {"me": 0.3, "a": 0.1, "b": 0.6}
    assert data_size_weights("me", 0, {"a": 0}) == {"me": 0.5, "a": 0.5}  # nothing reported: uniform
