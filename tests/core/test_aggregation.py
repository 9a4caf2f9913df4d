"""Robust aggregation rules: properties every rule must have, then each rule's guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.core.aggregation import (
    CLIPPING_RULES,
    DEFAULT_RULE,
    DEFAULT_VETTED_SCALE,
    RULES,
    STEP_CAP,
    adaptive_radius,
    aggregate,
    flatten,
    unflatten,
)
from p2pfl.errors import AggregationError

ALL = sorted(RULES)
ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "geomed"]
SHAPES = {"fc.weight": (3, 2), "fc.bias": (3,)}


def model(values: np.ndarray, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Build a small state from 9 numbers, plus an integer buffer."""
    flat = torch.as_tensor(values, dtype=dtype)
    return {
        "fc.weight": flat[:6].reshape(3, 2).clone(),
        "fc.bias": flat[6:9].clone(),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def vec(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return flatten(state, torch.float64)[0]


def cloud(seed: int, n: int, spread: float = 1.0) -> tuple[dict, list[dict], list[float]]:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=9)
    own = model(centre + spread * rng.normal(size=9))
    nbs = [model(centre + spread * rng.normal(size=9)) for _ in range(n)]
    return own, nbs, list(rng.uniform(0.5, 2.0, size=n))


# --- properties of every rule ---------------------------------------------------------------


def test_registry_names_the_default_and_every_documented_rule() -> None:
    assert DEFAULT_RULE in RULES
    assert set(RULES) == {
        "mean", "median", "trimmed_mean", "krum", "multi_krum", "geomed",
        "centered_clip", "clipped_gossip", "balance", "ios",
    }  # fmt: skip


def test_registry_entries_carry_what_each_rule_needs() -> None:
    clipping = {name for name, entry in RULES.items() if entry.clipping}
    assert clipping == {"centered_clip", "clipped_gossip"}
    assert {name for name, entry in RULES.items() if entry.uses_samples} == {"mean"}
    assert clipping == CLIPPING_RULES  # the deprecated alias is derived, not listed by hand
    assert RULES["mean"].name == "mean"
    assert "FedAvg" in (RULES["mean"].__doc__ or "")


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 7), data=st.data())
def test_neighbour_order_does_not_matter(name: str, seed: int, n: int, data: st.DataObject) -> None:
    own, nbs, weights = cloud(seed, n)
    perm = data.draw(st.permutations(range(n)))
    before = aggregate(name, own, nbs, weights)
    after = aggregate(name, own, [nbs[i] for i in perm], [weights[i] for i in perm])
    assert torch.allclose(vec(before.state), vec(after.state), atol=1e-9)
    assert np.allclose([before.trust[i] for i in perm], after.trust, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=9, max_size=9), n=st.integers(0, 6))
@settings(max_examples=12, deadline=None)
def test_equal_inputs_give_that_input(name: str, values: list[float], n: int) -> None:
    own = model(np.array(values))
    result = aggregate(name, own, [model(np.array(values)) for _ in range(n)], [1.0] * n)
    assert torch.allclose(vec(result.state), vec(own), rtol=1e-12, atol=1e-9)
    assert result.trust == (1.0,) * n


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_not_mutated_and_outputs_are_new_tensors(name: str) -> None:
    own, nbs, weights = cloud(1, 5)
    nbs[2] = model(np.full(9, 1e6))
    copies = [{k: t.clone() for k, t in s.items()} for s in (own, *nbs)]
    result = aggregate(name, own, nbs, weights)
    for original, copy in zip((own, *nbs), copies, strict=True):
        assert all(torch.equal(original[k], copy[k]) for k in copy)
    for key, tensor in result.state.items():
        assert tensor.data_ptr() not in {s[key].data_ptr() for s in (own, *nbs)}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_output_keeps_dtypes_shapes_and_non_float_buffers(name: str, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    own = model(rng.normal(size=9), dtype)
    own["bn.num_batches_tracked"] = torch.tensor(11)
    nbs = [model(rng.normal(size=9), dtype) for _ in range(4)]
    result = aggregate(name, own, nbs, [1.0] * 4)
    assert {k: (t.dtype, t.shape) for k, t in result.state.items()} == {
        k: (t.dtype, t.shape) for k, t in own.items()
    }
    assert int(result.state["bn.num_batches_tracked"]) == 11


@pytest.mark.parametrize("name", ALL)
def test_trust_is_in_unit_interval_and_one_per_neighbour(name: str) -> None:
    own, nbs, weights = cloud(5, 6)
    result = aggregate(name, own, nbs, weights)
    assert len(result.trust) == 6
    assert all(0.0 <= t <= 1.0 for t in result.trust)


@pytest.mark.parametrize("name", ALL)
def test_no_neighbours_returns_own_model(name: str) -> None:
    own, _, _ = cloud(2, 0)
    result = aggregate(name, own, [], [])
    assert torch.equal(vec(result.state), vec(own))
    assert result.trust == ()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_neighbour_is_excluded_with_zero_trust(name: str, poison: float) -> None:
    own, nbs, weights = cloud(4, 4)
    bad = model(np.zeros(9))
    bad["fc.bias"][1] = poison
    clean = aggregate(name, own, nbs, weights)
    result = aggregate(name, own, [*nbs, bad], [*weights, 0.0])
    with_weight = aggregate(
        name, own, [*nbs, bad], [*weights, 5.0], self_weight=clean_self(weights)
    )
    assert result.trust[-1] == 0.0
    assert with_weight.trust[-1] == 0.0
    assert torch.isfinite(vec(with_weight.state)).all()
    assert torch.allclose(vec(result.state), vec(clean.state), atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_overflowing_float32_neighbour_is_excluded_and_result_stays_finite(name: str) -> None:
    rng = np.random.default_rng(18)
    own = model(rng.normal(size=9), torch.float32)
    nbs = [model(rng.normal(size=9), torch.float32) for _ in range(4)]
    huge = model(np.full(9, 3e38), torch.float32)  # finite, but its square is not
    result = aggregate(name, own, [*nbs, huge], [1.0] * 5)
    assert result.trust[-1] == 0.0
    assert torch.isfinite(vec(result.state)).all()


def clean_self(weights: list[float]) -> float:
    return sum(weights) / len(weights)


@pytest.mark.parametrize("name", ALL)
def test_zero_weight_neighbour_is_ignored_but_gets_trust(name: str) -> None:
    own, nbs, weights = cloud(6, 4)
    far = model(np.full(9, 1e6))
    clean = aggregate(name, own, nbs, weights, self_weight=1.0)
    result = aggregate(name, own, [*nbs, far], [*weights, 0.0], self_weight=1.0)
    assert torch.allclose(vec(result.state), vec(clean.state), atol=1e-9)
    assert len(result.trust) == 5
    assert result.trust[-1] == 1.0 if name == "mean" else result.trust[-1] < 0.05


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: s.pop("fc.bias"), "fc.bias"),
        (lambda s: s.update(extra=torch.zeros(1)), "extra"),
        (lambda s: s.update({"fc.bias": torch.zeros(4, dtype=torch.float64)}), "fc.bias"),
        (lambda s: s.update({"fc.weight": torch.zeros(3, 2, dtype=torch.float32)}), "fc.weight"),
        (lambda s: s.update({"fc.bias": [1.0, 2.0, 3.0]}), "fc.bias"),
    ],
)
@pytest.mark.parametrize("name", ALL)
def test_disagreeing_states_raise_naming_the_key(name: str, change, needle: str) -> None:
    own, nbs, weights = cloud(7, 3)
    change(nbs[1])
    with pytest.raises(AggregationError, match=needle):
        aggregate(name, own, nbs, weights)


@pytest.mark.parametrize(
    ("weights", "kwargs"),
    [
        ([1.0, 1.0], {}),
        ([1.0, -1.0, 1.0], {}),
        ([1.0, math.nan, 1.0], {}),
        ([1.0, math.inf, 1.0], {}),
        ([1.0, 1.0, 1.0], {"self_weight": -1.0}),
        ([1.0, 1.0, 1.0], {"no_such_param": 1}),
    ],
)
def test_bad_weights_and_params_raise(weights: list[float], kwargs: dict) -> None:
    own, nbs, _ = cloud(8, 3)
    with pytest.raises(AggregationError):
        aggregate("mean", own, nbs, weights, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("trimmed_mean", {"trim": -1}),
        ("trimmed_mean", {"trim": 1.5}),
        ("krum", {"f": -2}),
        ("multi_krum", {"m": 0}),
        ("geomed", {"nu": -1.0}),
        ("clipped_gossip", {"tau": -1.0}),
        ("clipped_gossip", {"delta": 1.5}),
        ("balance", {"lambda_": 2.0}),
        ("balance", {"alpha": 1.5}),
        ("ios", {"f": "two"}),
    ],
)
def test_rule_specific_bad_params_raise(name: str, kwargs: dict) -> None:
    own, nbs, weights = cloud(9, 4)
    with pytest.raises(AggregationError):
        aggregate(name, own, nbs, weights, **kwargs)


def test_unknown_rule_and_non_finite_own_model_raise() -> None:
    own, nbs, weights = cloud(10, 2)
    with pytest.raises(AggregationError, match="unknown rule"):
        aggregate("average", own, nbs, weights)
    own["fc.weight"][0, 0] = math.nan
    with pytest.raises(AggregationError, match="fc.weight"):
        aggregate("mean", own, nbs, weights)


def test_flatten_unflatten_round_trip_keeps_non_floats_from_like() -> None:
    own = model(np.arange(9.0))
    vector, spec = flatten(own)
    assert vector.tolist() == list(np.arange(9.0))
    back = unflatten(vector * 2, spec, like=own)
    assert back["fc.bias"].tolist() == [12.0, 14.0, 16.0]
    assert int(back["bn.num_batches_tracked"]) == 7


# --- each rule's guarantees -------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), own_weight=st.floats(0.0, 5.0))
@settings(max_examples=30, deadline=None)
def test_mean_is_the_weighted_average(seed: int, n: int, own_weight: float) -> None:
    own, nbs, weights = cloud(seed, n)
    result = aggregate("mean", own, nbs, weights, self_weight=own_weight)
    stacked = torch.stack([vec(s) for s in (own, *nbs)])
    w = torch.tensor([own_weight, *weights], dtype=torch.float64)
    assert torch.allclose(vec(result.state), (w[:, None] * stacked).sum(0) / w.sum())


def test_median_and_trimmed_mean_match_their_definitions() -> None:
    own = model(np.full(9, 0.0))
    nbs = [model(np.full(9, v)) for v in (1.0, 2.0, 10.0, -7.0)]
    assert vec(aggregate("median", own, nbs, [1.0] * 4).state).tolist() == [1.0] * 9
    trimmed = aggregate("trimmed_mean", own, nbs, [1.0] * 4, trim=1)
    assert vec(trimmed.state).tolist() == [1.0] * 9
    assert trimmed.trust == (1.0, 1.0, 0.0, 0.0)
    even = aggregate("median", own, nbs[:3], [1.0] * 3)  # 0, 1, 2, 10 -> (1 + 2) / 2
    assert vec(even.state).tolist() == [1.5] * 9


def with_outliers(seed: int, honest: int, f: int) -> tuple[dict, list[dict], torch.Tensor]:
    own, nbs, _ = cloud(seed, honest)
    signs = [1.0 if i % 2 == 0 else -1.0 for i in range(f)]
    outliers = [model(np.full(9, 1e6 * s)) for s in signs]
    honest_rows = torch.stack([vec(s) for s in (own, *nbs)])
    return own, [*outliers, *nbs], honest_rows


# Largest outlier count within each rule's breakdown point, for h honest inputs (own incl.).
BREAKDOWN = {
    "median": lambda h: (h - 1, {}),
    "trimmed_mean": lambda h: (h - 1, {"trim": h - 1}),
    "krum": lambda h: (h - 3, {"f": h - 3}),
    "multi_krum": lambda h: (h - 3, {"f": h - 3}),
    "geomed": lambda h: ((h - 1) // 2, {}),
}


@pytest.mark.parametrize("name", ROBUST)
@given(seed=st.integers(0, 2**32 - 1), honest=st.integers(3, 7))
@settings(max_examples=10, deadline=None)
def test_robust_rules_stay_in_honest_range(name: str, seed: int, honest: int) -> None:
    f, kwargs = BREAKDOWN[name](honest + 1)
    own, nbs, honest_rows = with_outliers(seed, honest, f)
    result = aggregate(name, own, nbs, [1.0] * len(nbs), **kwargs)
    # geomed is pulled out of the honest box by a bounded amount: a fraction of the spread.
    tolerance = 0.25 * float((honest_rows.max(0).values - honest_rows.min(0).values).mean())
    tolerance = tolerance if name == "geomed" else 1e-9
    out = vec(result.state)
    assert (out >= honest_rows.min(0).values - tolerance).all()
    assert (out <= honest_rows.max(0).values + tolerance).all()
    if f:
        assert max(result.trust[:f]) < 0.05  # the outliers


@pytest.mark.parametrize("name", [r for r in ALL if r != "mean"])
def test_an_outlier_gets_low_trust_and_honest_neighbours_high(name: str) -> None:
    own, nbs, _ = cloud(11, 6, spread=0.1)
    nbs.insert(2, model(np.full(9, 1e6)))
    kwargs = {"lambda_": 0.0, "gamma": 10.0} if name == "balance" else {}
    result = aggregate(name, own, nbs, [1.0] * 7, **kwargs)
    assert result.trust[2] < 0.05
    honest = [t for j, t in enumerate(result.trust) if j != 2]
    assert sum(honest) / len(honest) >= (0.5 if "krum" in name else 0.8)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 7),
    log_scale=st.floats(-3, 8),
    own_weight=st.floats(0.0, 4.0),
    delta=st.floats(0.0, 0.9),
)
@settings(max_examples=40, deadline=None)
def test_clipped_gossip_moves_own_by_at_most_weights_times_radius(
    seed: int, n: int, log_scale: float, own_weight: float, delta: float
) -> None:
    rng = np.random.default_rng(seed)
    own = model(rng.normal(size=9))
    nbs = [model(10**log_scale * rng.standard_cauchy(size=9)) for _ in range(n)]  # anything
    weights = list(rng.uniform(0, 2, size=n) * (rng.uniform(size=n) > 0.2))
    kwargs = {"self_weight": own_weight, "delta": delta}
    result = aggregate("clipped_gossip", own, nbs, weights, **kwargs)
    moved = float(torch.linalg.vector_norm(vec(result.state) - vec(own)))
    share = sum(weights) / (own_weight + sum(weights)) if sum(weights) > 0 else 0.0
    assert result.radius is not None
    assert moved <= share * result.radius * (1 + 1e-9) + 1e-9
    distances = [float(torch.linalg.vector_norm(vec(s) - vec(own))) for s in nbs]
    for t, d in zip(result.trust, distances, strict=True):
        assert t == pytest.approx(min(1.0, result.radius / d) if d > 0 else 1.0)


def test_adaptive_radius_leaves_delta_of_the_weight_outside() -> None:
    dist = torch.tensor([3.0, 1.0, 100.0, 2.0, 4.0], dtype=torch.float64)
    equal = torch.ones(5, dtype=torch.float64)
    assert adaptive_radius(dist, equal, 0.2) == 4.0
    assert adaptive_radius(dist, equal, 0.4) == 3.0
    assert adaptive_radius(dist, equal, 0.0) == 100.0
    heavy_closest = torch.tensor([1.0, 20.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert adaptive_radius(dist, heavy_closest, 0.2) == 1.0  # holds > 1 - delta alone
    assert adaptive_radius(dist[:1], equal[:1], 0.2) == 3.0  # one neighbour: no spread to use
    ties = torch.tensor([1.0, 2.0, 2.0, 9.0], dtype=torch.float64)
    w = torch.tensor([0.7, 0.05, 0.25, 0.0], dtype=torch.float64)
    assert adaptive_radius(ties, w, 0.2) == 1.0  # the tied pair counts as one group
    swapped = torch.tensor([0.7, 0.25, 0.05, 0.0], dtype=torch.float64)
    assert adaptive_radius(ties, swapped, 0.2) == 1.0


def test_clipped_gossip_with_honest_majority_radius_is_below_farthest_honest() -> None:
    own, nbs, weights = cloud(13, 6)
    byzantine = [model(np.full(9, 1e6)), model(np.full(9, -1e6))]
    result = aggregate("clipped_gossip", own, [*nbs, *byzantine], [1.0] * 8, delta=0.25)
    honest = max(float(torch.linalg.vector_norm(vec(s) - vec(own))) for s in nbs)
    assert result.radius is not None
    assert result.radius <= honest
    assert max(result.trust[6:]) < 1e-4


def test_clipped_gossip_radius_stays_honest_when_attackers_exceed_delta() -> None:
    # 2 of 4 neighbours attack: 50% of the neighbour weight, far above delta = 0.2. The
    # quantile alone would reach an attacker; the median cap (own model voting at 0)
    # keeps the radius within kappa x the honest distances and the attackers untrusted.
    own, nbs, _ = cloud(16, 2)
    byzantine = [model(np.full(9, 1e6)), model(np.full(9, -1e6))]
    result = aggregate("clipped_gossip", own, [*nbs, *byzantine], [1.0] * 4)
    honest = max(float(torch.linalg.vector_norm(vec(s) - vec(own))) for s in nbs)
    assert result.radius is not None
    assert result.radius <= 2.0 * honest
    assert max(result.trust[2:]) < 1e-4
    uncapped = aggregate("clipped_gossip", own, [*nbs, *byzantine], [1.0] * 4, kappa=1e12)
    assert uncapped.radius is not None
    assert uncapped.radius > 1e5  # what the cap prevents


def test_own_step_caps_the_radius_even_against_an_attacking_majority() -> None:
    # 3 of 4 neighbours attack: no neighbour statistic is honest any more; the node's own
    # last local step (or the nearest neighbour, if farther) still bounds the pull.
    own, nbs, _ = cloud(17, 1)
    byzantine = [model(np.full(9, 1e6)) for _ in range(3)]
    result = aggregate("clipped_gossip", own, [*nbs, *byzantine], [1.0] * 4, own_step=0.5)
    nearest = float(torch.linalg.vector_norm(vec(nbs[0]) - vec(own)))
    assert result.radius is not None
    assert result.radius <= max(STEP_CAP * 0.5, nearest)
    assert max(result.trust[1:]) < 1e-4
    moved = float(torch.linalg.vector_norm(vec(result.state) - vec(own)))
    assert moved <= result.radius  # normalised neighbour weights sum to < 1
    with pytest.raises(AggregationError, match="own_step"):
        aggregate("clipped_gossip", own, nbs, [1.0], own_step=-1.0)


@pytest.mark.parametrize("step_cap", [2.0, 8.0])
def test_the_step_cap_is_a_rule_parameter(step_cap: float) -> None:
    # Neighbours at distances 1, 9, 10, 11 from the own model, own step 1: the radius is
    # step_cap x 1 (above the nearest neighbour, below the others).
    own = model(np.zeros(9))
    nbs = [model(np.full(9, d / 3.0)) for d in (1.0, 9.0, 10.0, 11.0)]  # |(d/3) x 1_9| = d
    result = aggregate("clipped_gossip", own, nbs, [1.0] * 4, own_step=1.0, step_cap=step_cap)
    assert result.radius == pytest.approx(step_cap)


def test_the_step_cap_binds_every_neighbour_and_vetting_widens_it() -> None:
    # A drifted node (tiny own step) far from its one honest neighbour, three attackers at
    # weight 0: nobody, however near, pulls it further than step_cap own steps per round;
    # a neighbour the harm check vetted gets vetted_scale times that. (The nearest
    # reputable neighbour's distance is no floor any more: with three attacking neighbours
    # of four it admitted them.)
    own, nbs, _ = cloud(18, 1, spread=3.0)
    byzantine = [model(np.full(9, 1e3)) for _ in range(3)]
    everyone = [*nbs, *byzantine]
    plain = aggregate("clipped_gossip", own, everyone, [0.9, 0.0, 0.0, 0.0], own_step=0.01)
    assert plain.radius is not None
    assert plain.radius <= STEP_CAP * 0.01
    assert plain.trust[0] < 0.25
    vetted = aggregate("clipped_gossip", own, everyone, [0.9, 0.0, 0.0, 0.0], own_step=0.01,
                       vetted=[True, False, False, False])
    assert vetted.trust[0] == pytest.approx(min(1.0, DEFAULT_VETTED_SCALE * plain.trust[0]))
    assert max(vetted.trust[1:]) < 1e-3


def test_centered_clip_with_one_iteration_equals_clipped_gossip() -> None:
    own, nbs, weights = cloud(14, 5)
    nbs.append(model(np.full(9, 50.0)))
    gossip = aggregate("clipped_gossip", own, nbs, [*weights, 1.0])
    centred = aggregate("centered_clip", own, nbs, [*weights, 1.0], iters=1)
    assert torch.allclose(vec(gossip.state), vec(centred.state))
    assert centred.radius == pytest.approx(gossip.radius)
    assert centred.trust == pytest.approx(gossip.trust)


def test_krum_returns_one_honest_input_and_multi_krum_averages_the_best() -> None:
    own, nbs, _ = cloud(15, 5, spread=0.1)
    nbs.append(model(np.full(9, 30.0)))
    chosen = vec(aggregate("krum", own, nbs, [1.0] * 6, f=1).state)
    assert any(torch.equal(chosen, vec(s)) for s in (own, *nbs[:5]))
    multi = aggregate("multi_krum", own, nbs, [1.0] * 6, f=1)  # m = 7 - 1: all honest
    honest = torch.stack([vec(s) for s in (own, *nbs[:5])])
    assert torch.allclose(vec(multi.state), honest.mean(0))
    assert multi.trust[:5] == (1.0,) * 5
    assert multi.trust[5] < 0.01


def test_geomed_finds_the_middle_of_collinear_points() -> None:
    line = [model(np.full(9, v)) for v in (0.0, 1.0, 5.0)]
    result = aggregate("geomed", line[1], [line[0], line[2]], [1.0, 1.0])
    assert torch.allclose(vec(result.state), torch.ones(9, dtype=torch.float64), atol=1e-4)


def test_balance_accepts_by_distance_and_mixes_with_alpha() -> None:
    own = model(np.full(9, 10.0))  # ||own|| = 30
    near, far = model(np.full(9, 11.0)), model(np.full(9, 20.0))  # distances 3 and 30
    result = aggregate("balance", own, [near, far], [1.0, 1.0], gamma=0.3, alpha=0.25)
    assert result.trust == pytest.approx((1.0, 9.0 / 30.0))  # rejected: threshold / distance
    assert result.radius == pytest.approx(9.0)
    assert torch.allclose(vec(result.state), torch.full((9,), 10.75, dtype=torch.float64))
    late = aggregate("balance", own, [near, far], [1.0, 1.0], gamma=0.3, kappa=10.0, lambda_=1.0)
    assert max(late.trust) < 0.01  # the threshold shrinks as training progresses
    free = aggregate("balance", own, [near], [3.0], self_weight=1.0, alpha=None)
    assert torch.allclose(vec(free.state), torch.full((9,), 10.75, dtype=torch.float64))


def test_ios_removes_the_farthest_neighbour_but_never_the_own_model() -> None:
    own, nbs, weights = cloud(16, 5, spread=0.1)
    nbs.insert(0, model(np.full(9, 40.0)))
    result = aggregate("ios", own, nbs, [1.0, *weights], self_weight=2.0, f=1)
    rest = torch.stack([vec(s) for s in (own, *nbs[1:])])
    w = torch.tensor([2.0, *weights], dtype=torch.float64)
    assert torch.allclose(vec(result.state), (w[:, None] * rest).sum(0) / w.sum())
    assert result.trust[0] < 0.01
    assert result.trust[1:] == (1.0,) * 5
    capped = aggregate("ios", own, nbs[1:3], [1.0, 1.0], f=5)  # f is capped at n - 1
    assert not torch.equal(vec(capped.state), vec(own))


@pytest.mark.parametrize("name", ALL)
def test_float32_model_of_realistic_width_is_order_invariant(name: str) -> None:
    gen = torch.Generator().manual_seed(17)
    centre = torch.randn(20_000, generator=gen)
    own = {"w": centre + 0.1 * torch.randn(20_000, generator=gen), "n": torch.tensor(1)}
    nbs = [{"w": centre + 0.1 * torch.randn(20_000, generator=gen), "n": torch.tensor(2)}]
    nbs += [{"w": centre + 0.1 * torch.randn(20_000, generator=gen), "n": torch.tensor(2)}]
    nbs += [{"w": centre * -4.0, "n": torch.tensor(2)}]  # a sign-flipping attacker
    nbs += [{"w": centre + 0.1 * torch.randn(20_000, generator=gen), "n": torch.tensor(2)}]
    weights = [1.0, 0.5, 1.0, 2.0]
    before = aggregate(name, own, nbs, weights)
    after = aggregate(name, own, nbs[::-1], weights[::-1])
    assert before.state["w"].dtype == torch.float32
    assert torch.allclose(before.state["w"], after.state["w"], atol=1e-5)
    assert before.trust == pytest.approx(after.trust[::-1], abs=1e-5)
    if name != "mean":
        assert before.trust[2] < 0.5  # the attacker


@pytest.mark.parametrize("name", ALL)
def test_zero_weight_honest_neighbour_earns_high_trust(name: str) -> None:
    own, nbs, weights = cloud(19, 6)
    kwargs = {"gamma": 10.0} if name == "balance" else {}
    result = aggregate(name, own, nbs, [*weights[:5], 0.0], **kwargs)
    assert result.trust[-1] >= 0.5  # an excluded peer that behaves can win its weight back


def test_default_self_weight_is_the_mean_positive_neighbour_weight() -> None:
    own, (a, b, c), _ = cloud(20, 3)
    result = aggregate("mean", own, [a, b, c], [1.0, 3.0, 0.0])
    expected = (2.0 * vec(own) + 1.0 * vec(a) + 3.0 * vec(b)) / 6.0
    assert torch.allclose(vec(result.state), expected)


def test_vetted_neighbours_get_a_wider_radius_in_the_clipping_rules() -> None:
    # Three close neighbours and one far one (the peer across a bridge): clipped to
    # nearly nothing, unless the node vetted it (its harm check passed): then its radius
    # is vetted_scale times wider (default DEFAULT_VETTED_SCALE), or unbounded with math.inf.
    own, nbs, _ = cloud(19, 3, spread=0.1)
    far = model(np.full(9, 20.0))
    for name in ("clipped_gossip", "centered_clip"):
        clipped = aggregate(name, own, [*nbs, far], [1.0] * 4)
        assert clipped.trust[3] < 0.1
        flags = [False, False, False, True]
        wider = aggregate(name, own, [*nbs, far], [1.0] * 4, vetted=flags)
        used = aggregate(name, own, [*nbs, far], [1.0] * 4, vetted=flags, vetted_scale=math.inf)
        assert used.trust[3] == 1.0
        if name == "clipped_gossip":  # centered_clip judges from its moved centre
            assert wider.trust[3] == pytest.approx(DEFAULT_VETTED_SCALE * clipped.trust[3])
            assert clipped.trust[:3] == used.trust[:3] == wider.trust[:3]
        pulled = float(torch.linalg.vector_norm(vec(used.state) - vec(own)))
        assert pulled > 10 * float(torch.linalg.vector_norm(vec(clipped.state) - vec(own)))
    plain = aggregate("mean", own, [*nbs, far], [1.0] * 4, vetted=[True] * 4)
    unvetted = aggregate("mean", own, [*nbs, far], [1.0] * 4)
    assert torch.equal(vec(plain.state), vec(unvetted.state))  # rules without a radius ignore it
    with pytest.raises(AggregationError, match="vetted"):
        aggregate("clipped_gossip", own, nbs, [1.0] * 3, vetted=[True])


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 8),
    log_scale=st.floats(-3, 8),
    scale=st.floats(1.0, 16.0),
)
@settings(max_examples=40, deadline=None)
def test_a_vetted_neighbour_pulls_at_most_vetted_scale_radii(
    seed: int, n: int, log_scale: float, scale: float
) -> None:
    # Whatever the neighbours send and whoever the harm check vetted, no neighbour moves
    # us further than its share times vetted_scale radii (the unvetted: one radius).
    rng = np.random.default_rng(seed)
    own = model(rng.normal(size=9))
    nbs = [model(10**log_scale * rng.standard_cauchy(size=9)) for _ in range(n)]
    vetted = [bool(v) for v in rng.uniform(size=n) > 0.5]
    weights = [1.0] * n
    result = aggregate("clipped_gossip", own, nbs, weights, vetted=vetted, vetted_scale=scale)
    assert result.radius is not None
    moved = float(torch.linalg.vector_norm(vec(result.state) - vec(own)))
    bound = sum((scale if v else 1.0) * result.radius for v in vetted) / (1.0 + n)
    assert moved <= bound * (1 + 1e-9) + 1e-9
    shared = (n + (scale - 1.0) * any(vetted)) * result.radius / (1.0 + n)  # the reach beyond one radius is shared
    assert moved <= shared * (1 + 1e-9) + 1e-9
    for t, v, s in zip(result.trust, vetted, nbs, strict=True):
        d = float(torch.linalg.vector_norm(vec(s) - vec(own)))
        limit = (scale if v else 1.0) * result.radius
        assert t == pytest.approx(min(1.0, limit / d) if d > 0 else 1.0)


def test_vetted_neighbours_pulling_together_reach_no_further_than_one_of_them() -> None:
    # Three far neighbours in one direction, all vetted (attackers drifting slowly enough
    # to pass the harm check), and one close honest one: beyond the radius, the three
    # together move us as far as one vetted neighbour could alone; each keeps its radius.
    own = model(np.zeros(9))
    close = model(np.full(9, 0.01))
    far = [model(np.full(9, 5.0 + k)) for k in range(3)]
    kwargs = {"own_step": 0.1, "vetted": [False, True, True, True]}
    alone = aggregate("clipped_gossip", own, [close, far[0]], [1.0, 1.0],
                      own_step=0.1, vetted=[False, True])
    shared = aggregate("clipped_gossip", own, [close, *far], [1.0] * 4, **kwargs)
    summed = aggregate("clipped_gossip", own, [close, *far], [1.0] * 4, shared_reach=False, **kwargs)
    assert shared.radius == pytest.approx(0.2)  # the step cap, 2 own steps
    tau, share = 0.2, 1 / 5  # four neighbours of weight 1 and the own model
    moved = float(torch.linalg.vector_norm(vec(shared.state) - vec(own)))
    assert moved <= share * float(torch.linalg.vector_norm(vec(close) - vec(own))) \
        + 3 * share * tau + share * (DEFAULT_VETTED_SCALE - 1) * tau + 1e-6
    assert float(torch.linalg.vector_norm(vec(summed.state) - vec(own))) > 2 * moved
    assert shared.trust == summed.trust  # the evidence is the same; only the reach is shared
    lone = aggregate("clipped_gossip", own, [close, far[0]], [1.0, 1.0], own_step=0.1,
                     vetted=[False, True], shared_reach=False)
    assert torch.equal(vec(alone.state), vec(lone.state))  # one vetted neighbour: nothing to share
    with pytest.raises(AggregationError, match="shared_reach"):
        aggregate("clipped_gossip", own, [close], [1.0], shared_reach="yes")


def test_vetted_scale_is_validated_and_equal_inputs_stay_put() -> None:
    own = model(np.arange(9.0))
    same = aggregate("clipped_gossip", own, [own, own], [1.0, 1.0], vetted=[True, False], vetted_scale=4.0)
    assert torch.equal(vec(same.state), vec(own))
    assert same.trust == (1.0, 1.0)
    with pytest.raises(AggregationError, match="vetted_scale"):
        aggregate("clipped_gossip", own, [own], [1.0], vetted_scale=0.5)
    unbounded = aggregate("clipped_gossip", own, [own], [1.0], vetted=[True], vetted_scale=math.inf)
    assert unbounded.trust == (1.0,)
