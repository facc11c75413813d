import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed.robust import coordinate_median, krum_select, multi_krum, trimmed_mean


def vec(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Identical outputs: same names, dtypes, shapes, NaN positions and every other value (-0.0 == 0.0)."""
    if set(a) != set(b):
        return False
    for name in a:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.isnan(), y.isnan()):
            return False
        if not torch.equal(torch.where(x.isnan(), 0.0, x), torch.where(y.isnan(), 0.0, y)):
            return False
    return True


SHAPES = {"m.lora_A": (2, 3), "m.lora_B": (4, 2)}
SIZE = sum(math.prod(s) for s in SHAPES.values())


@st.composite
def peer_states(draw, min_peers=1, max_peers=7, allow_non_finite=False):
    """n peers' states over SHAPES; names are drawn too, so dict order differs from sorted order."""
    n = draw(st.integers(min_peers, max_peers))
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=n, max_size=n, unique=True))
    floats = st.floats(-1e6, 1e6, width=32) if not allow_non_finite else st.one_of(
        st.floats(-1e6, 1e6, width=32), st.sampled_from([math.inf, -math.inf, math.nan]))
    states = {}
    for name in names:
        flat = draw(st.lists(floats, min_size=SIZE, max_size=SIZE))
        tensors, start = {}, 0
        for tensor_name, shape in SHAPES.items():
            size = math.prod(shape)
            tensors[tensor_name] = torch.tensor(flat[start : start + size], dtype=torch.float32).reshape(shape)
            start += size
        states[name] = tensors
    return states


def reference(states, cut_of):
    """Per coordinate in plain Python: drop non-finite values, cut cut_of(n, k) from each end, fsum-mean."""
    peers = list(states)
    first = states[peers[0]]
    out = {}
    for name, tensor in first.items():
        columns = torch.stack([states[p][name].reshape(-1).double() for p in peers]).T.tolist()
        values = []
        for column in columns:
            finite = sorted(v for v in column if math.isfinite(v))
            k = len(finite)
            if k == 0:
                values.append(math.nan)
                continue
            c = min(cut_of(len(peers), k), (k - 1) // 2)
            kept = finite[c : k - c]
            values.append(math.fsum(kept) / len(kept))
        out[name] = torch.tensor(values, dtype=torch.float64).reshape(tensor.shape)
    return out


def assert_matches(result, expected):
    assert set(result) == set(expected)
    for name in expected:
        assert result[name].dtype == torch.float32
        torch.testing.assert_close(result[name].double(), expected[name], rtol=1e-6, atol=1e-6, equal_nan=True)


# --- coordinate_median ----------------------------------------------------------


def test_median_hand_odd_and_even():
    states = {"a": vec(1, 5, -2), "b": vec(3, 1, 0), "c": vec(2, 9, 4)}
    assert torch.equal(coordinate_median(states)["w"], torch.tensor([2.0, 5.0, 0.0]))
    # Even count: the mean of the two middle values, not torch.median's lower one.
    states["d"] = vec(10, 0, 1)
    assert torch.equal(coordinate_median(states)["w"], torch.tensor([2.5, 3.0, 0.5]))


def test_median_keeps_shapes_and_every_tensor():
    states = {
        "x": {"A": torch.zeros(2, 3), "B": torch.full((4, 2), 2.0)},
        "y": {"A": torch.ones(2, 3), "B": torch.full((4, 2), 4.0)},
    }
    out = coordinate_median(states)
    assert torch.equal(out["A"], torch.full((2, 3), 0.5))
    assert torch.equal(out["B"], torch.full((4, 2), 3.0))


@settings(max_examples=40, deadline=None)
@given(peer_states(max_peers=1), st.integers(1, 6))
def test_median_of_identical_states_is_the_state(one, copies):
    state = next(iter(one.values()))
    states = {f"p{i}": {k: v.clone() for k, v in state.items()} for i in range(copies)}
    assert same(coordinate_median(states), state)


@settings(max_examples=60, deadline=None)
@given(peer_states(allow_non_finite=True))
def test_median_matches_python_reference_ignoring_non_finite(states):
    assert_matches(coordinate_median(states), reference(states, lambda n, k: k))


def test_median_ignores_non_finite_and_is_nan_only_without_finite_values():
    states = {"bad": vec(math.nan, math.inf, -math.inf, math.nan), "good": vec(1, 2, 3, math.inf)}
    out = coordinate_median(states)["w"]
    assert torch.equal(out[:3], torch.tensor([1.0, 2.0, 3.0]))
    assert math.isnan(out[3])


def test_median_of_large_finite_values_does_not_overflow():
    out = coordinate_median({"a": vec(3.4e38), "b": vec(3.4e38)})["w"]
    assert torch.isfinite(out).all() and out[0] == torch.tensor(3.4e38)


# --- trimmed_mean -----------------------------------------------------------------


def test_trimmed_mean_hand():
    states = {p: vec(v, -v) for p, v in zip("abcde", [1.0, 2.0, 3.0, 4.0, 100.0])}
    # n = 5: floor(0.2 * 5) = 1 cut from each end; floor(0.39 * 5) = 1 as well.
    assert torch.equal(trimmed_mean(states, 0.2)["w"], torch.tensor([3.0, -3.0]))
    assert torch.equal(trimmed_mean(states, 0.39)["w"], torch.tensor([3.0, -3.0]))
    assert torch.equal(trimmed_mean(states, 0.4)["w"], torch.tensor([3.0, -3.0]))  # cut 2: the median
    assert torch.equal(trimmed_mean(states, 0.0)["w"], torch.tensor([22.0, -22.0]))
    ten = {f"p{i}": vec(float(i)) for i in range(10)}  # 0..9, cut floor(0.25 * 10) = 2: mean of 2..7
    assert torch.equal(trimmed_mean(ten, 0.25)["w"], torch.tensor([4.5]))


def test_trimmed_mean_with_too_few_peers_is_the_mean():
    states = {"a": vec(1.0), "b": vec(4.0)}
    assert torch.equal(trimmed_mean(states, 0.49)["w"], torch.tensor([2.5]))  # floor(0.98) = 0
    assert torch.equal(trimmed_mean({"a": vec(7.0)}, 0.3)["w"], torch.tensor([7.0]))


@settings(max_examples=60, deadline=None)
@given(peer_states())
def test_trimmed_mean_zero_is_the_mean(states):
    out = trimmed_mean(states, 0.0)
    for name, tensor in out.items():
        mean = torch.stack([s[name].double() for s in states.values()]).mean(dim=0)
        # Values up to 1e6: float64 sums in another order differ by ~1e-10 in absolute terms.
        torch.testing.assert_close(tensor.double(), mean, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(peer_states(allow_non_finite=True), st.floats(0.0, 0.499))
def test_trimmed_mean_matches_python_reference(states, fraction):
    assert_matches(trimmed_mean(states, fraction), reference(states, lambda n, k: math.floor(fraction * n)))


def test_trimmed_mean_non_finite_peer_does_not_shrink_the_trim():
    # n = 5, trim 0.2: c = 1 from n, so with the NaN dropped the 1e30 is still trimmed.
    states = {"h1": vec(1.0), "h2": vec(2.0), "h3": vec(3.0), "nan": vec(math.nan), "big": vec(1e30)}
    assert torch.equal(trimmed_mean(states, 0.2)["w"], torch.tensor([2.5]))


# --- krum_select / multi_krum -------------------------------------------------------


def test_krum_hand_scores_and_name_ties():
    # Two tensors flattened together: squared distances add across them.
    pts = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 10.0}
    states = {p: {"x": torch.tensor([v]), "y": torch.tensor([[v], [0.0]])} for p, v in pts.items()}
    # n = 4, f = 0: m = 2 closest others. Per-tensor squared distances double in the sum:
    # a: 2*(1 + 4) = 10, b: 2*(1 + 1) = 4, c: 2*(1 + 4) = 10, d: 2*(64 + 81) = 290.
    assert krum_select(states, 0) == ["b"]
    assert krum_select(states, 0, keep=4) == ["b", "a", "c", "d"]  # a and c tie: by name
    out = multi_krum(states, 0, keep=3)
    assert torch.equal(out["x"], torch.tensor([1.0]))
    assert torch.equal(out["y"], torch.tensor([[1.0], [0.0]]))
    # f = 1: m = 1, the closest neighbour only: a 2, b 2, c 2, d 128.
    assert krum_select(states, 1, keep=3) == ["a", "b", "c"]


def test_krum_small_counts():
    assert krum_select({"only": vec(5.0)}, 3) == ["only"]
    assert same(multi_krum({"only": vec(5.0)}, 0, 1), vec(5.0))
    # n - f - 2 < 1: one closest neighbour; with two peers both score the same and the name decides.
    assert krum_select({"y": vec(0.0), "x": vec(1.0)}, 0) == ["x"]
    assert krum_select({"a": vec(0.0), "b": vec(0.1), "c": vec(9.0)}, 5) == ["a"]  # f > n is clamped too


def test_krum_ranks_non_finite_states_last():
    states = {"a": vec(math.nan, 0.0), "b": vec(1.0, 1.0), "c": vec(math.inf, 1.0)}
    assert krum_select(states, 0, keep=3)[0] == "b"
    assert krum_select({"a": vec(math.nan), "z": vec(3.0)}, 0) == ["z"]
    assert same(multi_krum({"a": vec(math.nan), "z": vec(3.0)}, 0, 1), vec(3.0))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.data())
def test_multi_krum_never_selects_an_obvious_outlier(honest, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    states = {f"h{i}": {"w": torch.rand(3, 4, generator=gen) * 2 - 1} for i in range(honest)}
    sign = data.draw(st.sampled_from([1.0, -1.0]))
    states[data.draw(st.sampled_from(["0", "h", "zz"]))] = {"w": torch.full((3, 4), 100.0 * sign)}
    keep = data.draw(st.integers(1, honest))
    chosen = krum_select(states, 1, keep)
    assert len(chosen) == keep and all(p.startswith("h") for p in chosen)
    out = multi_krum(states, 1, keep)["w"]
    assert out.abs().max() <= 1.0


# --- all rules: attackers, permutations, layout, parameters, aliasing -----------------


HUGE = [1e30, -1e30, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("attack", HUGE)
def test_one_attacker_among_five_stays_in_the_honest_range(attack):
    gen = torch.Generator().manual_seed(7)
    honest = {f"h{i}": {"A": torch.randn(3, 4, generator=gen), "B": torch.randn(5, generator=gen)} for i in range(5)}
    states = {**honest, "evil": {"A": torch.full((3, 4), attack), "B": torch.full((5,), attack)}}
    low = {n: torch.stack([s[n] for s in honest.values()]).amin(0) for n in ("A", "B")}
    high = {n: torch.stack([s[n] for s in honest.values()]).amax(0) for n in ("A", "B")}
    outputs = {
        "median": coordinate_median(states),
        "trimmed": trimmed_mean(states, 0.2),
        "krum": multi_krum(states, 1, 1),
        "multi_krum": multi_krum(states, 1, 4),
    }
    assert krum_select(states, 1) != ["evil"] and "evil" not in krum_select(states, 1, 5)
    for rule, out in outputs.items():
        for n in ("A", "B"):
            assert torch.isfinite(out[n]).all(), rule
            assert ((low[n] <= out[n]) & (out[n] <= high[n])).all(), rule


@settings(max_examples=40, deadline=None)
@given(peer_states(allow_non_finite=True), st.randoms(use_true_random=False), st.floats(0.0, 0.499))
def test_relabelling_peers_leaves_coordinate_rules_bit_identical(states, rnd, fraction):
    names = list(states)
    shuffled = names[:]
    rnd.shuffle(shuffled)
    relabelled = {new: states[old] for new, old in zip(names, shuffled)}
    assert same(coordinate_median(states), coordinate_median(relabelled))
    assert same(trimmed_mean(states, fraction), trimmed_mean(relabelled, fraction))


@settings(max_examples=40, deadline=None)
@given(peer_states(allow_non_finite=True), st.randoms(use_true_random=False), st.integers(0, 3), st.data())
def test_dict_order_never_changes_any_result(states, rnd, f, data):
    names = list(states)
    rnd.shuffle(names)
    reordered = {p: dict(reversed(list(states[p].items()))) for p in names}
    keep = data.draw(st.integers(1, len(states)))
    assert krum_select(states, f, keep) == krum_select(reordered, f, keep)
    assert same(multi_krum(states, f, keep), multi_krum(reordered, f, keep))
    assert same(coordinate_median(states), coordinate_median(reordered))
    assert same(trimmed_mean(states, 0.3), trimmed_mean(reordered, 0.3))


RULES = [
    lambda s: coordinate_median(s),
    lambda s: trimmed_mean(s, 0.2),
    lambda s: krum_select(s, 1),
    lambda s: multi_krum(s, 1, 2),
]


@pytest.mark.parametrize("rule", RULES)
def test_layout_mismatch_raises(rule):
    good = {"A": torch.zeros(2, 3), "B": torch.zeros(3)}
    with pytest.raises(ValueError, match="different tensors"):
        rule({"a": good, "b": {"A": torch.zeros(2, 3)}, "c": good})
    with pytest.raises(ValueError, match="shape"):
        rule({"a": good, "b": {"A": torch.zeros(3, 2), "B": torch.zeros(3)}, "c": good})


@pytest.mark.parametrize("rule", RULES)
def test_empty_input_raises(rule):
    with pytest.raises(ValueError, match="at least one peer"):
        rule({})


def test_bad_parameters_raise():
    states = {"a": vec(1.0), "b": vec(2.0)}
    for fraction in (-0.1, 0.5, 0.7, math.nan, True, "0.2"):
        with pytest.raises(ValueError, match="trim_fraction"):
            trimmed_mean(states, fraction)
    for f in (-1, 1.0, None):
        with pytest.raises(ValueError, match="num_byzantine"):
            krum_select(states, f)
    for keep in (0, 3, 1.0):
        with pytest.raises(ValueError, match="keep"):
            multi_krum(states, 0, keep)


@pytest.mark.parametrize("rule", [RULES[0], RULES[1], lambda s: multi_krum(s, 1, len(s))])
def test_outputs_are_fresh_float32(rule):
    mine = {"A": torch.ones(2, 3), "B": torch.arange(4.0)}
    for states in ({"me": mine}, {"me": mine, "you": {k: v.clone() for k, v in mine.items()}}):
        out = rule(states)
        for name, tensor in out.items():
            assert tensor.dtype == torch.float32 and tensor.shape == mine[name].shape
            assert tensor.data_ptr() != mine[name].data_ptr()
            tensor.add_(1.0)
        assert torch.equal(mine["A"], torch.ones(2, 3)) and torch.equal(mine["B"], torch.arange(4.0))
    low = {"me": {"A": torch.ones(2, dtype=torch.bfloat16)}, "you": {"A": torch.ones(2, dtype=torch.float64)}}
    assert rule(low)["A"].dtype == torch.float32
