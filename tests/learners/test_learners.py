"""TorchLearner: state copies and checks, training, evaluation, checkpoints, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from p2pfl.errors import LearnerError
from p2pfl.learners.base import Learner, Metrics
from p2pfl.learners.batches import TensorBatches
from p2pfl.learners.datasets import make_digits_learner
from p2pfl.learners.models import DigitsMLP, digits_model
from p2pfl.learners.optim import MomentumSGD
from p2pfl.learners.torch_learner import TorchLearner


def blobs(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated Gaussian blobs in 4 dimensions."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, 4, generator=g) * 0.3 + (labels.float() * 2 - 1).unsqueeze(1)
    return features, labels


def tiny_model() -> nn.Module:
    """A model with buffers (BatchNorm), initialised the same way every time."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model


def tiny_learner(seed: int = 0, **kwargs) -> TorchLearner:
    x, y = blobs()
    return TorchLearner(
        tiny_model(),
        train_loader=TensorBatches(x, y, batch_size=16),
        test_loader=TensorBatches(x, y, batch_size=len(y), shuffle=False),
        lr=0.1,
        seed=seed,
        **kwargs,
    )


def digits_learner() -> TorchLearner:
    return make_digits_learner(node_index=3, num_nodes=8, seed=7)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_torch_learner_is_a_learner() -> None:
    assert isinstance(tiny_learner(), Learner)


def test_get_state_includes_buffers_and_returns_copies() -> None:
    learner = tiny_learner()
    state = learner.get_state()
    assert "1.running_mean" in state
    assert "1.num_batches_tracked" in state
    before = {k: v.clone() for k, v in state.items()}
    for tensor in state.values():
        tensor.add_(1)
    assert_same_state(learner.get_state(), before)


def test_set_state_loads_values_it_does_not_alias() -> None:
    learner = tiny_learner()
    target = {k: v + 1 if v.is_floating_point() else v for k, v in learner.get_state().items()}
    learner.set_state(target)
    assert_same_state(learner.get_state(), target)
    target["0.weight"].zero_()
    assert not torch.equal(learner.get_state()["0.weight"], target["0.weight"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.pop("0.bias"), "missing"),
        (lambda s: s.update(extra=torch.zeros(1)), "extra"),
        (lambda s: s.update({"0.weight": torch.zeros(8, 5)}), "shape"),
        (lambda s: s.update({"0.bias": torch.full((8,), float("nan"))}), "NaN"),
        (lambda s: s.update({"0.bias": torch.zeros(8, dtype=torch.int64)}), "dtype"),
    ],
)
def test_set_state_rejects_states_that_do_not_fit(mutate, match: str) -> None:
    learner = tiny_learner()
    state = learner.get_state()
    mutate(state)
    before = learner.get_state()
    with pytest.raises(LearnerError, match=match):
        learner.set_state(state)
    assert_same_state(learner.get_state(), before)


def test_fit_returns_samples_and_lowers_the_loss() -> None:
    learner = tiny_learner()
    before = learner.evaluate()
    assert learner.fit(3) == 64 == learner.num_train_samples
    after = learner.evaluate()
    assert after.loss < before.loss * 0.5
    assert after.accuracy == 1.0


def test_fit_rejects_zero_epochs() -> None:
    with pytest.raises(LearnerError, match="epochs"):
        tiny_learner().fit(0)


def test_fit_reports_divergence() -> None:
    learner = tiny_learner()
    learner.optimizer = MomentumSGD(learner.model.parameters(), lr=float("inf"))
    with pytest.raises(LearnerError, match="diverged"):
        learner.fit(2)


def test_evaluate_matches_a_direct_computation() -> None:
    learner = digits_learner()
    metrics = learner.evaluate()
    x, y = learner.test_loader.features, learner.test_loader.labels  # type: ignore[attr-defined]
    with torch.no_grad():
        logits = learner.model(x)
    assert metrics.samples == 450
    assert metrics.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert metrics.loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert learner.model.training  # evaluation leaves the model in training mode
    right = logits.argmax(1) == y
    expected = [float(right[y == c].float().mean()) for c in range(10)]
    assert metrics.per_class == pytest.approx(expected)


def test_training_is_deterministic_for_a_seed() -> None:
    a, b, other = tiny_learner(seed=1), tiny_learner(seed=1), tiny_learner(seed=2)
    for learner in (a, b, other):
        learner.fit(2)
    assert_same_state(a.get_state(), b.get_state())
    assert not torch.equal(a.get_state()["0.weight"], other.get_state()["0.weight"])


def test_training_leaves_the_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    learner = make_digits_learner(node_index=0, num_nodes=8)
    learner.fit(1)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_dataloader_with_generator_is_deterministic() -> None:
    x, y = blobs()

    def build() -> TorchLearner:
        loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator())
        return TorchLearner(nn.Linear(4, 2), train_loader=loader, test_loader=loader, seed=3)

    a, b = build(), build()
    b.model.load_state_dict(a.model.state_dict())
    assert a.num_train_samples == 64
    assert a.fit(2) == b.fit(2) == 64
    assert_same_state(a.get_state(), b.get_state())


def test_momentum_sgd_matches_torch_sgd() -> None:
    ours, theirs = digits_model(0), digits_model(0)
    opt_ours = MomentumSGD(ours.parameters(), lr=0.2, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.2, momentum=0.9)
    x, y = torch.rand(16, 64, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert_same_state(ours.state_dict(), theirs.state_dict())


def test_checkpoint_is_named_tensors() -> None:
    learner = digits_learner()
    learner.fit(1)
    state = learner.checkpoint_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "model.hidden.weight" in state
    assert "optim.0.momentum_buffer" in state
    assert int(state["learner.epoch"]) == 1


def test_checkpoint_resumes_bit_exactly() -> None:
    original = digits_learner()
    original.fit(1)
    checkpoint = original.checkpoint_state()
    restored, model_only = digits_learner(), digits_learner()
    restored.restore_checkpoint_state(checkpoint)
    model_only.set_state(original.get_state())  # no momentum, epoch 0: must differ
    for learner in (original, restored, model_only):
        learner.fit(1)
    assert_same_state(original.get_state(), restored.get_state())
    assert not torch.equal(original.get_state()["hidden.weight"], model_only.get_state()["hidden.weight"])


def test_checkpoint_round_trip_with_a_torch_optimizer() -> None:
    def build() -> TorchLearner:
        model = DigitsMLP(8, generator=torch.Generator().manual_seed(0))
        learner = make_digits_learner(node_index=0, num_nodes=8)
        return TorchLearner(
            model,
            train_loader=learner.train_loader,
            test_loader=learner.test_loader,
            optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        )

    original = build()
    original.fit(1)
    checkpoint = original.checkpoint_state()
    assert "optim.0.exp_avg" in checkpoint
    restored = build()
    restored.restore_checkpoint_state(checkpoint)
    original.fit(1)
    restored.fit(1)
    assert_same_state(original.get_state(), restored.get_state())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.update({"bogus": torch.zeros(1)}), "unknown"),
        (lambda s: s.update({"optim.99.momentum_buffer": torch.zeros(1)}), "optimizer"),
        (lambda s: s.update({"optim.0.momentum_buffer": torch.zeros(3)}), "optimizer"),
        (lambda s: s.pop("learner.epoch"), "epoch"),
        (lambda s: s.pop("model.out.bias"), "missing"),
    ],
)
def test_restore_rejects_bad_checkpoints(mutate, match: str) -> None:
    learner = digits_learner()
    learner.fit(1)
    checkpoint = learner.checkpoint_state()
    mutate(checkpoint)
    with pytest.raises(LearnerError, match=match):
        digits_learner().restore_checkpoint_state(checkpoint)


def test_digits_model_init_depends_only_on_the_seed() -> None:
    a, b, c = digits_model(5).state_dict(), digits_model(5).state_dict(), digits_model(6).state_dict()
    assert_same_state(a, b)
    assert not torch.equal(a["hidden.weight"], c["hidden.weight"])


def test_metrics_are_frozen() -> None:
    metrics = Metrics(loss=0.1, accuracy=0.9, samples=3)
    with pytest.raises(AttributeError):
        metrics.loss = 0.2  # type: ignore[misc]


def test_probe_losses_score_states_without_touching_the_model() -> None:
    learner = tiny_learner(probe_samples=24)
    learner.fit(1)
    before = learner.get_state()
    trained = learner.get_state()
    learner.fit(5)
    better = learner.get_state()
    learner.set_state(before)
    flipped = {k: -v if k.endswith("weight") else v for k, v in better.items()}
    losses = learner.probe_losses([trained, better, flipped])
    assert_same_state(learner.get_state(), before)
    assert losses[1] < losses[0] < losses[2]
    assert learner.probe_losses([trained]) == losses[:1]  # the same fixed sample each time
    # The probe sample does not change the data order of training.
    other = tiny_learner(probe_samples=24)
    other.fit(1)
    other.probe_losses([other.get_state()])
    other.fit(5)
    assert_same_state(other.get_state(), better)
    with pytest.raises(LearnerError, match="probe_samples"):
        tiny_learner(probe_samples=0)
