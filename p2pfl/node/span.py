"""The span check (opt-in): does a neighbour's model differ from the others the way training does?

Honest models differ because they trained on different data, so the difference between
a neighbour's model and the others lies largely in directions in which losses on data
change. Measured on digits (16 nodes, Dirichlet(0.5), seed 0): the share of that
difference (squared length) inside the span of the per-sample gradients of our own probe
sample is 18-149 times (median 33) what a random direction of the same space has there.
An attacker that drifts the network along a direction it made up, inside the honest
spread (``alie`` with ``signs = "random"``: each coordinate moved by z honest standard
deviations, up or down by a fixed random sign, the same way every round), is at 4-9
times (median 5): it costs
nothing on anybody's data in one round, so distance and loss tests pass it, and over 30
rounds it cost the default defence 5-6 points of honest mean (docs/RESULTS.md,
"Session 14").

Each round from ``span_start`` the node takes the per-sample gradients of its probe
sample at its own trained model (:class:`GradientProber`), drops those fitted to float
noise, and computes for each neighbour its *span ratio*: the share of its deviation from
the mean of the others (ours included; each of them moved towards ours to at most the
median neighbour's distance, so that one model far off does not make every other one
look made up) that lies in the gradients' span, divided by a random direction's share
(gradients / parameters). The neighbour with the lowest ratio leaves the pool first and
the rest are judged again without it. At most ``span_low``: weight 0 this round; at
least ``span_high``: no objection; linear between. The evidence (a trust cap handed to
the reputation) uses a running mean of the ratio
(``span_memory``), so that a round or two cost a neighbour its weight but not its name.

The node abstains (no verdict) when the typical neighbour itself is under ``span_high``:
a node whose data spans few directions (one class, fitted to noise) cannot tell
data-like from made-up, and judging cut its honest neighbours and kept an attacker whose
push lies along the honest update. It also abstains when the model is so small that the
probe's gradients would span more than an eighth of its parameters, so large that they
would not fit ``SPAN_BUDGET`` floats, or when fewer than ``MIN_SAMPLES`` of them are
above noise.

Opt-in (``[harm_check] span_low``, 3 measured; 0 by default): at a node whose neighbours
are mostly attackers the mean of the others is theirs, the one honest neighbour is the
one unlike the others, and the check cut it (the node with three attackers of four under
``alie`` z 2-3: 0.68-0.83 without it, 0.30 with it).

What it does not stop: a made-up direction that lies in the span of data gradients (the
attacks that push along the honest update, ``min_max``, ``clip_aware``, ``ipm`` on the
update: clipping and the harm check are for those), and nodes whose neighbours are
mostly attackers (the typical neighbour is one of them).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from p2pfl.core.aggregation.flat import fill_row, flat_spec
from p2pfl.node.config import HarmCheck

log = logging.getLogger(__name__)

SPAN_BUDGET = 1 << 25  # floats of per-sample gradients held at once (128 MiB)
MIN_SAMPLES = 8  # fewer gradients than this span too little to judge by
# A sample whose gradient is this small beside the largest one is fitted to float noise:
# its direction is noise too (a node whose data is all one class had its whole probe at
# 1e-9 and judged every honest neighbour made up; clip_aware, seed 1).
NEGLIGIBLE = 1e-3
RANK_TOLERANCE = 1e-6  # of the largest eigenvalue of the unit gradients' Gram matrix


@runtime_checkable
class GradientProber(Protocol):
    """A learner that can take per-sample gradients on its probe sample (``TorchLearner``)."""

    def probe_gradients(self, state: Mapping[str, torch.Tensor], samples: int) -> torch.Tensor:
        """Return the loss gradients of the first ``samples`` probe samples at ``state``:
        shape ``(samples, parameters)``, the floating tensors of ``state`` flattened in
        its key order."""
        ...


@dataclass(frozen=True, slots=True)
class SpanVerdict:
    """One round's span check, per neighbour: its span ratio, the factor on its mixing
    weight this round, and the trust cap handed to the reputation."""

    ratio: list[float]
    weight: list[float]
    trust: list[float]


class Span:
    """The span of the probe's per-sample gradients, for projections onto it.

    Factored rather than orthonormalised: with ``C`` the Gram matrix of the gradients
    scaled to unit length (``samples x samples``) and ``C = V L V^T``, the squared length
    of a vector ``d`` inside the span is ``|L^-1/2 V^T (G d / norms)|^2``. One Gram product
    and a small eigendecomposition instead of a QR of (parameters x samples): 5x cheaper
    at 77k parameters (benchmarks/bench_span.py). Directions whose eigenvalue is under
    ``RANK_TOLERANCE`` of the largest (near-duplicate samples) do not count.
    """

    def __init__(self, gradients: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """Span the rows of ``gradients`` ``(samples, parameters)``, none of them zero;
        ``norms``: their lengths, when the caller has them already."""
        self.gradients = gradients
        self.norms = gradients.norm(dim=1) if norms is None else norms
        gram = (gradients @ gradients.T).double() / torch.outer(self.norms, self.norms).double()
        values, vectors = torch.linalg.eigh(gram)
        kept = values > RANK_TOLERANCE * values.max()
        self.coordinates = (vectors[:, kept] / values[kept].sqrt()).float()  # (samples, rank)
        self.rank = int(kept.sum())
        self.dimension = gradients.shape[1]

    def inside(self, vectors: torch.Tensor) -> torch.Tensor:
        """The squared length of each row of ``vectors`` that lies inside the span."""
        return ((vectors @ self.gradients.T) / self.norms @ self.coordinates).square().sum(dim=1)


def span_ratios(span: Span, models: torch.Tensor, high: float) -> list[float]:
    """Return each neighbour's span ratio (see the module doc).

    ``span``: the probe's gradients; ``models``: our model in row 0, the neighbours'
    after it. Each neighbour is compared with the mean of the others, each of them moved
    towards ours to at most the median neighbour's distance (so that one model far off
    does not make every other one look made up); the neighbour with the lowest ratio
    under ``high`` then leaves the pool and the rest are judged again without it.
    """
    random_share = span.rank / span.dimension
    offsets = models - models[0]  # ours is row 0, at offset 0
    lengths = offsets.norm(dim=1)
    radius = float(lengths[1:].median())
    clipped = offsets * (radius / lengths.clamp(min=radius)).unsqueeze(1) if radius > 0 else offsets
    ratios = [high] * (models.shape[0] - 1)
    kept = list(range(1, models.shape[0]))
    while kept:
        rows = clipped[kept]
        # the pool is ours (offset 0) and the kept ones; the others of j: all of it but j
        deviations = offsets[kept] - (rows.sum(dim=0) - rows) / len(kept)
        lengths_sq = deviations.square().sum(dim=1)
        inside = span.inside(deviations)
        for j, length, share in zip(kept, lengths_sq.tolist(), inside.tolist(), strict=True):
            ratios[j - 1] = share / length / random_share if length > 0 else high
        worst = min(kept, key=lambda j: ratios[j - 1])
        if ratios[worst - 1] >= high:
            break
        kept.remove(worst)
    return ratios


def ramp(ratio: float, low: float, high: float) -> float:
    """0 at ``low`` or under, 1 at ``high`` or over, linear between."""
    return min(1.0, max(0.0, (ratio - low) / (high - low)))


class SpanGate:
    """The span check of one node: its prober, thresholds and each peer's running ratio."""

    def __init__(self, check: HarmCheck, prober: GradientProber) -> None:
        """Check with ``check``'s ``span_*`` settings, taking gradients from ``prober``."""
        self.check = check
        self.prober = prober
        self._memory: dict[str, float] = {}  # peer -> running mean of its span ratio
        self._skipped = False

    def judge(
        self, number: int, own: Mapping[str, torch.Tensor], senders: Sequence[str],
        states: Sequence[Mapping[str, torch.Tensor]],
    ) -> SpanVerdict | None:
        """Judge round ``number``'s neighbours; None before ``span_start`` or when skipped."""
        check = self.check
        if number < check.span_start or not states:
            return None
        spec = flat_spec(own)  # our key order, as probe_gradients flattens
        models = torch.empty(len(states) + 1, spec.size)
        for row, state in zip(models, [own, *states], strict=True):
            fill_row(row, state, spec)
        parameters = spec.size
        samples = min(parameters // 8, SPAN_BUDGET // parameters)
        if samples < MIN_SAMPLES:
            if not self._skipped:
                log.info("span check off: %d parameters leave room for %d gradients", parameters, samples)
                self._skipped = True
            return None
        gradients = self.prober.probe_gradients(own, samples).float()
        norms = gradients.norm(dim=1)
        above = norms > NEGLIGIBLE * norms.max() if len(norms) else norms.bool()  # none if all 0 or NaN
        if not bool(above.all()):  # (a copy of every gradient only when some are dropped)
            gradients, norms = gradients[above], norms[above]
        if len(gradients) < MIN_SAMPLES:  # our data is fitted to noise: nothing to judge by
            log.debug("span check abstains in round %d: %d gradients above noise", number, len(gradients))
            return None
        ratios = span_ratios(Span(gradients, norms), models, check.span_high)
        typical = statistics.median(ratios)
        if typical < check.span_high:  # our data cannot tell data-like from made-up
            log.debug("span check abstains in round %d: the typical neighbour's ratio is %.1f", number, typical)
            return None
        trust = []
        for sender, ratio in zip(senders, ratios, strict=True):
            before = self._memory.get(sender, 2 * check.span_high)  # a newcomer starts above suspicion
            self._memory[sender] = running = check.span_memory * before + (1 - check.span_memory) * ratio
            trust.append(ramp(running, check.span_low, check.span_high))
        return SpanVerdict(ratios, [ramp(r, check.span_low, check.span_high) for r in ratios], trust)


__all__ = ["GradientProber", "Span", "SpanGate", "SpanVerdict", "ramp", "span_ratios"]
