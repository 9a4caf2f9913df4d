"""The reference check: does a neighbour's model hurt any class of the network's reference set?

Opt-in (``[reference]`` in the node's file, :class:`~p2pfl.node.config.ReferenceConfig`):
the network agrees on a small public labelled sample (:mod:`p2pfl.learners.reference`).
Each round the node mixes every neighbour's model into its own at the share it would
have at full reputation (as the harm check does, :func:`p2pfl.node.harm.mixed`) and scores
the mixes and its own model on the reference set, class by class, one forward pass each.
A neighbour whose mix lowers the accuracy of *any* class by more than ``tolerance`` is
refused: it is not mixed in this round, and its trust is capped in proportion to the
excess (``tolerance`` over: trust at most ``clip_tolerance``, twice over: 0), which the
reputation turns into evidence. A neighbour within tolerance is left to the rest of the
defence: the check only takes away, it never vets.

Why per class: a label flipper's model looks like an honest model trained on other
classes by every measure on our own data (docs/RESULTS.md), but on a reference set that
holds every class its mix moves the classes it flipped. Honest non-IID neighbours forget
classes they lack during local training, too; docs/RESULTS.md has both distributions
and how ``tolerance`` was chosen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from p2pfl.errors import ConfigError
from p2pfl.learners.reference import ClassScores, ReferenceSet, load_reference
from p2pfl.node.config import ReferenceConfig
from p2pfl.node.harm import mixed


@runtime_checkable
class ClassScorer(Protocol):
    """A learner that can score models on a reference set per class (``TorchLearner`` can)."""

    def score_classes(
        self, states: Iterable[Mapping[str, torch.Tensor]], reference: ReferenceSet
    ) -> list[ClassScores]:
        """Return each state's loss and accuracy per class of ``reference``."""
        ...


@dataclass(frozen=True, slots=True)
class ReferenceVerdict:
    """One round's reference check, per neighbour: the worst class's accuracy drop when
    mixed in, and the trust cap that follows (1: no objection)."""

    drop: list[float]
    caps: list[float]

    @property
    def refused(self) -> list[bool]:
        """Whether each neighbour is kept out of this round's mix."""
        return [cap < 1 for cap in self.caps]


def worst_drop(own: ClassScores, mix: ClassScores) -> float:
    """Return the largest accuracy drop of any class from ``own`` to ``mix`` (inf if NaN)."""
    drops = [a - b for a, b in zip(own.accuracy, mix.accuracy, strict=True) if not math.isnan(a)]
    if any(math.isnan(d) for d in drops) or not all(math.isfinite(v) for v in mix.loss if not math.isnan(v)):
        return math.inf
    return max(drops, default=0.0)


def cap_of(drop: float, tolerance: float, floor: float) -> float:
    """Return the trust cap for a worst-class drop: 1 within tolerance, then ``floor``
    falling linearly to 0 at twice the tolerance."""
    if drop <= tolerance:
        return 1.0
    return floor * max(0.0, 1.0 - (drop - tolerance) / tolerance)


class ReferenceGate:
    """The reference check of one node: its reference set, scorer and tolerance."""

    def __init__(self, config: ReferenceConfig, scorer: ClassScorer, own: Mapping[str, torch.Tensor]) -> None:
        """Load and check the reference file; ConfigError if it does not fit the model."""
        if config.path is None:
            raise ConfigError("[reference] path: required for a reference check")
        self.config = config
        self.scorer = scorer
        self.reference = load_reference(config.path, config.sha256)
        try:
            scorer.score_classes([own], self.reference)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise ConfigError(f"[reference] path: {config.path} does not fit the model: {exc}") from None

    def judge(
        self,
        own: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        self_weight: float,
        floor: float,
    ) -> ReferenceVerdict:
        """Score own model and each neighbour's mix at its full-reputation share; see the module doc.

        ``floor`` is the trust a neighbour just over tolerance is capped at (the
        reputation's ``clip_tolerance``).
        """
        total = self_weight + sum(weights)
        least = 1 / (len(states) + 1)
        shares = [max(w / total, least) if total > 0 else least for w in weights]
        mixes = (mixed(own, state, share) for state, share in zip(states, shares, strict=True))
        scores = self.scorer.score_classes(itertools.chain([own], mixes), self.reference)
        drops = [worst_drop(scores[0], mix) for mix in scores[1:]]
        return ReferenceVerdict(drops, [cap_of(d, self.config.tolerance, floor) for d in drops])


__all__ = ["ClassScorer", "ReferenceGate", "ReferenceVerdict", "cap_of", "worst_drop"]
