"""Mini-batches of in-memory tensors, and counting what a loader yields."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader

from p2pfl.errors import LearnerError

Batch = tuple[torch.Tensor, torch.Tensor]
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch) over 63 bits


def epoch_seed(seed: int, epoch: int) -> int:
    """Return the data-order seed of ``epoch`` for a learner seeded with ``seed``."""
    return (seed * _SEED_MIX + epoch) % (1 << 63)


class TensorBatches:
    """Iterate over in-memory tensors in (optionally shuffled) mini-batches.

    A few microseconds per batch, where a DataLoader over a TensorDataset spends hundreds
    collating single samples. The shuffle draws from :attr:`generator` only.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if features.shape[0] != labels.shape[0]:
            raise LearnerError(
                f"features have {features.shape[0]} rows but labels have {labels.shape[0]}"
            )
        if batch_size < 1:
            raise LearnerError(f"batch_size must be >= 1, got {batch_size}")
        self.features = features
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator if generator is not None else torch.Generator()

    @property
    def num_samples(self) -> int:
        """Return how many samples one pass yields."""
        n = self.labels.shape[0]
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        """Return the number of batches in one pass."""
        full, rest = divmod(self.labels.shape[0], self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Batch]:
        """Yield ``(features, labels)`` batches; a fresh order each pass when shuffling."""
        n = self.labels.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator)
            features, labels = self.features[order], self.labels[order]
        else:
            features, labels = self.features, self.labels
        for start in range(0, self.num_samples, self.batch_size):
            yield features[start : start + self.batch_size], labels[start : start + self.batch_size]


def count_samples(loader: Iterable[Any]) -> int:
    """Count the samples one pass over ``loader`` yields, without iterating when possible."""
    if isinstance(loader, TensorBatches):
        return loader.num_samples
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, Sized):
        n = len(loader.sampler)
        if loader.drop_last and loader.batch_size:
            n -= n % loader.batch_size
        return n
    return sum(len(batch[1]) for batch in loader)


__all__ = ["Batch", "TensorBatches", "count_samples", "epoch_seed"]
