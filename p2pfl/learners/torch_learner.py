"""TorchLearner: the Learner protocol for any ``nn.Module``, optimizer and batch iterables.

Determinism: the data order of epoch ``e`` depends only on ``(seed, e)``. Before every
epoch the learner reseeds the loader's ``generator`` attribute (``TensorBatches`` and a
``DataLoader(generator=torch.Generator())`` both have one), and the epoch counter is part
of the checkpoint, so a restored learner sees the same batches as the original would.
Nothing here touches torch's global RNG; a model with dropout would, so use models
without it (the digits MLP has none) when bit-exact runs matter.

Threads: the learner never calls ``torch.set_num_threads`` (a process-wide setting that
would fight other nodes in the same process). The CLI sets one intra-op thread per
process; embedders running many nodes should do the same.

Optimizer: by default :class:`~p2pfl.learners.optim.MomentumSGD`, which makes the same
updates as ``torch.optim.SGD(params, lr, momentum)`` without torch's import cost. Pass a
``torch.optim`` optimizer to use one.

Device: the model and every batch live on ``device`` (default: where the model's
parameters are); states handed out (:meth:`get_state`, :meth:`checkpoint_state`) are
always CPU copies, so what goes on the wire and to disk does not depend on the device.

Privacy: :meth:`TorchLearner.make_private` switches training to DP-SGD
(:mod:`~p2pfl.learners.privacy`) within a budget; the accountant's history is part of
the checkpoint.

Calls on one learner must not overlap: the node serialises them in its worker thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from p2pfl.core.state import mismatch, nonfinite, template_of
from p2pfl.errors import LearnerError
from p2pfl.learners.base import Metrics, State
from p2pfl.learners.batches import Batch, count_samples, epoch_seed
from p2pfl.learners.gradients import per_sample_gradients
from p2pfl.learners.optim import MomentumSGD, OptimizerLike
from p2pfl.learners.reference import ClassScores, ReferenceSet, class_scores

if TYPE_CHECKING:
    from p2pfl.config import PrivacyConfig
    from p2pfl.learners.privacy import PrivacySpent, PrivateTraining

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_MODEL = "model."
_OPTIM = "optim."
_OPTIM_NUMBER = "optim_number."  # Python numbers in optimizer state, stored as 0-d tensors
_EPOCH = "learner.epoch"
_PRIVACY = "privacy.history"  # p2pfl.learners.privacy.HISTORY (imported only when private)
# What a private learner announces as its sample count (the FedAvg weight): the true
# count would tell peers whether one more sample is in the data, which DP must hide.
PRIVATE_WEIGHT = 1


def _add_counts(total: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Add two per-class count vectors of possibly different lengths."""
    size = max(len(total), len(counts))
    out = torch.zeros(size, dtype=torch.int64)
    out[: len(total)] += total
    out[: len(counts)] += counts
    return out


class TorchLearner:
    """Train and evaluate a torch model on local data (implements :class:`Learner`).

    ``train_loader`` and ``test_loader`` may be any re-iterable of ``(x, y)`` batches: a
    :class:`TensorBatches` (fastest for small in-memory data) or a ``DataLoader``. The
    optimizer defaults to SGD with ``lr`` and ``momentum``; the loss to cross-entropy
    (mean reduction is assumed when weighting batch losses).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: LossFn | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        seed: int = 0,
        max_threads: int = 1,
        probe_samples: int = 256,
        device: str | torch.device | None = None,
    ) -> None:
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.optimizer: OptimizerLike = optimizer or MomentumSGD(
            model.parameters(), lr=lr, momentum=momentum
        )
        self.loss_fn: LossFn = loss_fn or nn.CrossEntropyLoss()
        self.seed = seed
        self.max_threads = max_threads
        self.epoch = 0  # epochs trained so far: drives the data order, kept in checkpoints
        self.last_train_loss = float("nan")
        self._num_train_samples: int | None = None
        self._param_names = [name for name, _ in model.named_parameters()]
        if probe_samples < 1:
            raise LearnerError(f"probe_samples must be >= 1, got {probe_samples}")
        self.probe_samples = probe_samples
        self._probe: Batch | None = None
        self._vmap = True  # per-sample gradients vectorised; False once the model refused vmap
        self.privacy: PrivateTraining | None = None  # DP-SGD, after make_private()
        self._warn_about_setup()

    def _warn_about_setup(self) -> None:
        if torch.get_num_threads() > self.max_threads:
            logger.info(
                "torch uses %d intra-op threads, more than max_threads=%d; call "
                "torch.set_num_threads(%d) once per process (the CLI does)",
                torch.get_num_threads(),
                self.max_threads,
                self.max_threads,
            )
        if getattr(self.train_loader, "generator", None) is None:
            logger.warning(
                "train loader has no torch.Generator: data order follows the global RNG and "
                "is not reproducible; pass DataLoader(..., generator=torch.Generator())"
            )

    @property
    def num_train_samples(self) -> int:
        """Return the number of samples in one pass over the training data."""
        if self._num_train_samples is None:
            self._num_train_samples = count_samples(self.train_loader)
        return self._num_train_samples

    # -- state -------------------------------------------------------------------------

    def get_state(self) -> State:
        """Return detached copies of the model's parameters and buffers."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.model.state_dict().items()}

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model; raise LearnerError if it does not fit exactly.

        Keys and shapes must match; floating tensors may differ in float dtype (they are
        cast) but must be finite, so a poisoned aggregate cannot silently wreck the model.
        """
        current = self.model.state_dict()
        check_state_fits(current, state)
        with torch.no_grad():
            for name, target in current.items():
                target.copy_(state[name])

    # -- training ----------------------------------------------------------------------

    def make_private(self, config: PrivacyConfig, *, epochs: int) -> None:
        """Train with DP-SGD from now on, ``epochs`` epochs at most within ``config``'s budget.

        Raises:
            ConfigError: a layer DP-SGD cannot train (named, with the fix), or a train
                loader it cannot sample from.
        """
        from p2pfl.learners.privacy import PrivateTraining, dry_run

        self.privacy = PrivateTraining(config, self.model, self.train_loader, epochs=epochs)
        dry_run(self.privacy, self.loss_fn, self._on_device)
        self._probe = None  # probes come from the test split from now on

    def privacy_spent(self) -> PrivacySpent | None:
        """Return the privacy account; None when training is not private."""
        return None if self.privacy is None else self.privacy.spent()

    def fit(self, epochs: int) -> int:
        """Train for ``epochs`` epochs; return the number of samples seen per epoch.

        A private learner returns :data:`PRIVATE_WEIGHT`, and once its budget is spent
        it trains no more (the model stays as aggregated).
        """
        if epochs < 1:
            raise LearnerError(f"epochs must be >= 1, got {epochs}")
        if self.privacy is not None:
            return self._fit_private(self.privacy, epochs)
        seen = 0
        self.model.train()
        for _ in range(epochs):
            self._reseed_loader()
            seen, loss_sum = self._train_one_epoch()
            self.epoch += 1
            if seen == 0:
                raise LearnerError("the training data yielded no samples")
            self.last_train_loss = loss_sum / seen
            if not math.isfinite(self.last_train_loss):
                raise LearnerError(f"training diverged: mean loss {self.last_train_loss}")
        self._num_train_samples = seen
        return seen

    def _fit_private(self, privacy: PrivateTraining, epochs: int) -> int:
        self.model.train()
        for _ in range(epochs):
            if privacy.remaining_steps == 0:
                logger.info("privacy budget spent (%d steps): not training any more", privacy.steps_taken)
                break
            seen, loss_sum = privacy.train_epoch(self.loss_fn, self.optimizer, self.epoch, self._on_device)
            self.epoch += 1
            self.last_train_loss = loss_sum / max(seen, 1)
            if not math.isfinite(self.last_train_loss):
                raise LearnerError(f"training diverged: mean loss {self.last_train_loss}")
        return PRIVATE_WEIGHT

    def _reseed_loader(self) -> None:
        generator = getattr(self.train_loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def _train_one_epoch(self) -> tuple[int, float]:
        seen = 0
        loss_sum = torch.zeros((), device=self.device)
        for batch in self.train_loader:
            x, y = self._on_device(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            seen += len(y)
            loss_sum += loss.detach() * len(y)
        return seen, float(loss_sum)

    def _on_device(self, batch: Any) -> Batch:
        x, y = batch
        if self.device.type == "cpu":
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def evaluate(self) -> Metrics:
        """Return loss, accuracy and per-class accuracy on the local test split."""
        samples, correct = 0, 0
        loss_sum = 0.0
        seen = hits = torch.zeros(0, dtype=torch.int64)  # per class
        self.model.eval()
        try:
            with torch.inference_mode():
                for batch in self.test_loader:
                    x, y = self._on_device(batch)
                    logits = self.model(x)  # (batch, classes)
                    loss_sum += float(self.loss_fn(logits, y)) * len(y)
                    right = logits.argmax(dim=1) == y
                    correct += int(right.sum())
                    samples += len(y)
                    seen = _add_counts(seen, torch.bincount(y, minlength=logits.shape[1]).cpu())
                    hits = _add_counts(hits, torch.bincount(y[right], minlength=logits.shape[1]).cpu())
        finally:
            self.model.train()
        if samples == 0:
            raise LearnerError("the test data yielded no samples")
        per_class = tuple(int(h) / int(n) if n else math.nan for h, n in zip(hits, seen, strict=True))
        return Metrics(loss=loss_sum / samples, accuracy=correct / samples, samples=samples,
                       per_class=per_class)

    def probe_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
        """Return the loss of each state on a fixed sample of the training data.

        The sample is the first ``probe_samples`` training samples, drawn once (test
        samples when private: what decides whom we trust must not read the protected
        training data outside DP-SGD). The model
        is not modified: ``torch.func.functional_call`` runs it with each state, which
        must have the model's keys and shapes (the node checks them on receipt).
        """
        return [float(self.loss_fn(logits, y)) for logits, y in self._probe_logits(states)]

    def probe_class_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[list[float]]:
        """Return, per state, the loss of each class present in the probe sample (by class).

        Same sample and same guarantees as :meth:`probe_losses`; the harm check weighs
        classes equally with it, so that a neighbour that knows our rare classes better is
        not judged by our common ones alone.
        """
        labels = self._probe_batch()[1]
        masks = [labels == c for c in torch.unique(labels)]
        return [
            [float(self.loss_fn(logits[m], y[m])) for m in masks]
            for logits, y in self._probe_logits(states)
        ]

    def probe_gradients(self, state: Mapping[str, torch.Tensor], samples: int) -> torch.Tensor:
        """Return the loss gradients of the first ``samples`` probe samples at ``state``.

        One row per sample (fewer when the probe sample is smaller), the floating tensors
        of ``state`` flattened in its key order; the model is not modified (the span
        check, :mod:`p2pfl.node.span`; how: :func:`p2pfl.learners.gradients.per_sample_gradients`).
        A model that ``vmap`` refused once gets one backward pass per sample from then on.
        """
        x, y = self._probe_batch()
        on_device = {k: v.to(self.device) for k, v in state.items()}
        grads, self._vmap = per_sample_gradients(self.model, self.loss_fn, on_device, x[:samples], y[:samples],
                                                 vectorised=self._vmap)
        return grads

    def _probe_logits(
        self, states: Iterable[Mapping[str, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (logits, labels) of the probe sample under each state, the model untouched
        (``functional_call``) and in eval mode meanwhile; one state at a time."""
        x, y = self._probe_batch()
        self.model.eval()
        try:
            with torch.inference_mode():
                for state in states:
                    on_device = {k: v.to(self.device) for k, v in state.items()}
                    yield torch.func.functional_call(self.model, on_device, (x,)), y
        finally:
            self.model.train()

    def score_classes(
        self, states: Iterable[Mapping[str, torch.Tensor]], reference: ReferenceSet
    ) -> list[ClassScores]:
        """Return each state's loss and accuracy per class of ``reference`` (one pass each).

        The model is not modified (see :func:`~p2pfl.learners.reference.class_scores`).
        """
        return class_scores(self.model, states, reference)

    def _probe_batch(self) -> Batch:
        if self._probe is None:
            xs: list[torch.Tensor] = []
            ys: list[torch.Tensor] = []
            taken = 0
            # fit() reseeds the loader before every epoch: drawing here does not change
            # the data order of training.
            for x, y in self.test_loader if self.privacy is not None else self.train_loader:
                xs.append(x[: self.probe_samples - taken])
                ys.append(y[: self.probe_samples - taken])
                taken += len(ys[-1])
                if taken >= self.probe_samples:
                    break
            if taken == 0:
                raise LearnerError("the training data yielded no samples")
            self._probe = self._on_device((torch.cat(xs), torch.cat(ys)))
        return self._probe

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_state(self) -> State:
        """Return model, optimizer and data-order state as named tensors.

        Names: ``model.<key>``; ``optim.<param_index>.<buffer>`` for optimizer tensors;
        ``optim_number.<param_index>.<key>`` for Python numbers (e.g. step counters) as
        0-d tensors; ``learner.epoch``; ``privacy.history``, the accountant's history as
        a ``(rows, 3)`` table, when private. Hyperparameters are not stored: they come
        from the learner's construction.
        """
        out: State = {_MODEL + k: v for k, v in self.get_state().items()}
        for index, entries in self.optimizer.state_dict()["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    out[f"{_OPTIM}{index}.{key}"] = value.detach().to("cpu", copy=True)
                elif isinstance(value, int | float):
                    out[f"{_OPTIM_NUMBER}{index}.{key}"] = torch.tensor(value)
                elif value is not None:
                    raise LearnerError(f"cannot checkpoint optimizer state {key}={value!r}")
        out[_EPOCH] = torch.tensor(self.epoch, dtype=torch.int64)
        if self.privacy is not None:
            out[_PRIVACY] = self.privacy.history_tensor()
        return out

    def restore_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`checkpoint_state` returned; raise LearnerError if it does not fit."""
        model_state = {k[len(_MODEL) :]: v for k, v in state.items() if k.startswith(_MODEL)}
        optim_state = self._optimizer_entries(state)
        if _EPOCH not in state or state[_EPOCH].numel() != 1:
            raise LearnerError(f"checkpoint lacks a scalar {_EPOCH!r}")
        known = (_MODEL, _OPTIM, _OPTIM_NUMBER)
        unknown = sorted(k for k in state if k not in (_EPOCH, _PRIVACY) and not k.startswith(known))
        if unknown:
            raise LearnerError(f"checkpoint has unknown entries: {unknown}")
        if _PRIVACY in state:
            if self.privacy is None:
                raise LearnerError("the checkpoint was trained with [privacy]: turn it on again "
                                   "(its budget continues) or move the checkpoint away")
            self.privacy.restore_history(state[_PRIVACY])
        self.set_state(model_state)
        current = self.optimizer.state_dict()
        try:
            self.optimizer.load_state_dict(
                {"state": optim_state, "param_groups": current["param_groups"]}
            )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LearnerError(f"optimizer state does not fit: {exc}") from exc
        self.epoch = int(state[_EPOCH])

    def _optimizer_entries(self, state: Mapping[str, torch.Tensor]) -> dict[int, dict[str, Any]]:
        entries: dict[int, dict[str, Any]] = {}
        for name, value in state.items():
            for prefix, as_number in ((_OPTIM_NUMBER, True), (_OPTIM, False)):
                if not name.startswith(prefix):
                    continue
                index, _, key = name[len(prefix) :].partition(".")
                if not index.isdigit() or not key or int(index) >= len(self._param_names):
                    raise LearnerError(f"bad optimizer entry name {name!r}")
                entries.setdefault(int(index), {})[key] = (
                    value.item() if as_number else value.detach().clone()
                )
                break
        return entries


def check_state_fits(current: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Raise LearnerError unless ``state`` has ``current``'s keys and shapes, finite floats."""
    problem = mismatch(template_of(current), state, cast_floats=True)
    if problem is None and (name := nonfinite(state)) is not None:
        problem = f"{name!r} holds NaN or infinite values"
    if problem is not None:
        raise LearnerError(f"state does not fit the model: {problem}")


__all__ = ["TorchLearner", "check_state_fits", "epoch_seed"]
