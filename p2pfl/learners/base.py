"""The Learner protocol: what a node needs from local training, and nothing more.

A learner is synchronous and knows nothing of trio or the network; the node runs it in a
worker thread. States are plain ``name -> tensor`` mappings so that the codec can encode
them without pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

State = dict[str, torch.Tensor]
"""Named tensors: a model's parameters and buffers (or a checkpoint's)."""


@dataclass(frozen=True, slots=True)
class Metrics:
    """Evaluation of a model on a local test split."""

    loss: float
    accuracy: float
    samples: int
    # Accuracy on each class's test samples, by class index (NaN: no test sample of that
    # class); None when the learner does not report it. Shows targeted attacks the mean hides.
    per_class: tuple[float, ...] | None = None


@runtime_checkable
class Learner(Protocol):
    """Local training as the node sees it (synchronous; run in a worker thread)."""

    def get_state(self) -> State:
        """Return the model's parameters and buffers as detached copies the caller may keep."""
        ...

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load parameters and buffers; raise LearnerError on wrong keys, shapes or values."""
        ...

    def fit(self, epochs: int) -> int:
        """Train for ``epochs`` epochs; return the samples seen per epoch (the FedAvg weight)."""
        ...

    def evaluate(self) -> Metrics:
        """Evaluate the model on the local test split."""
        ...

    @property
    def num_train_samples(self) -> int:
        """Return the number of local training samples."""
        ...

    def checkpoint_state(self) -> State:
        """Return model and optimizer state as named tensors (no hyperparameters, no pickle)."""
        ...

    def restore_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`checkpoint_state` returned; training then resumes bit-exactly."""
        ...


__all__ = ["Learner", "Metrics", "State"]
