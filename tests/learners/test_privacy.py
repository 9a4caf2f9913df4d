"""DP-SGD: the accountant agrees with Opacus' reference values, clipping bounds a sample's
influence, the budget is never overspent (nor reset by a restart), and nothing pickles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from p2pfl.config import Limits, PrivacyConfig
from p2pfl.errors import ConfigError, LearnerError
from p2pfl.learners import MomentumSGD, TensorBatches, TorchLearner, make_digits_learner
from p2pfl.learners.privacy import calibrate, epsilon_of
from p2pfl.learners.torch_learner import PRIVATE_WEIGHT
from p2pfl.node.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def private_digits(epochs: int, *, epsilon: float = 8.0, seed: int = 3) -> TorchLearner:
    learner = make_digits_learner(node_index=0, num_nodes=8, seed=0)
    assert isinstance(learner, TorchLearner)
    learner.make_private(PrivacyConfig(epsilon=epsilon, noise_seed=seed), epochs=epochs)
    return learner


def test_accountant_matches_opacus_reference_value() -> None:
    # opacus/tests/accountants_test.py::test_rdp_accountant: sigma 1.5, q 0.04, 90 epochs.
    assert epsilon_of([(1.5, 0.04, 2250)], delta=1e-5) == pytest.approx(7.32911117143, abs=1e-9)


@pytest.mark.parametrize("history", [[(1.5, 0.04, 2250)], [(1.1, 0.01, 1000), (2.0, 0.02, 30)],
                                     [(1.1572, 1 / 6, 60)]])
def test_accountant_agrees_with_opacus_rdp_accountant(history: list[tuple[float, float, int]]) -> None:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    reference = accountant.get_epsilon(delta=1e-5, alphas=[*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256])
    assert epsilon_of(history, delta=1e-5) == pytest.approx(reference, rel=1e-12)


def test_calibrated_noise_matches_opacus_reference_and_spends_at_most_epsilon() -> None:
    # opacus/tests/accountants_test.py::test_get_noise_multiplier_rdp_epochs: 1.416.
    sigma = calibrate(PrivacyConfig(epsilon=8.0, delta=1e-5), sample_rate=0.04, steps=2250)
    assert sigma == pytest.approx(1.416, abs=1e-4)
    assert epsilon_of([(sigma, 0.04, 2250)], delta=1e-5) <= 8.0


def test_training_spends_at_most_the_budget_then_stops() -> None:
    learner = private_digits(epochs=3)
    assert learner.fit(2) == PRIVATE_WEIGHT  # the true sample count would leak membership
    halfway = learner.privacy_spent()
    assert halfway is not None
    assert 0 < halfway.epsilon < 8.0
    assert not halfway.exhausted
    learner.fit(1)
    spent = learner.privacy_spent()
    assert spent is not None
    assert 7.0 < spent.epsilon <= 8.0
    assert spent.exhausted
    before = learner.get_state()
    learner.fit(1)
    assert all(torch.equal(before[k], v) for k, v in learner.get_state().items())
    assert learner.privacy_spent() == spent


def test_clipping_bounds_each_samples_influence_on_a_step() -> None:
    features = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 1000
    labels = torch.tensor([0, 1, 0, 1])
    model = nn.Linear(3, 2)
    with torch.no_grad():  # uniform predictions: every sample's gradient is ~1000 long
        model.weight.zero_()
        model.bias.zero_()
    batches = TensorBatches(features, labels, batch_size=4)  # q = 1: every sample, every step
    learner = TorchLearner(model, train_loader=batches, test_loader=batches,
                           optimizer=MomentumSGD(model.parameters(), lr=1.0, momentum=0.0))
    learner.make_private(PrivacyConfig(epsilon=8.0, max_grad_norm=0.5, noise_seed=0), epochs=1)
    assert learner.privacy is not None
    learner.privacy.noise_multiplier = 0.0  # look at clipping alone
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    learner.fit(1)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # The step is the mean of 4 clipped gradients: at most max_grad_norm long.
    assert 0 < float((after - before).norm()) <= 0.5 + 1e-5


def test_a_batchnorm_layer_is_a_one_line_config_error_naming_it_and_the_fix() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    batches = TensorBatches(torch.randn(16, 4), torch.randint(0, 2, (16,)), batch_size=4)
    learner = TorchLearner(model, train_loader=batches, test_loader=batches)
    with pytest.raises(ConfigError, match=r"layer '1' \(BatchNorm1d\).*GroupNorm") as caught:
        learner.make_private(PrivacyConfig(), epochs=1)
    assert "\n" not in str(caught.value)


def test_a_loader_dp_sgd_cannot_sample_is_a_config_error() -> None:
    model = nn.Linear(4, 2)
    batches = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    learner = TorchLearner(model, train_loader=batches, test_loader=batches)
    with pytest.raises(ConfigError, match="TensorBatches or a DataLoader"):
        learner.make_private(PrivacyConfig(), epochs=1)


def test_a_dataloader_task_trains_privately() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, generator=torch.Generator())
    learner = TorchLearner(nn.Linear(4, 2), train_loader=loader, test_loader=loader)
    learner.make_private(PrivacyConfig(epsilon=4.0, noise_seed=1), epochs=2)
    learner.fit(2)
    spent = learner.privacy_spent()
    assert spent is not None
    assert spent.exhausted
    assert spent.epsilon <= 4.0


def test_an_empty_poisson_batch_is_a_noise_only_step() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    loader = torch.utils.data.DataLoader(data, batch_size=1, generator=torch.Generator())
    learner = TorchLearner(nn.Linear(4, 2), train_loader=loader, test_loader=loader)
    learner.make_private(PrivacyConfig(noise_seed=0), epochs=4)
    assert learner.privacy is not None
    batches = list(learner.privacy.batches.draw(12, learner.privacy.generator(0)))
    assert None in batches  # q = 1/3 over 3 samples: (2/3)^3 of the steps are empty
    learner.fit(4)
    assert learner.privacy.steps_taken == 12


def test_the_spent_budget_survives_a_restart_from_a_checkpoint(tmp_path: Path) -> None:
    first = private_digits(epochs=4)
    first.fit(2)
    spent = first.privacy_spent()
    save_checkpoint(tmp_path, Checkpoint(round=2, learner_state=first.checkpoint_state(), reputation={},
                                         peers=(), history=()))

    restarted = private_digits(epochs=4)  # a new process: the same config, a fresh account
    checkpoint = load_checkpoint(tmp_path, limits=Limits())
    assert checkpoint is not None
    restarted.restore_checkpoint_state(checkpoint.learner_state)
    assert restarted.privacy_spent() == spent
    restarted.fit(5)  # asks for more than is left
    final = restarted.privacy_spent()
    assert final is not None
    assert final.exhausted
    assert final.epsilon <= 8.0
    assert restarted.privacy is not None
    assert restarted.privacy.steps_taken == restarted.privacy.planned_steps


def test_a_private_checkpoint_does_not_load_without_privacy() -> None:
    state = private_digits(epochs=1).checkpoint_state()
    plain = make_digits_learner(node_index=0, num_nodes=8, seed=0)
    with pytest.raises(LearnerError, match=r"\[privacy\]"):
        plain.restore_checkpoint_state(state)


@pytest.mark.parametrize("table", [torch.zeros(2, 2), torch.tensor([[0.0, 0.1, 5.0]]),
                                   torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[1.0, 0.1, 2.5]])])
def test_a_corrupt_account_is_rejected(table: torch.Tensor) -> None:
    learner = private_digits(epochs=1)
    state = {**learner.checkpoint_state(), "privacy.history": table}
    with pytest.raises(LearnerError, match="privacy.history"):
        learner.restore_checkpoint_state(state)


def test_no_dp_path_touches_pickle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    banned = re.compile(r"import pickle|from pickle|pickle\.|torch\.load|torch\.save|allow_pickle")
    for name in ("privacy.py", "torch_learner.py"):
        assert banned.search((ROOT / "p2pfl" / "learners" / name).read_text()) is None, name

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used on the DP path")

    private_digits(epochs=1).fit(1)  # imports done first: torch.func subclasses pickle's classes

    for name in ("dumps", "loads", "dump", "load", "Unpickler"):
        monkeypatch.setattr(f"pickle.{name}", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    learner = private_digits(epochs=2)
    learner.fit(1)
    save_checkpoint(tmp_path, Checkpoint(round=1, learner_state=learner.checkpoint_state(), reputation={},
                                         peers=(), history=()))
    checkpoint = load_checkpoint(tmp_path, limits=Limits())
    assert checkpoint is not None
    private_digits(epochs=2).restore_checkpoint_state(checkpoint.learner_state)
    assert learner.privacy_spent() is not None
