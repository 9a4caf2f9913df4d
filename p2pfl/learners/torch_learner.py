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

Calls on one learner must not overlap: the node serialises them in its worker thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from p2pfl.core.state import mismatch, nonfinite, template_of
from p2pfl.errors import LearnerError
from p2pfl.learners.base import Metrics, State
from p2pfl.learners.batches import Batch, count_samples
from p2pfl.learners.optim import MomentumSGD, OptimizerLike
from p2pfl.learners.reference import ClassScores, ReferenceSet, class_scores

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_MODEL = "model."
_OPTIM = "optim."
_OPTIM_NUMBER = "optim_number."  # Python numbers in optimizer state, stored as 0-d tensors
_EPOCH = "learner.epoch"
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch) over 63 bits


def epoch_seed(seed: int, epoch: int) -> int:
    """Return the data-order seed of ``epoch`` for a learner seeded with ``seed``."""
    return (seed * _SEED_MIX + epoch) % (1 << 63)


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
    ) -> None:
        self.model = model
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
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

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

    def fit(self, epochs: int) -> int:
        """Train for ``epochs`` epochs; return the number of samples seen per epoch."""
        if epochs < 1:
            raise LearnerError(f"epochs must be >= 1, got {epochs}")
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

    def _reseed_loader(self) -> None:
        generator = getattr(self.train_loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def _train_one_epoch(self) -> tuple[int, float]:
        seen = 0
        loss_sum = torch.zeros(())
        for x, y in self.train_loader:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            seen += len(y)
            loss_sum += loss.detach() * len(y)
        return seen, float(loss_sum)

    def evaluate(self) -> Metrics:
        """Return loss, accuracy and per-class accuracy on the local test split."""
        samples, correct = 0, 0
        loss_sum = 0.0
        seen = hits = torch.zeros(0, dtype=torch.int64)  # per class
        self.model.eval()
        try:
            with torch.inference_mode():
                for x, y in self.test_loader:
                    logits = self.model(x)  # (batch, classes)
                    loss_sum += float(self.loss_fn(logits, y)) * len(y)
                    right = logits.argmax(dim=1) == y
                    correct += int(right.sum())
                    samples += len(y)
                    seen = _add_counts(seen, torch.bincount(y, minlength=logits.shape[1]))
                    hits = _add_counts(hits, torch.bincount(y[right], minlength=logits.shape[1]))
        finally:
            self.model.train()
        if samples == 0:
            raise LearnerError("the test data yielded no samples")
        per_class = tuple(int(h) / int(n) if n else math.nan for h, n in zip(hits, seen, strict=True))
        return Metrics(loss=loss_sum / samples, accuracy=correct / samples, samples=samples,
                       per_class=per_class)

    def probe_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
        """Return the loss of each state on a fixed sample of the training data.

        The sample is the first ``probe_samples`` training samples, drawn once. The model
        is not modified: ``torch.func.functional_call`` runs it with each state, which
        must have the model's keys and shapes (the node checks them on receipt).
        """
        x, y = self._probe_batch()
        losses = []
        self.model.eval()
        try:
            with torch.inference_mode():
                for state in states:
                    logits = torch.func.functional_call(self.model, dict(state), (x,))
                    losses.append(float(self.loss_fn(logits, y)))
        finally:
            self.model.train()
        return losses

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
            for x, y in self.train_loader:
                xs.append(x[: self.probe_samples - taken])
                ys.append(y[: self.probe_samples - taken])
                taken += len(ys[-1])
                if taken >= self.probe_samples:
                    break
            if taken == 0:
                raise LearnerError("the training data yielded no samples")
            self._probe = (torch.cat(xs), torch.cat(ys))
        return self._probe

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_state(self) -> State:
        """Return model, optimizer and data-order state as named tensors.

        Names: ``model.<key>``; ``optim.<param_index>.<buffer>`` for optimizer tensors;
        ``optim_number.<param_index>.<key>`` for Python numbers (e.g. step counters) as
        0-d tensors; ``learner.epoch``. Hyperparameters are not stored: they come from
        the learner's construction.
        """
        out: State = {_MODEL + k: v for k, v in self.get_state().items()}
        for index, entries in self.optimizer.state_dict()["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    out[f"{_OPTIM}{index}.{key}"] = value.detach().clone()
                elif isinstance(value, int | float):
                    out[f"{_OPTIM_NUMBER}{index}.{key}"] = torch.tensor(value)
                elif value is not None:
                    raise LearnerError(f"cannot checkpoint optimizer state {key}={value!r}")
        out[_EPOCH] = torch.tensor(self.epoch, dtype=torch.int64)
        return out

    def restore_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`checkpoint_state` returned; raise LearnerError if it does not fit."""
        model_state = {k[len(_MODEL) :]: v for k, v in state.items() if k.startswith(_MODEL)}
        optim_state = self._optimizer_entries(state)
        if _EPOCH not in state or state[_EPOCH].numel() != 1:
            raise LearnerError(f"checkpoint lacks a scalar {_EPOCH!r}")
        known = (_MODEL, _OPTIM, _OPTIM_NUMBER)
        unknown = sorted(k for k in state if k != _EPOCH and not k.startswith(known))
        if unknown:
            raise LearnerError(f"checkpoint has unknown entries: {unknown}")
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
