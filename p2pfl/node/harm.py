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

Measured on digits (16 nodes, Dirichlet(0.5), 30 rounds; docs/RESULTS.md): mixed in
at 1/5, honest neighbours raise the probe loss by at most ~0.17 in round 0 and ~0.01
from round 10; sign_flip, gaussian, ipm and dissensus attackers by a per-round median
of 0.09 to 23. A neighbour passes when the rise is at most ``absolute + relative x own loss``
(0.05 + 5%); after ``streak`` passes in a row clipping rules use it in full (``vetted``
in :mod:`p2pfl.core.aggregation`), and a passing neighbour's clipping is not held
against its reputation. The node probes at the share a neighbour would have at full
reputation, whatever its reputation now: a distrusted peer's small share would let a
poor model pass, and an honest peer cut off early must be able to earn its way back.
The check cannot see harm to classes we do not hold: label flipping mostly passes it.
The tolerance was set at 1/5; a node that got fewer models probes each at a larger share,
so whether one *harms* us is judged against the tolerance scaled by the square of that
share over 1/5 (``HarmCheck.harm_scale``; passing keeps the plain tolerance).

Alone at its share, each of several colluders sending the same model can stay inside the
tolerance while together they pull us where none of them could alone. The joint check
(``HarmCheck.joint``, :func:`leave_one_out`) also probes the whole mix, every neighbour
harmless alone at its probe share, with each of them left out in turn: near a minimum the loss
grows with the square of the pull, so each of two colluders' part in the mix is about three
times what it is alone, and adding independent noise to their models only adds harm of its
own. The bar is relative (the median neighbour's part plus the tolerance): the honest
neighbours of a node with skewed data pull the same way too, away from its classes, and
must not all fail. A neighbour over that bar this round is not passed and not forgiven its
clipping; a check of the joint mix is no proof of malice, so it is not counted as failed.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from p2pfl.core.aggregation import aggregate
from p2pfl.core.codec import State
from p2pfl.node.config import HarmCheck


@runtime_checkable
class Prober(Protocol):
    """A learner that can score models on its own data (``TorchLearner`` is one)."""

    def probe_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
        """Return each state's loss on a fixed sample of the local training data.

        ``states`` may be a generator: one mixed model exists at a time.
        """
        ...


@runtime_checkable
class ClassProber(Prober, Protocol):
    """A prober that also reports per-class losses (``TorchLearner`` is one)."""

    def probe_class_losses(self, states: Iterable[Mapping[str, torch.Tensor]]) -> list[list[float]]:
        """Return, per state, the loss of each class in the probe sample, in a fixed order."""
        ...


def probe_losses(
    prober: Prober, check: HarmCheck, states: Iterable[Mapping[str, torch.Tensor]]
) -> list[float]:
    """Losses as the check weighs classes: ``pooled`` (every sample alike), ``balanced``
    (mean over classes) or ``worst`` (the worst class); pooled if the prober cannot tell."""
    if check.classes == "pooled" or not isinstance(prober, ClassProber):
        return prober.probe_losses(states)
    combine = max if check.classes == "worst" else statistics.fmean
    return [combine(per_class) if per_class else math.nan for per_class in prober.probe_class_losses(states)]


_DISTANCE_BLOCK = 1 << 18  # elements at a time: float64 temporaries of 2 MiB, not of the model


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Euclidean distance between two states over ``a``'s floating-point tensors.

    Summed in float64 a block of elements at a time: whole-tensor float64 differences
    took ~6 model sizes for a one-tensor model (issue 12).
    """
    squares = 0.0
    for key, tensor in a.items():
        if tensor.is_floating_point():
            x, y = tensor.reshape(-1), b[key].reshape(-1)
            for i in range(0, x.numel(), _DISTANCE_BLOCK):
                block = slice(i, i + _DISTANCE_BLOCK)
                squares += float(torch.sum((y[block].double() - x[block].double()) ** 2))
    return squares**0.5


def full_shares(weights: Sequence[float], self_weight: float) -> list[float]:
    """Each neighbour's share of a mix, at least the one it would have at full reputation
    (an equal share with us and the others): what the checks judge it at."""
    total = self_weight + sum(weights)
    least = 1 / (len(weights) + 1)
    return [max(w / total, least) if total > 0 else least for w in weights]


def mixed(
    own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """Return ``own + share * (other - own)`` (non-floating tensors: our own).

    The same operations in the same order, in place on the one new tensor: a temporary per
    step took two model sizes per probed neighbour (issue 12).
    """
    return {
        name: torch.sub(other[name], tensor).mul_(share).add_(tensor) if tensor.is_floating_point() else tensor
        for name, tensor in own.items()
    }


@dataclass(frozen=True, slots=True)
class Excess:
    """How far one neighbour's mix raised our loss beyond the tolerance (<= 0: within)."""

    over_own: float  # above our own model's loss: harm in absolute terms (bar: ``HarmCheck.harm_scale`` tolerances)
    over_reference: float  # above the check's reference (``own`` or ``median``)
    over_typical: float  # above the reference by more than the plain tolerance (no per-step bar)
    tolerance: float = 1.0  # the plain tolerance these are measured against


def probe(
    prober: Prober,
    check: HarmCheck,
    own: Mapping[str, torch.Tensor],
    neighbours: Sequence[Mapping[str, torch.Tensor]],
    shares: Sequence[float],
    *,
    start: Mapping[str, torch.Tensor] | None = None,
) -> list[Excess | None]:
    """Return, per neighbour, how far mixing it in at its share raises our loss beyond the
    tolerance (inf: a non-finite loss), or None where nothing was judged.

    ``start`` is our model before this round's local training: when training made our
    loss worse, not better, our own model is no yardstick (anything mixed in improves
    it, a sign-flipped model included: the attack tests showed it) and nobody is judged.
    Neighbours with share 0 are not probed (they are not mixed in) and are not judged.

    With ``start``, the bar for ``over_reference`` (passing, hence vetting) is also at most
    ``check.harm_per_step`` per own local step of distance between the neighbour and us:
    whoever raises our loss must be far away to pass, see :class:`~p2pfl.node.config.HarmCheck`.
    """
    probed = [j for j, share in enumerate(shares) if share > 0]
    unjudged: list[Excess | None] = [None] * len(neighbours)
    if not probed:
        return unjudged
    references = [own] if start is None else [own, start]
    mixes = (mixed(own, neighbours[j], shares[j]) for j in probed)  # one at a time
    losses = probe_losses(prober, check, itertools.chain(references, mixes))
    base = losses[0]
    if not math.isfinite(base):
        return unjudged
    tolerance = check.absolute + check.relative * base
    if start is not None and not base <= losses[1] + tolerance:
        return unjudged
    mixes_losses = losses[len(references) :]
    reference = base
    finite = [loss for loss in mixes_losses if math.isfinite(loss)]
    if check.reference == "median" and finite:
        # Zeno-style: when our neighbours typically improve our loss, "no worse than our
        # own model" is too lax a bar; compare with the typical neighbour instead (never
        # looser than our own loss; the median is honest while most neighbours are).
        reference = min(base, statistics.median(finite))
    step = 0.0 if start is None else distance(start, own)
    harm_bar = tolerance * check.harm_scale(len(neighbours))
    excess = list(unjudged)
    for j, loss in zip(probed, mixes_losses, strict=True):
        if not math.isfinite(loss):
            excess[j] = Excess(math.inf, math.inf, math.inf, tolerance)
            continue
        bar = tolerance
        if step > 0:
            bar = min(bar, check.harm_per_step * distance(own, neighbours[j]) / step)
        excess[j] = Excess(loss - base - harm_bar, loss - reference - bar, loss - reference - tolerance,
                           tolerance)
    return excess


def leave_one_out(
    prober: Prober,
    check: HarmCheck,
    own: Mapping[str, torch.Tensor],
    neighbours: Sequence[Mapping[str, torch.Tensor]],
    shares: Sequence[float],
    judged: Sequence[int],
) -> list[float] | None:
    """Return, per index in ``judged``, how much leaving that neighbour out of the whole
    mix (``own + sum of share x (neighbour - own)`` over ``judged``) lowers our loss;
    None when a loss is not finite (the per-neighbour check has judged that already).

    One mix besides the whole exists at a time.
    """
    whole: dict[str, torch.Tensor] = {}
    for name, tensor in own.items():
        if not tensor.is_floating_point():
            whole[name] = tensor
            continue
        total = tensor.clone()
        for j in judged:
            total.add_(torch.sub(neighbours[j][name], tensor), alpha=shares[j])
        whole[name] = total

    def without(j: int) -> dict[str, torch.Tensor]:
        return {name: torch.sub(neighbours[j][name], own[name]).mul_(-shares[j]).add_(tensor)
                if tensor.is_floating_point() else tensor for name, tensor in whole.items()}

    losses = probe_losses(prober, check, itertools.chain([whole], (without(j) for j in judged)))
    if not all(math.isfinite(loss) for loss in losses):
        return None
    return [losses[0] - loss for loss in losses[1:]]


def plausible(
    prober: Prober,
    check: HarmCheck,
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    yardstick: Mapping[str, torch.Tensor] | None = None,
) -> list[int]:
    """Return the indices of ``states`` whose loss on our data is near the best one's.

    For adopting models wholesale (catching up): "near" is the harm check's tolerance
    around the lowest loss among ``states`` and ``yardstick`` (our own model, if given:
    a lone source must then be about as good as what we have). A non-finite loss never
    passes; all non-finite: none does.
    """
    candidates = list(states) if yardstick is None else [yardstick, *states]
    losses = prober.probe_losses(candidates)
    finite = [loss for loss in losses if math.isfinite(loss)]
    if not finite:
        return []
    best = min(finite)
    bar = best + check.absolute + check.relative * best
    offset = len(candidates) - len(states)
    return [
        j for j, loss in enumerate(losses[offset:]) if math.isfinite(loss) and loss <= bar
    ]


def starting_point(
    own: Mapping[str, torch.Tensor],
    sources: Sequence[Mapping[str, torch.Tensor]],
    prober: Prober | None,
    check: HarmCheck,
) -> State | None:
    """Return the model a node far behind restarts from, or None to keep its own.

    We have no evidence about the sources yet and one may be an attacker. With a
    ``prober`` only the :func:`plausible` sources count, and a lone source (say our one
    reachable neighbour) must also do about as well as our own model on our data.
    Without one, our own model joins two or fewer: with two sources, one of them an
    attacker, the coordinate-wise median of the three stays between our model and the
    honest one; a single source is averaged with ours. Median of three or more models,
    else mean.
    """
    states = list(sources)
    if prober is not None:
        lone = own if len(states) == 1 else None
        states = [states[j] for j in plausible(prober, check, states, yardstick=lone)]
    elif len(states) < 3:
        states = [own, *states]
    if not states:
        return None
    rule = "median" if len(states) >= 3 else "mean"
    return aggregate(rule, states[0], states[1:], [1.0] * (len(states) - 1), self_weight=1.0).state


@dataclass(frozen=True, slots=True)
class Verdict:
    """One round's harm check: who passed now, and who passed ``streak`` times in a row."""

    passed: list[bool]
    vetted: list[bool]
    failed: list[bool] = field(default_factory=list)  # judged, and raised our loss too much
    harmless: list[bool] = field(default_factory=list)  # judged, within tolerance of our loss
    forgive: str = "passed"
    fail_trust: float = 1.0
    typical: list[bool] = field(default_factory=list)  # harmless, and within tolerance of the reference
    fail_caps: list[float] = field(default_factory=list)  # per neighbour: the trust a failure leaves
    forgive_caps: list[float] = field(default_factory=list)  # per neighbour: how far clipping is forgiven
    unvetted: float = 1.0  # once settled, how far an unvetted neighbour's clipping is forgiven
    pulled: list[bool] = field(default_factory=list)  # over the joint check's bar: not passed, not forgiven

    def forgiven(
        self, trust: Sequence[float], floor: float, *, failures: bool = True, settled: bool = True
    ) -> tuple[float, ...]:
        """Return the trust that becomes evidence: raised to ``floor`` where clipping is
        forgiven, capped at ``fail_trust`` where the check failed (unless not ``failures``).

        ``forgive = "typical"`` spares the harmless neighbours until the models have
        ``settled`` (:attr:`HarmCheck.settle`), then only those also within tolerance of
        the typical neighbour's mix. Once settled, a neighbour that is not vetted is raised
        to at most ``unvetted``; ``forgive_caps`` (the neighbours' records) bound it too.
        """
        typical = self.typical if settled else self.harmless
        spared = {"passed": self.passed, "vetted": self.vetted, "harmless": self.harmless,
                  "typical": typical}.get(self.forgive)
        out = list(trust)
        ceiling = self.forgive_caps or [1.0] * len(out)  # how far forgiveness may raise each
        if settled and self.unvetted < 1:
            ceiling = [c if v else min(c, self.unvetted) for c, v in zip(ceiling, self.vetted, strict=True)]
        if spared is not None:
            out = [max(t, min(floor, c)) if ok else t for t, ok, c in zip(out, spared, ceiling, strict=True)]
        if self.failed and failures:
            caps = self.fail_caps or [self.fail_trust] * len(out)
            out = [min(t, c) if bad else t for t, bad, c in zip(out, self.failed, caps, strict=True)]
        return tuple(out)


class HarmGate:
    """The harm check of one node across rounds: shares to probe at, and streaks."""

    def __init__(self, check: HarmCheck, prober: Prober) -> None:
        """Probe with ``prober`` (the node's learner); start with no streaks."""
        self.check = check
        self.prober = prober
        self._streaks: Counter[str] = Counter()  # peers whose last check passed
        self._judged = 0  # rounds judged so far
        self._fail_rate: dict[str, float] = {}  # peer -> recent share of failed checks
        self._failed_at: dict[str, int] = {}  # peer -> judged round of its last counted failure, within the window

    def judge(
        self,
        own: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor] | None,
        senders: Sequence[str],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        self_weight: float,
        counts: bool = True,
    ) -> Verdict:
        """Probe every neighbour's model and update the streaks; see the module doc.

        ``counts``: whether this round's failures are evidence (from round ``grace`` on);
        only those are remembered for ``remember`` rounds.

        Each is probed at the share it would have at full reputation (or its actual one,
        if larger; at most ``max_probe_share``), whatever its reputation now: at its
        reduced share a poor model would pass more easily the less it is trusted, and an
        honest neighbour cut off early must be able to earn its way back.
        """
        cap = self.check.max_probe_share
        shares = [min(cap, self.check.probe_scale * share) for share in full_shares(weights, self_weight)]
        excess = probe(self.prober, self.check, own, states, shares, start=start)
        pulled = self._pulled(own, states, shares, excess)
        passed = [e is not None and e.over_reference <= 0 and not p for e, p in zip(excess, pulled, strict=True)]
        # Evidence only for harm in absolute terms: a neighbour that helps us less than
        # the others do is not vetted, but it is no sign of malice.
        failed = [e is not None and e.over_own > 0 for e in excess]
        harmless = [e is not None and e.over_own <= 0 and not p for e, p in zip(excess, pulled, strict=True)]
        typical = [ok and e is not None and e.over_typical <= 0 for ok, e in zip(harmless, excess, strict=True)]
        for sender, ok in zip(senders, passed, strict=True):
            if ok:
                self._streaks[sender] += 1
            else:
                self._streaks.pop(sender, None)
        recent = self._remember_failures(senders, failed, counts)
        vetted = [self._streaks[s] >= self.check.streak and not r for s, r in zip(senders, recent, strict=True)]
        harmless = [ok and not r for ok, r in zip(harmless, recent, strict=True)]
        typical = [ok and not r for ok, r in zip(typical, recent, strict=True)]
        fail_caps = [self._fail_cap(e) for e in excess]
        forgive_caps = self._record(senders, failed, counts)
        return Verdict(passed, vetted, failed, harmless, self.check.forgive, self.check.fail_trust, typical,
                       fail_caps, forgive_caps, self.check.unvetted_forgive, pulled)

    def _pulled(
        self,
        own: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        shares: Sequence[float],
        excess: Sequence[Excess | None],
    ) -> list[bool]:
        """Per neighbour harmless alone, whether its part in the whole mix of those is over
        the joint check's bar: the median one's part (at least 0) plus the tolerance."""
        # Only the neighbours harmless alone: one that fails alone is dealt with already,
        # and a wildly harmful one swamps the mix. At a node with three attackers among
        # four neighbours, one at 60-1000 tolerances made the honest neighbour's part the
        # largest, and the node lost it (alie z 3, seed 0: 0.83 -> 0.29).
        pulled = [False] * len(excess)
        harmless = {j: e for j, e in enumerate(excess) if e is not None and e.over_own <= 0}
        if not self.check.joint or len(harmless) < 2:
            return pulled
        judged = list(harmless)
        parts = leave_one_out(self.prober, self.check, own, states, shares, judged)
        if parts is None:
            return pulled
        tolerance = harmless[judged[0]].tolerance  # one probe: the same for every neighbour
        bar = max(0.0, statistics.median(parts))
        for j, part in zip(judged, parts, strict=True):
            pulled[j] = part - bar > tolerance
        return pulled

    def _fail_cap(self, e: Excess | None) -> float:
        """The trust a failed check leaves: ``fail_trust`` once the excess reaches
        ``fail_full_at`` tolerances, in proportion below that (0: always ``fail_trust``)."""
        full = self.check.fail_full_at
        if e is None or not full or not math.isfinite(e.over_own):
            return self.check.fail_trust
        severity = min(1.0, max(0.0, e.over_own) / (full * e.tolerance))
        return 1.0 - (1.0 - self.check.fail_trust) * severity

    def _record(self, senders: Sequence[str], failed: Sequence[bool], counts: bool) -> list[float]:
        """Per sender, the share of its recent counted checks that did not fail (an
        average forgetting ``1 / forgive_memory`` per round); all 1 when that is 0."""
        memory = self.check.forgive_memory
        if not memory:
            return [1.0] * len(senders)
        keep = 1.0 - 1.0 / memory
        if counts:
            for s, bad in zip(senders, failed, strict=True):
                self._fail_rate[s] = keep * self._fail_rate.get(s, 0.0) + (1.0 - keep) * float(bad)
        return [1.0 - self._fail_rate.get(s, 0.0) for s in senders]

    def _remember_failures(self, senders: Sequence[str], failed: Sequence[bool], counts: bool) -> list[bool]:
        """Note this round's counted failures; return, per sender, whether it failed within
        the last ``remember`` rounds (this one included). Only that window is kept."""
        self._judged += 1
        window = self.check.remember
        if counts and window:
            self._failed_at.update((s, self._judged) for s, bad in zip(senders, failed, strict=True) if bad)
        for peer in [p for p, at in self._failed_at.items() if self._judged - at > window]:
            del self._failed_at[peer]
        return [s in self._failed_at for s in senders]


__all__ = ["ClassProber", "Excess", "distance", "HarmGate", "full_shares", "leave_one_out", "Prober", "Verdict", "mixed", "plausible", "probe", "probe_losses", "starting_point"]
