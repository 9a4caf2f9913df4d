"""The reference check: does a neighbour's model hurt any class of the network's reference set?

Opt-in (``[reference]`` in the node's file, :class:`~p2pfl.node.config.ReferenceConfig`):
the network agrees on a small public labelled sample (:mod:`p2pfl.learners.reference`).
Each round the node forms the mix of its own model and every neighbour's at the share it
would have at full reputation (a weighted mean centred on ours, as the harm check's
:func:`p2pfl.node.harm.mixed`), and the same mix without each neighbour in turn, and
scores them on the reference set class by class (one forward pass each). A neighbour
without which the class-balanced loss (mean over classes of the per-class loss: every
class counts the same, so a class one neighbour flips counts in full) is lower by more
than ``tolerance`` is refused: it is not mixed in this round. With ``evidence`` (off by
default since session 21) its trust is also capped in proportion to the excess (just
over: trust at most ``clip_tolerance``; twice the tolerance: 0), which the reputation
turns into evidence; that flagged and dropped honest neighbours that train on few
classes, refused round after round. A neighbour within tolerance
is left to the rest of the defence: the check only takes away, it never vets. The worst
neighbour is taken out first and the others judged again without it: a sign-flipped
model in the mix makes every other neighbour's gain noise on a huge loss (it refused
92% of honest peers under sign_flip before).

Why leave-one-out on the mix, not the neighbour's model against ours: one local epoch
on skewed data makes our own model forget the classes we lack, so every neighbour that
knows them looks better than us and a per-class comparison with our model mostly
measures our own forgetting (mixed in at its share, honest and flipped neighbours moved
the worst class alike: docs/RESULTS.md). Leaving one out of the mix asks the question
that matters: is the mix better on every class without it?
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
from p2pfl.node.harm import full_shares, mixed


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
    """One round's reference check, per neighbour: how much leaving it out of the mix
    lowers the class-balanced reference loss, whether it is kept out of this round's mix,
    and the trust cap handed to the reputation (1: no objection; always 1 without
    ``ReferenceConfig.evidence``)."""

    gain: list[float]
    caps: list[float]
    refused: list[bool]


def balanced_loss(scores: ClassScores) -> float:
    """Return the mean over classes of the per-class loss (every class counts the same;
    a non-finite loss is infinitely bad)."""
    losses = [loss for loss in scores.loss if not math.isnan(loss)]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        return math.inf
    return sum(losses) / len(losses)


def gain_of(mix: ClassScores, without: ClassScores) -> float:
    """Return how much lower the balanced loss is ``without`` the neighbour than in the ``mix``."""
    full, rest = balanced_loss(mix), balanced_loss(without)
    if math.isinf(full):
        return math.inf if math.isfinite(rest) else 0.0
    return full - rest


def cap_of(gain: float, tolerance: float, floor: float) -> float:
    """Return the trust cap for a gain: 1 within tolerance, then ``floor`` falling
    linearly to 0 at twice the tolerance."""
    if gain <= tolerance:
        return 1.0
    return floor * max(0.0, 1.0 - (gain - tolerance) / tolerance)


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
        """Score the mix and the mix without each neighbour (full-reputation shares); see the module doc.

        ``floor`` is the trust a neighbour just over tolerance is capped at (the
        reputation's ``clip_tolerance``).
        """
        shares = full_shares(weights, self_weight)
        # The mix as a weighted mean centred on our model, then the same without each one;
        # the worst is taken out first and the rest judged again without it (one wrecked
        # model makes every other one's gain noise on a huge loss).
        deltas = [_minus(mixed(own, state, share), own) for state, share in zip(states, shares, strict=True)]
        gains = [0.0] * len(states)
        kept = list(range(len(states)))
        while kept:
            mix = _plus(own, [deltas[j] for j in kept])
            without = (_minus(mix, deltas[j]) for j in kept)
            scores = self.scorer.score_classes(itertools.chain([mix], without), self.reference)
            for j, rest in zip(kept, scores[1:], strict=True):
                gains[j] = gain_of(scores[0], rest)
            worst = max(kept, key=lambda j: gains[j])
            if gains[worst] <= self.config.tolerance:
                break
            kept.remove(worst)
        refused = [g > self.config.tolerance for g in gains]
        # Without evidence a refused neighbour is kept out of this round's mix, no more.
        caps = [cap_of(g, self.config.tolerance, floor) if self.config.evidence else 1.0 for g in gains]
        return ReferenceVerdict(gains, caps, refused)


def _minus(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] if a[k].is_floating_point() else a[k] for k in a}


def _plus(base: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: base[k] + sum(d[k] for d in deltas) if base[k].is_floating_point() else base[k] for k in base}


__all__ = ["ClassScorer", "ReferenceGate", "ReferenceVerdict", "balanced_loss", "cap_of", "gain_of"]
