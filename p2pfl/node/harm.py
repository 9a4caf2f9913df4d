"""Harm check: would mixing a neighbour's model in at its weight hurt us on our own data?

Distance-based rules cannot tell an honest neighbour that learned different things (the
one peer across a bridge between two communities holding different classes) from an
attacker: both are far away, and clipping cuts the first as surely as the second. The
node can ask a question a distance cannot answer: mixed in at the weight it would get,
does the neighbour's model raise the loss on a fixed sample of our own training data?
This is the suspicion test of Zeno (Xie, Koyejo, Gupta, "Zeno: Distributed Stochastic
Gradient Descent with Suspicion-based Fault-tolerance", ICML 2019), which scores a
candidate update by the loss decrease it brings on a validation batch, applied to one
model-mixing step.

Measured on digits (16 nodes, Dirichlet(0.5), 30 rounds; docs/RESULTS.md): honest
neighbours raise the probe loss by at most ~0.17 in round 0 and ~0.01 from round 10;
sign_flip, gaussian, ipm and dissensus attackers by a median of 0.15 to 20. A neighbour
passes when the rise is at most ``absolute + relative x own loss``; clipping rules then
use it in full (``vetted`` in :mod:`p2pfl.core.aggregation`). Passing only exempts from
clipping: it never raises reputation by itself, and failing is not evidence (an honest
neighbour with other classes may fail early on: the rule decides as before). The check
cannot see harm to classes we do not hold; label flipping mostly passes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from p2pfl.node.config import HarmCheck


@runtime_checkable
class Prober(Protocol):
    """A learner that can score models on its own data (``TorchLearner`` is one)."""

    def probe_losses(self, states: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
        """Return each state's loss on a fixed sample of the local training data."""
        ...


def mixed(
    own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """Return ``own + share * (other - own)`` (non-floating tensors: our own)."""
    return {
        name: tensor + share * (other[name] - tensor) if tensor.is_floating_point() else tensor
        for name, tensor in own.items()
    }


def vet(
    prober: Prober,
    check: HarmCheck,
    own: Mapping[str, torch.Tensor],
    neighbours: Sequence[Mapping[str, torch.Tensor]],
    shares: Sequence[float],
) -> list[bool]:
    """Return, per neighbour, whether mixing it in at its share keeps our loss in tolerance.

    Neighbours with share 0 are not probed (they are not mixed in) and are not vetted.
    """
    probed = [j for j, share in enumerate(shares) if share > 0]
    if not probed:
        return [False] * len(neighbours)
    losses = prober.probe_losses([own, *(mixed(own, neighbours[j], shares[j]) for j in probed)])
    base = losses[0]
    if not math.isfinite(base):
        return [False] * len(neighbours)
    tolerance = check.absolute + check.relative * base
    vetted = [False] * len(neighbours)
    for j, loss in zip(probed, losses[1:], strict=True):
        vetted[j] = math.isfinite(loss) and loss - base <= tolerance
    return vetted


__all__ = ["Prober", "mixed", "vet"]
