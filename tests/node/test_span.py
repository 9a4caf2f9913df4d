"""The span check: a neighbour whose deviation no training on data would produce loses its weight."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learners.datasets import make_digits_learner
from p2pfl.learners.torch_learner import TorchLearner
from p2pfl.node.config import HarmCheck, NodeConfig
from p2pfl.node.mixer import Mixer
from p2pfl.node.span import GradientProber, Span, SpanGate, ramp, span_ratios

DIM = 800  # parameters
K = 40  # probe gradients: a random direction has 5% of its length (squared) in their span


class FixedGradients:
    """A prober whose gradients span a fixed random subspace, whatever the state."""

    def __init__(self, seed: int = 0) -> None:
        self.directions = torch.randn(K, DIM, generator=torch.Generator().manual_seed(seed))
        self.calls: list[int] = []

    def probe_gradients(self, state: Mapping[str, torch.Tensor], samples: int) -> torch.Tensor:
        self.calls.append(samples)
        return self.directions[:samples]


def in_span(prober: FixedGradients, seed: int, scale: float = 1.0) -> torch.Tensor:
    """A deviation mostly in the probe's span (as training on data gives), a little outside."""
    g = torch.Generator().manual_seed(seed)
    inside = torch.randn(K, generator=g) @ prober.directions
    outside = torch.randn(DIM, generator=g)
    return scale * (inside / inside.norm() + 0.5 * outside / outside.norm())


def made_up(seed: int, scale: float = 1.0) -> torch.Tensor:
    direction = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return scale * direction / direction.norm()


def models(own: torch.Tensor, *neighbours: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"w": own, "steps": torch.tensor(3)}] + [{"w": n, "steps": torch.tensor(3)} for n in neighbours]


def test_a_direction_in_the_gradients_span_scores_high_and_a_random_one_about_one() -> None:
    prober = FixedGradients()
    q = Span(prober.directions)
    own = torch.zeros(DIM)
    stack = torch.stack([own, in_span(prober, 1), in_span(prober, 2), made_up(3, scale=2.0)])
    ratios = span_ratios(q, stack, high=6.0)
    assert min(ratios[:2]) > 6  # 0.8 of its length squared in the span: 16x a random one's 0.05
    assert ratios[2] < 3  # twice as far as the honest ones (alie's z 1.5-2), in no data direction


def test_a_far_off_model_is_taken_out_of_the_mean_before_the_others_are_judged() -> None:
    prober = FixedGradients()
    q = Span(prober.directions)
    far = made_up(9, scale=100.0)  # ipm-like: far away, in no data direction
    stack = torch.stack([torch.zeros(DIM), in_span(prober, 1), in_span(prober, 2), far])
    ratios = span_ratios(q, stack, high=6.0)
    assert min(ratios[:2]) > 6  # judged against the mean without the far one
    assert ratios[2] < 3


def test_the_span_projects_as_an_orthonormal_basis_of_the_gradients_would() -> None:
    g = torch.Generator().manual_seed(4)
    gradients = torch.randn(K, DIM, generator=g) * torch.logspace(-2, 1, K).unsqueeze(1)
    vectors = torch.randn(6, DIM, generator=g)
    q = torch.linalg.qr(gradients.T).Q
    span = Span(gradients)
    assert (span.rank, span.dimension) == (K, DIM)
    expected = (vectors @ q).square().sum(dim=1)
    assert torch.allclose(span.inside(vectors), expected, rtol=1e-3)
    assert torch.allclose(span.inside(gradients), gradients.square().sum(dim=1), rtol=1e-3)
    # a sample repeated adds no direction: the random share stays rank / parameters
    twice = Span(torch.cat([gradients, gradients[:3]]))
    assert twice.rank == K
    assert torch.allclose(twice.inside(vectors), expected, rtol=1e-3)


def test_ramp() -> None:
    assert [ramp(r, 3.0, 6.0) for r in (1.0, 3.0, 4.5, 6.0, 30.0)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def gate(**overrides: float) -> tuple[SpanGate, FixedGradients]:
    prober = FixedGradients()
    assert isinstance(prober, GradientProber)
    return SpanGate(replace(HarmCheck(), **{"span_low": 3.0, **overrides}), prober), prober


def test_a_made_up_neighbour_gets_no_weight_and_loses_trust_only_if_it_persists() -> None:
    span, prober = gate()
    own, *others = models(torch.zeros(DIM), in_span(prober, 1), in_span(prober, 2), made_up(3, scale=2.0))
    first = span.judge(1, own, ["a", "b", "x"], others)
    assert first is not None
    assert first.weight[:2] == [1.0, 1.0]
    assert first.weight[2] == 0.0  # out of this round's mix
    assert first.trust[2] > 0.5  # one round is not yet evidence: a running mean from above suspicion
    trust = first.trust[2]
    for number in range(2, 8):
        verdict = span.judge(number, own, ["a", "b", "x"], others)
        assert verdict is not None
        assert verdict.trust[2] <= trust
        trust = verdict.trust[2]
    assert trust == 0.0
    assert verdict.trust[:2] == [1.0, 1.0]


def test_nothing_is_judged_before_span_start_or_without_neighbours() -> None:
    span, prober = gate(span_start=3)
    own, *others = models(torch.zeros(DIM), in_span(prober, 1), made_up(3, scale=2.0), in_span(prober, 2))
    assert span.judge(2, own, ["a", "x", "b"], others) is None
    assert span.judge(3, own, [], []) is None
    assert prober.calls == []
    assert span.judge(3, own, ["a", "x", "b"], others) is not None
    assert prober.calls == [DIM // 8]  # the gradients asked for: at most an eighth of the parameters


def test_a_node_whose_typical_neighbour_looks_made_up_abstains() -> None:
    # Our data spans too few directions to vouch for anyone (a node holding one class):
    # judging would cut honest neighbours. Two made-up of three: no verdict either.
    span, _ = gate()
    own, *others = models(torch.zeros(DIM), made_up(3, scale=2.0), made_up(4, scale=2.0), made_up(5))
    assert span.judge(4, own, ["x", "y", "z"], others) is None


def test_gradients_at_float_noise_are_not_judged_by() -> None:
    span, prober = gate()
    prober.directions[8:] *= 1e-9  # all but 8 samples fitted to noise: their directions are noise
    own, *others = models(torch.zeros(DIM), in_span(prober, 1), made_up(3, scale=2.0), in_span(prober, 2))
    assert span.judge(5, own, ["a", "x", "b"], others) is not None
    prober.directions[7] *= 1e-9  # 7 left
    assert span.judge(6, own, ["a", "x", "b"], others) is None


def test_gradients_all_zero_or_not_a_number_are_not_judged_by() -> None:
    span, prober = gate()
    own, *others = models(torch.zeros(DIM), in_span(prober, 1), made_up(3, scale=2.0), in_span(prober, 2))
    prober.directions.zero_()  # a model that fits its probe exactly
    assert span.judge(5, own, ["a", "x", "b"], others) is None
    prober.directions.fill_(float("nan"))  # a model that diverged
    assert span.judge(6, own, ["a", "x", "b"], others) is None


def test_too_small_a_model_is_not_judged() -> None:
    span, prober = gate()
    own, *others = models(torch.zeros(40), torch.ones(40))  # 40 parameters: room for 5 gradients
    assert span.judge(5, own, ["x"], others) is None
    assert prober.calls == []


@pytest.mark.parametrize(
    "overrides",
    [{"span_low": -1.0}, {"span_low": 6.0, "span_high": 6.0}, {"span_memory": 1.0}, {"span_start": -1}],
)
def test_bad_span_settings_are_config_errors(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="span"):
        replace(HarmCheck(), **overrides)


def test_it_is_opt_in_and_span_low_turns_it_on() -> None:
    learner = make_digits_learner(node_index=0, num_nodes=4, seed=0)
    off = Mixer(NodeConfig(), learner, cast(Any, None), cast(Any, None))
    on = Mixer(NodeConfig(harm_check=HarmCheck(span_low=3.0)), learner, cast(Any, None), cast(Any, None))
    assert off._span is None
    assert isinstance(on._span, SpanGate)


def test_torch_learner_gives_one_gradient_per_probe_sample() -> None:
    torch.manual_seed(0)
    learner = make_digits_learner(node_index=0, num_nodes=4, seed=0)
    state = learner.get_state()
    grads = learner.probe_gradients(state, 16)
    size = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert grads.shape == (16, size)
    # the first row is the gradient of the first sample's loss, as autograd gives it
    x, y = learner._probe_batch()
    learner.model.zero_grad()
    learner.loss_fn(learner.model(x[:1]), y[:1]).backward()
    first = torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()])
    assert torch.allclose(grads[0], first, atol=1e-5)
    assert learner.get_state()["hidden.weight"].equal(state["hidden.weight"])  # model untouched


class Branchy(torch.nn.Module):
    """A model torch.func.vmap cannot run: it branches on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if float(x.sum()) > 0 else self.b(x)


def test_a_model_vmap_cannot_run_gets_its_gradients_one_sample_at_a_time(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4,
                                         generator=torch.Generator())
    learner = TorchLearner(Branchy(), train_loader=loader, test_loader=loader)
    state = learner.get_state()
    with caplog.at_level(logging.INFO, logger="p2pfl.learners.gradients"):
        grads = learner.probe_gradients(state, 6)
        assert learner.probe_gradients(state, 6).equal(grads)
    assert sum("cannot run Branchy" in r.getMessage() for r in caplog.records) == 1  # said once
    px, py = learner._probe_batch()
    for i in range(6):  # each row is autograd's gradient of that sample's loss
        learner.model.zero_grad()
        learner.loss_fn(learner.model(px[i:i + 1]), py[i:i + 1]).backward()
        # the branch not taken has no gradient: zeros
        row = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
                         for p in learner.model.parameters()])
        assert torch.allclose(grads[i], row, atol=1e-6)
    assert {bool(grads[i, :15].any()) for i in range(6)} == {True, False}  # both branches taken
