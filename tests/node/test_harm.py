"""The harm check: neighbours whose model does not hurt ours when mixed in are vetted."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learners.base import State
from p2pfl.node.config import HarmCheck
from p2pfl.node.harm import (
    Excess,
    HarmGate,
    Prober,
    Verdict,
    distance,
    mixed,
    plausible,
    probe,
    starting_point,
)


def vet(*args: Any, **kwargs: Any) -> list[bool]:
    """Per neighbour, whether :func:`probe` (same arguments) passed it: ``over_reference``
    <= 0; not judged: False."""
    return [e is not None and e.over_reference <= 0 for e in probe(*args, **kwargs)]


class Distance:
    """Scores a state by its distance to a target: loss 0 at the target."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.probed: list[State] = []

    def probe_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
        states = [dict(s) for s in states]  # vet passes a generator
        self.probed.extend(states)
        return [float((s["w"] - self.target).abs().sum()) for s in states]


def state(value: float) -> State:
    return {"w": torch.full((4,), value), "steps": torch.tensor(7)}


def test_mixed_moves_floats_by_the_share_and_keeps_our_integers() -> None:
    result = mixed(state(0.0), {"w": torch.full((4,), 10.0), "steps": torch.tensor(99)}, 0.25)
    assert torch.equal(result["w"], torch.full((4,), 2.5))
    assert int(result["steps"]) == 7


def test_vet_passes_harmless_neighbours_and_fails_harmful_ones() -> None:
    prober = Distance(target=0.0)
    assert isinstance(prober, Prober)
    check = HarmCheck(absolute=0.1, relative=0.0)
    # Own at the target (loss 0). Mixed in at 1/5: 0.1 away per coordinate x 4 = 0.4
    # (fails); 0.02 x 4 = 0.08 (passes); towards... the target itself (passes).
    verdict = vet(prober, check, state(0.0), [state(0.5), state(0.1), state(0.0)], [0.2] * 3)
    assert verdict == [False, True, True]


def test_plausible_keeps_models_near_the_best_loss_on_our_data() -> None:
    check = HarmCheck(absolute=0.5, relative=0.5)  # bar: best + 0.5 + 0.5 x best
    # Losses 4 (best), 6.4, 6.6 and 40 (a sign-flipped model): the bar is 6.5.
    states = [state(1.0), state(1.6), state(1.65), state(-10.0)]
    assert plausible(Distance(target=0.0), check, states) == [0, 1]
    nan = {"w": torch.full((4,), float("nan")), "steps": torch.tensor(7)}
    assert plausible(Distance(target=0.0), check, [nan, state(2.0)]) == [1]
    assert plausible(Distance(target=0.0), check, [nan]) == []


def test_catching_up_with_a_prober_starts_from_the_plausible_sources_only() -> None:
    sources = [state(0.1), state(-50.0), state(0.3)]  # a wild one among two near the target
    start = starting_point(state(5.0), sources, Distance(target=0.0), HarmCheck(absolute=1.0))
    assert start is not None
    assert torch.allclose(start["w"], torch.full((4,), 0.2))  # mean of the two kept
    assert int(start["steps"]) == 7


def test_catching_up_without_a_prober_stays_between_honest_values() -> None:
    # Own model at 0, an honest source at 1, an attacker at 1000: the median is 1.
    start = starting_point(state(0.0), [state(1.0), state(1000.0)], None, HarmCheck())
    assert start is not None
    assert torch.equal(start["w"], torch.full((4,), 1.0))
    # Three sources or more: their median, our own model left out.
    start = starting_point(state(0.0), [state(2.0), state(3.0), state(1000.0)], None, HarmCheck())
    assert start is not None
    assert torch.equal(start["w"], torch.full((4,), 3.0))


def test_catching_up_keeps_our_model_when_no_source_is_usable() -> None:
    nan = {"w": torch.full((4,), float("nan")), "steps": torch.tensor(7)}
    assert starting_point(state(0.0), [nan], Distance(target=0.0), HarmCheck()) is None


def test_vet_tolerance_grows_with_our_own_loss() -> None:
    prober = Distance(target=0.0)
    far_own, neighbour = state(1.0), state(1.5)  # own loss 4; mixing at 0.2 adds 0.4
    assert vet(prober, HarmCheck(absolute=0.0, relative=0.05), far_own, [neighbour], [0.2]) == [False]
    assert vet(prober, HarmCheck(absolute=0.0, relative=0.15), far_own, [neighbour], [0.2]) == [True]


def test_vet_skips_neighbours_with_no_share() -> None:
    prober = Distance(target=0.0)
    assert vet(prober, HarmCheck(), state(0.0), [state(0.0), state(0.0)], [0.0, 0.3]) == [False, True]
    assert len(prober.probed) == 2  # own and the one with a share
    assert vet(prober, HarmCheck(), state(0.0), [state(0.0)], [0.0]) == [False]


def test_vet_fails_everything_when_losses_are_not_finite() -> None:
    prober = Distance(target=0.0)
    assert vet(prober, HarmCheck(), state(float("inf")), [state(0.0)], [0.5]) == [False]
    assert vet(prober, HarmCheck(), state(0.0), [state(float("nan"))], [0.5]) == [False]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"enabled": 1}, "harm_check.enabled"),
        ({"absolute": -0.1}, "harm_check.absolute"),
        ({"relative": float("nan")}, "harm_check.relative"),
        ({"streak": 0}, "harm_check.streak"),
        ({"streak": True}, "harm_check.streak"),
    ],
)
def test_harm_check_config_is_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HarmCheck(**kwargs)  # type: ignore[arg-type]


def test_nobody_is_vetted_when_our_own_training_made_us_worse() -> None:
    # Our model before training sat at the target; training moved it away. Anything
    # mixed in then "improves" it, the attacker's model included: no yardstick, no pass.
    prober = Distance(target=0.0)
    own, neighbours = state(2.0), [state(0.0), state(-2.0)]
    check = HarmCheck(reference="own")  # both improve our loss; by the median one does less
    assert vet(prober, check, own, neighbours, [0.2, 0.2]) == [True, True]
    assert vet(prober, check, own, neighbours, [0.2, 0.2], start=state(0.0)) == [False, False]
    assert vet(prober, check, own, neighbours, [0.2, 0.2], start=state(3.0)) == [True, True]


def test_the_gate_vets_after_a_streak_and_a_failure_resets_it() -> None:
    prober = Distance(target=0.0)
    gate = HarmGate(HarmCheck(absolute=0.1, relative=0.0, streak=3), prober)
    good, bad = state(0.02), state(5.0)
    verdicts = [
        gate.judge(state(0.0), None, ["a", "b"], [good, bad], [1.0, 0.0], 1.0)
        for _ in range(3)
    ]
    assert [v.passed for v in verdicts] == [[True, False]] * 3
    assert [v.vetted for v in verdicts] == [[False, False], [False, False], [True, False]]
    # "b" is probed although its weight is 0: at the share of a neighbour at full
    # reputation (1/3 here), not at its own (0), or it could never earn its way back.
    assert gate.judge(state(0.0), None, ["a", "b"], [good, good], [1.0, 0.0], 1.0).passed == [True, True]
    failed = gate.judge(state(0.0), None, ["a"], [bad], [1.0], 1.0)
    assert failed.vetted == [False]
    again = gate.judge(state(0.0), None, ["a"], [good], [1.0], 1.0)
    assert again.vetted == [False]  # the streak starts over


def test_a_lone_source_must_do_about_as_well_as_our_own_model() -> None:
    check = HarmCheck(absolute=0.1, relative=0.0)
    # Our model at 1 (loss 4 against target 0): a lone source at 3 (loss 12) is refused...
    assert starting_point(state(1.0), [state(3.0)], Distance(target=0.0), check) is None
    # ...one at 0.5 (loss 2) is adopted; two sources are judged among themselves only.
    lone = starting_point(state(1.0), [state(0.5)], Distance(target=0.0), check)
    assert lone is not None
    assert torch.equal(lone["w"], torch.full((4,), 0.5))
    pair = starting_point(state(1.0), [state(3.0), state(3.1)], Distance(target=0.0), check)
    assert pair is not None


def test_probe_reports_the_excess_over_the_tolerance_and_none_when_unjudged() -> None:
    prober = Distance(target=0.0)
    check = HarmCheck(absolute=0.1, relative=0.0, reference="own", tolerance_share=0.0)
    excess = probe(prober, check, state(0.0), [state(0.5), state(0.1), state(0.0)], [0.2, 0.2, 0.0])
    assert excess[0] == Excess(*[pytest.approx(0.4 - 0.1)] * 3, tolerance=pytest.approx(0.1))
    assert excess[1] == Excess(*[pytest.approx(0.08 - 0.1)] * 3, tolerance=pytest.approx(0.1))
    assert excess[2] is None  # share 0: not mixed in, not judged
    inf = {"w": torch.full((4,), float("inf")), "steps": torch.tensor(7)}
    assert probe(prober, check, state(0.0), [inf], [0.5]) == [Excess(math.inf, math.inf, math.inf, pytest.approx(0.1))]
    assert probe(prober, check, state(2.0), [state(0.0)], [0.2], start=state(0.0)) == [None]


def test_median_reference_is_never_looser_than_our_own_loss() -> None:
    # Own loss 4 (w = 1). Two neighbours pull us near the target (mixed loss 0.8), a third
    # scales us down a little (mixed loss 3.84: it "helps" by the own-loss yardstick).
    # Against the median neighbour it is 3.04 worse: harmful relative to its peers.
    prober = Distance(target=0.0)
    nbs, shares = [state(-3.0), state(-3.0), state(0.8)], [0.2] * 3
    own_ref = HarmCheck(absolute=0.1, relative=0.0, reference="own")
    median_ref = HarmCheck(absolute=0.1, relative=0.0, reference="median")
    assert vet(prober, own_ref, state(1.0), nbs, shares) == [True, True, True]
    assert vet(prober, median_ref, state(1.0), nbs, shares) == [True, True, False]
    # Neighbours that all make us worse do not loosen the bar: it stays our own loss.
    worse = [state(2.0), state(2.0), state(1.1)]
    assert vet(prober, median_ref, state(1.0), worse, shares) == vet(prober, own_ref, state(1.0), worse, shares)


def test_a_failed_check_caps_the_trust_and_a_pass_forgives_clipping() -> None:
    verdict = Verdict(passed=[True, False, False], vetted=[False, False, False],
                      failed=[False, True, False], forgive="passed", fail_trust=0.5)
    # Passed: raised to the floor; failed: capped at fail_trust; unjudged: unchanged.
    assert verdict.forgiven([0.2, 0.9, 0.3], floor=1.0) == (1.0, 0.5, 0.3)
    vetted_only = Verdict([True, True], [False, True], [False, False], forgive="vetted")
    assert vetted_only.forgiven([0.2, 0.2], floor=1.0) == (0.2, 1.0)
    nothing = Verdict([True], [True], [False], forgive="none")
    assert nothing.forgiven([0.2], floor=1.0) == (0.2,)


def test_once_settled_typical_forgiveness_spares_only_neighbours_as_good_as_the_typical_one() -> None:
    # Own loss 4 (w = 1). Two neighbours pull us near the target (mixed loss 0.16); a third
    # barely moves us (4.16): harmless against our own loss (tolerance 0.5), but 4 worse
    # than the typical (median) neighbour's mix.
    gate = HarmGate(HarmCheck(absolute=0.5, relative=0.0, forgive="typical", unvetted_forgive=1.0),
                    Distance(target=0.0))
    nbs = [state(-3.0), state(-3.0), state(1.1)]
    verdict = gate.judge(state(1.0), None, ["a", "b", "c"], nbs, [1.0] * 3, 2.0)
    assert verdict.harmless == [True, True, True]
    assert verdict.typical == [True, True, False]
    clipped = [0.3, 0.3, 0.3]
    # Before the models settle, harmless is enough; from then on "c"'s clipping is evidence.
    assert verdict.forgiven(clipped, floor=1.0, settled=False) == (1.0, 1.0, 1.0)
    assert verdict.forgiven(clipped, floor=1.0, settled=True) == (1.0, 1.0, 0.3)
    harmless = Verdict([False] * 3, [False] * 3, [False] * 3, verdict.harmless, "harmless", 1.0, verdict.typical)
    assert harmless.forgiven(clipped, floor=1.0, settled=True) == (1.0, 1.0, 1.0)


def test_the_gate_reports_failures_and_probes_at_the_scaled_share() -> None:
    prober = Distance(target=0.0)
    check = HarmCheck(absolute=0.1, relative=0.0, probe_scale=2.0, fail_trust=0.25, max_probe_share=1.0)
    gate = HarmGate(check, prober)
    verdict = gate.judge(state(0.0), None, ["a", "b"], [state(0.02), state(5.0)], [1.0, 1.0], 1.0)
    assert verdict.passed == [True, False]
    assert verdict.failed == [False, True]
    assert verdict.fail_trust == 0.25
    # Shares 1/3 at full reputation, probed at twice that: 2/3 of the way to "a".
    assert torch.allclose(prober.probed[1]["w"], torch.full((4,), 0.02 * 2 / 3))


def test_a_node_with_one_neighbour_judges_it_at_the_capped_share() -> None:
    # Our data wants w = 0; the only neighbour sits at w = 0.06 (it knows other things).
    # At its full share, 1/2, the mix raises our loss by 0.12; at the cap, 1/3, by 0.08,
    # within the tolerance 0.1: a node with one neighbour no longer finds every honest
    # neighbour with other classes harmful because it has no other.
    prober = Distance(target=0.0)
    far = [state(0.06)]
    capped = HarmGate(HarmCheck(absolute=0.1, relative=0.0, grace=0, tolerance_share=0.0), prober).judge(
        state(0.0), None, ["a"], far, [1.0], 1.0)
    assert (capped.failed, capped.harmless) == ([False], [True])
    assert any(torch.allclose(p["w"], torch.full((4,), 0.02)) for p in prober.probed)  # 0.06 / 3
    whole = HarmGate(HarmCheck(absolute=0.1, relative=0.0, grace=0, max_probe_share=1.0, tolerance_share=0.0),
                     prober).judge(
        state(0.0), None, ["a"], far, [1.0], 1.0)
    assert (whole.failed, whole.harmless) == ([True], [False])
    assert any(torch.allclose(p["w"], torch.full((4,), 0.03)) for p in prober.probed)  # 0.06 / 2


def test_fewer_models_raise_the_harm_bar_by_the_square_of_the_share_and_weights_do_not() -> None:
    # Our data wants w = 0 (loss = 4 x w of the mix); tolerance 0.1. Neighbour "a" sits at
    # w = 0.15 (it holds other classes). Two models arrived: each is probed at 1/3, "a"
    # raises our loss by 0.2, and the harm bar is 0.1 x (1/3 / 0.2)^2 = 0.28: harmless
    # (not passed: passing keeps the plain tolerance). With the scaling off the bar is
    # 0.1, and "a" fails.
    prober = Distance(target=0.0)
    check = HarmCheck(absolute=0.1, relative=0.0, reference="own", grace=0, joint=False)
    assert check.harm_scale(2) == pytest.approx((1 / 3 / 0.2) ** 2)
    assert (check.harm_scale(4), check.harm_scale(7), check.harm_scale(0)) == (1.0, 1.0, 1.0)
    two = HarmGate(check, prober).judge(state(0.0), None, ["a", "b"], [state(0.15), state(0.0)], [1.0, 1.0], 1.0)
    assert (two.failed, two.harmless, two.passed) == ([False, False], [True, True], [False, True])
    off = HarmGate(replace(check, tolerance_share=0.0), prober).judge(
        state(0.0), None, ["a", "b"], [state(0.15), state(0.0)], [1.0, 1.0], 1.0)
    assert off.failed == [True, False]
    # Four models, three of them at weight 0: "a" carries most of the weight and is probed
    # at the cap, 1/3, as above; but the bar follows the models that arrived (an equal
    # share of 1/5), not the weights, so "a" cannot raise its own bar by gaining weight.
    four = HarmGate(check, prober).judge(state(0.0), None, ["a", "b", "c", "d"],
                                         [state(0.15)] + [state(0.0)] * 3, [1.0, 0.0, 0.0, 0.0], 0.25)
    assert four.failed == [True, False, False, False]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forgive": "always"}, "harm_check.forgive"),
        ({"reference": "mean"}, "harm_check.reference"),
        ({"fail_trust": 1.5}, "harm_check.fail_trust"),
        ({"probe_scale": 0.5}, "harm_check.probe_scale"),
        ({"settle": -1}, "harm_check.settle"),
        ({"settle": True}, "harm_check.settle"),
        ({"remember": -1}, "harm_check.remember"),
        ({"remember": 1.5}, "harm_check.remember"),
        ({"max_probe_share": 0}, "harm_check.max_probe_share"),
        ({"max_probe_share": 1.5}, "harm_check.max_probe_share"),
        ({"tolerance_share": -0.1}, "harm_check.tolerance_share"),
        ({"tolerance_share": 1.5}, "harm_check.tolerance_share"),
        ({"tolerance_share": True}, "harm_check.tolerance_share"),
        ({"forgive_memory": -1}, "harm_check.forgive_memory"),
        ({"unvetted_forgive": 1.5}, "harm_check.unvetted_forgive"),
        ({"unvetted_forgive": -0.1}, "harm_check.unvetted_forgive"),
        ({"forgive_memory": 2.5}, "harm_check.forgive_memory"),
        ({"fail_full_at": -1.0}, "harm_check.fail_full_at"),
        ({"fail_full_at": True}, "harm_check.fail_full_at"),
    ],
)
def test_new_harm_check_fields_are_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HarmCheck(**kwargs)  # type: ignore[arg-type]


def test_to_pass_a_neighbour_that_raises_our_loss_must_be_far_away() -> None:
    # Our data sees only "w"; "v" is a direction it does not care about. Training moved us
    # from w = 1.5 to w = 1 (one own step of length 1). Both neighbours raise our loss by
    # 0.4 when mixed in at 1/5, within the tolerance 0.5: harmless, no evidence.
    prober = Distance(target=0.0)

    def model(w: float, v: float) -> State:
        return {"w": torch.full((4,), w), "v": torch.full((4,), v)}

    own, start = model(1.0, 0.0), model(1.5, 0.0)
    near, far = model(1.5, 0.0), model(1.5, 10.0)  # 1 and ~20 own steps away
    check = HarmCheck(absolute=0.5, relative=0.0, reference="own", harm_per_step=0.1)
    excess = probe(prober, check, own, [near, far], [0.2, 0.2], start=start)
    assert [e is not None and e.over_own <= 0 for e in excess] == [True, True]
    # The near one spends its whole pull on harm: 0.4 per step, above 0.1 per step, so it
    # does not pass (is never vetted); the far one (0.02 per step) passes.
    assert vet(prober, check, own, [near, far], [0.2, 0.2], start=start) == [False, True]
    # Without our step (no start) or with a lax bar, both pass on the tolerance alone.
    assert vet(prober, check, own, [near, far], [0.2, 0.2]) == [True, True]
    lax = HarmCheck(absolute=0.5, relative=0.0, reference="own", harm_per_step=1.0)
    assert vet(prober, lax, own, [near, far], [0.2, 0.2], start=start) == [True, True]
    with pytest.raises(ConfigError, match="harm_check.harm_per_step"):
        HarmCheck(harm_per_step=-0.1)


def test_a_counted_failure_blocks_forgiveness_and_vetting_for_remember_rounds() -> None:
    prober = Distance(target=0.0)
    gate = HarmGate(HarmCheck(absolute=0.1, relative=0.0, streak=1, remember=2, forgive="harmless"), prober)
    good, bad = state(0.02), state(5.0)

    def judge(model: State, counts: bool = True) -> Verdict:
        return gate.judge(state(0.0), None, ["a"], [model], [1.0], 1.0, counts)

    assert judge(good).vetted == [True]
    assert judge(bad).failed == [True]
    # Harmless again, but it harmed us a round ago: its clipping is held against it and
    # it is not vetted, for two rounds; then it is forgiven and vetted as before.
    held = [judge(good), judge(good)]
    assert [v.harmless for v in held] == [[False], [False]]
    assert [v.vetted for v in held] == [[False], [False]]
    assert held[0].forgiven([0.2], 1.0) == (0.2,)
    after = judge(good)
    assert after.harmless == [True]
    assert after.vetted == [True]
    assert after.forgiven([0.2], 1.0) == (1.0,)
    # A failure in a round that does not count (before ``grace``) is not remembered.
    assert judge(bad, counts=False).failed == [True]
    assert judge(good).harmless == [True]


def test_without_remember_a_failure_weighs_only_in_its_own_round() -> None:
    gate = HarmGate(HarmCheck(absolute=0.1, relative=0.0, streak=1, forgive="harmless"), Distance(target=0.0))
    assert gate.judge(state(0.0), None, ["a"], [state(5.0)], [1.0], 1.0).failed == [True]
    again = gate.judge(state(0.0), None, ["a"], [state(0.02)], [1.0], 1.0)
    assert again.harmless == [True]
    assert again.vetted == [True]


def test_distance_is_summed_in_blocks_to_the_whole_tensor_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    a = {"big": torch.randn(3 * (1 << 20) + 5, generator=gen), "w": torch.randn(4, 3, generator=gen).t(),
         "n": torch.tensor(3)}
    b = {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 1 for k, v in a.items()}
    whole = sum(float(torch.sum((b[k].double() - a[k].double()) ** 2)) for k in ("big", "w")) ** 0.5
    assert distance(a, b) == pytest.approx(whole, rel=1e-12)
    assert distance(a, a) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mixed_in_place_equals_the_formula_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    own = {"w": torch.randn(1000, generator=gen).to(dtype)}
    other = {"w": (100 * torch.randn(1000, generator=gen)).to(dtype)}
    for share in (0.0, 0.2, 1 / 3, 1.0):
        assert torch.equal(mixed(own, other, share)["w"], own["w"] + share * (other["w"] - own["w"]))


def test_a_failure_weighs_in_proportion_to_how_far_over_the_tolerance_it_is() -> None:
    # Tolerance 0.1, own loss 0 (w = 0), shares 1/3 (loss = 4 x w of the mix). "a" raises
    # our loss by 0.15 (half a tolerance over), "b" by 0.4 (three over): "a" keeps trust
    # 0.75, "b" fail_trust.
    prober = Distance(target=0.0)
    check = HarmCheck(absolute=0.1, relative=0.0, reference="own", fail_trust=0.5, grace=0,
                      fail_full_at=1.0, max_probe_share=1.0, tolerance_share=0.0)
    nbs = [state(0.15 * 3 / 4), state(0.4 * 3 / 4)]
    verdict = HarmGate(check, prober).judge(state(0.0), None, ["a", "b"], nbs, [1.0, 1.0], 2.0)
    assert verdict.failed == [True, True]
    assert verdict.forgiven([1.0, 1.0], floor=1.0) == (pytest.approx(0.75), pytest.approx(0.5))
    flat = HarmGate(replace(check, fail_full_at=0.0), prober).judge(
        state(0.0), None, ["a", "b"], nbs, [1.0, 1.0], 2.0)
    assert flat.forgiven([1.0, 1.0], floor=1.0) == (0.5, 0.5)


def test_clipping_is_forgiven_only_as_far_as_the_neighbour_has_not_failed_lately() -> None:
    # "b" alternates: harmful, harmless, harmful... With a memory of 2 rounds its record is
    # the share of its recent checks that did not fail; a harmless round forgives its
    # clipping only up to that share. "a" never fails and is forgiven in full.
    prober = Distance(target=0.0)
    check = HarmCheck(absolute=0.1, relative=0.0, reference="own", grace=0, forgive="harmless",
                      forgive_memory=2, max_probe_share=1.0, unvetted_forgive=1.0)
    gate = HarmGate(check, prober)
    good, bad = state(0.01), state(5.0)
    gate.judge(state(0.0), None, ["a", "b"], [good, bad], [1.0, 1.0], 2.0)  # b fails: record 1/2
    verdict = gate.judge(state(0.0), None, ["a", "b"], [good, good], [1.0, 1.0], 2.0)
    assert verdict.harmless == [True, True]
    assert verdict.forgiven([0.2, 0.2], floor=1.0) == (1.0, pytest.approx(0.75))  # 1 - 1/2 * 1/2
    # Off (0): forgiven in full whatever the record.
    off = HarmGate(replace(check, forgive_memory=0), prober)
    off.judge(state(0.0), None, ["b"], [bad], [1.0], 2.0)
    assert off.judge(state(0.0), None, ["b"], [good], [1.0], 2.0).forgiven([0.2], floor=1.0) == (1.0,)


def test_once_settled_an_unvetted_neighbour_is_forgiven_only_up_to_unvetted_forgive() -> None:
    # Three harmless, typical neighbours clipped to 0.2; only "a" is vetted. Before the
    # models settle all three are forgiven in full; from then on "b" and "c" only up to
    # 0.8 (their clipping no longer earns them trust), and a record bounds it further.
    verdict = Verdict(passed=[True] * 3, vetted=[True, False, False], failed=[False] * 3,
                      harmless=[True] * 3, forgive="typical", typical=[True] * 3,
                      forgive_caps=[1.0, 1.0, 0.6], unvetted=0.8)
    clipped = [0.2, 0.2, 0.2]
    assert verdict.forgiven(clipped, floor=1.0, settled=False) == (1.0, 1.0, 0.6)
    assert verdict.forgiven(clipped, floor=1.0, settled=True) == (1.0, 0.8, 0.6)
    # Clipped less than that: nothing to forgive, the rule's trust stands.
    assert verdict.forgiven([0.9, 0.9, 0.9], floor=1.0, settled=True) == (1.0, 0.9, 0.9)
    gate = HarmGate(HarmCheck(unvetted_forgive=0.7), Distance(target=0.0))
    assert gate.judge(state(0.0), None, ["a"], [state(0.01)], [1.0], 1.0).unvetted == 0.7
