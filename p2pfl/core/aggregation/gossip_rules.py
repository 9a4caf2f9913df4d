"""Rules built for decentralized learning: each node aggregates around its own model.

``clipped_gossip`` (the default) and ``centered_clip`` clip every neighbour's pull to a
radius; ``balance`` accepts neighbours close to the own model; ``ios`` scissors outliers
off a weighted mean that always keeps the own model.
"""

from __future__ import annotations

import math

import torch

from p2pfl.core.aggregation.base import (
    DEFAULT_BYZANTINE_FRACTION,
    DEFAULT_MEDIAN_CAP,
    DEFAULT_VETTED_SCALE,
    STEP_CAP,
    Inputs,
    Span,
    adaptive_radius,
    checked_count,
    checked_number,
    clip_ratio,
    mean_coefficients,
    rule,
)
from p2pfl.errors import AggregationError


def median_cap(dist: torch.Tensor, w: torch.Tensor, kappa: float) -> float:
    """Return ``kappa`` times the weighted median distance, the own model voting at 0.

    A cap on the quantile radius for neighbourhoods where attackers hold more than
    ``delta`` of the weight (random placement on a sparse graph does that): as long as
    the honest neighbours and the node itself hold the majority of the votes, the
    median distance is an honest one, so a far-away attacker is clipped (and loses
    trust) however many of the node's neighbours it shares with other attackers. The
    own model votes with the mean neighbour weight: with its mixing weight it would
    often be the median itself, and the radius 0.
    """
    positive = w[w > 0]
    if len(positive) == 0:
        return math.inf
    d = torch.cat([dist.new_zeros(1), dist])
    weights = torch.cat([positive.mean().reshape(1), w])
    order = torch.argsort(d)
    cum = torch.cumsum(weights[order], dim=0)
    index = int(torch.searchsorted(cum, 0.5 * cum[-1], right=True).item())
    return kappa * float(d[order][min(index, len(d) - 1)])


def _radius(
    inp: Inputs, dist: torch.Tensor, tau: float | None, delta: float, kappa: float, step: float
) -> float:
    if tau is not None:
        return checked_number(tau, "tau", 0.0)
    delta = checked_number(delta, "delta", 0.0, 1.0)
    kappa = checked_number(kappa, "kappa", 0.0)
    taking = inp.taking_part[1:]
    dist, w = dist[taking], inp.weights[1:][taking]
    radius = adaptive_radius(dist, w, delta)
    if len(dist):
        radius = min(radius, median_cap(dist, w, kappa))
    if inp.own_step:
        # Self-centred: however many neighbours attack, nobody pulls the model further per
        # round than step_cap of its own local updates would (it still mixes, just slower);
        # a neighbour the harm check vetted gets vetted_scale times that. Until issue 17's
        # second pass the nearest reputable neighbour's distance was a floor under this cap:
        # at a node with three attacking neighbours of four that floor let them in (seeds
        # 0-3: worst honest node under min_max 0.49, without the floor 0.72; no cost
        # without attack, also over 60 rounds; docs/DEFENCE.md section 4).
        step_cap = checked_number(step, "step_cap", 0.0) * inp.own_step
        radius = min(radius, step_cap)
    return radius


def _checked_scale(value: float) -> float:
    """Validate ``vetted_scale``: a number >= 1, or math.inf (vetted used in full)."""
    return math.inf if value == math.inf else checked_number(value, "vetted_scale", 1.0)


def _vetted_ratio(
    inp: Inputs, tau: float, dist: torch.Tensor, vetted_scale: float
) -> torch.Tensor:
    """Clip ratios min(1, tau / dist); neighbours the node vetted get ``vetted_scale`` x tau."""
    ratio = clip_ratio(tau, dist)
    if inp.vetted is None:
        return ratio
    wide = torch.ones_like(ratio) if math.isinf(vetted_scale) else clip_ratio(vetted_scale * tau, dist)
    return torch.where(inp.vetted, wide, ratio)


def _shared_reach(
    coef: torch.Tensor, share: torch.Tensor, dist: torch.Tensor, span: Span, tau: float,
    vetted: torch.Tensor, vetted_scale: float,
) -> torch.Tensor:
    """Scale the vetted neighbours' pull beyond the radius so that together it reaches
    no further than the largest vetted share could alone.

    Vetting gives one far neighbour that does us no harm (the one across a bridge between
    communities) ``vetted_scale`` radii. Several vetted neighbours pulling the same way
    beyond the radius add up: three attackers of four that drift slowly enough to stay
    vetted (``boiling_frog``) dragged the node they surround to 0.58 (issue 17). Within
    the radius everyone keeps the pull the rule gives anyway.
    """
    if not bool(vetted.any()) or tau <= 0 or math.isinf(vetted_scale):
        return coef
    base = share * clip_ratio(tau, dist)
    beyond = torch.where(vetted, coef - base, torch.zeros_like(coef)).clamp(min=0)
    reach = span.norm(torch.cat([beyond.new_zeros(1), beyond]).double())  # ||beyond @ diffs||
    budget = float(share[vetted].max()) * (vetted_scale - 1) * tau
    if reach <= budget:
        return coef
    return torch.where(vetted, base + beyond * (budget / reach), coef)


@rule("centered_clip", clipping=True)
def centered_clip(
    inp: Inputs,
    tau: float | None = None,
    iters: int = 3,
    delta: float = DEFAULT_BYZANTINE_FRACTION,
    kappa: float = DEFAULT_MEDIAN_CAP,
    vetted_scale: float = DEFAULT_VETTED_SCALE,
    step_cap: float = STEP_CAP,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centered clipping: v <- v + sum_i w_i clip(x_i - v, tau) / sum_i w_i, from v = own.

    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021. The sum runs over the own model (``self_weight``) and the neighbours, for
    ``iters`` (L) iterations. ``tau`` fixed, or None: the adaptive radius of
    ``clipped_gossip`` (``delta``) measured at the start; one iteration then equals
    ``clipped_gossip``. Trust: the clip ratio min(1, tau / ||x_j - v||) of the last
    iteration.
    """
    iters = checked_count(iters, "iters", 3, 10_000)
    vetted_scale = _checked_scale(vetted_scale)
    span = Span.of(inp)
    c = torch.zeros(inp.count, dtype=torch.float64)  # v = own
    tau_ = _radius(inp, span.distances(c)[1:], tau, delta, kappa, step_cap)
    w = inp.weights.to(torch.float64)
    w = w / w.sum() if w.sum() > 0 else w
    centre = c
    for _ in range(iters):
        centre = c
        # v + sum_i s_i (x_i - v) with x_i - v = (e_i - c) @ D
        dist = span.distances(c)
        ratio = torch.cat([clip_ratio(tau_, dist[:1]), _vetted_ratio(inp, tau_, dist[1:], vetted_scale)])
        s = w * ratio
        c = c * (1 - s.sum()) + s
    trust = _vetted_ratio(inp, tau_, span.distances(centre)[1:], vetted_scale)
    return span.point(c), trust.to(inp.dtype), tau_


@rule("clipped_gossip", clipping=True)
def clipped_gossip(
    inp: Inputs,
    tau: float | None = None,
    delta: float = DEFAULT_BYZANTINE_FRACTION,
    kappa: float = DEFAULT_MEDIAN_CAP,
    vetted_scale: float = DEFAULT_VETTED_SCALE,
    step_cap: float = STEP_CAP,
    shared_reach: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Self-centred clipped gossip: x' = x + sum_j w_j clip(x_j - x, tau).

    He, Karimireddy, Jaggi, "Byzantine-Robust Decentralized Learning via ClippedGossip",
    2022 (arXiv:2202.01545). ``w_j`` are the neighbour weights normalised together with
    ``self_weight`` (so sum_j w_j < 1), clip(z, tau) = z min(1, tau/||z||). ``tau`` fixed,
    or None (default): an adaptive radius chosen so that neighbours holding at least
    ``delta`` (assumed Byzantine share) of the neighbour weight lie at or beyond it (see
    :func:`adaptive_radius`). The paper's analysis sets tau_i^2 = sum over honest j of
    W_ij ||x_i - x_j||^2 / delta_i, which needs the honest set; the authors' released
    code (epfml/byzantine-robust-decentralized-optimizer) clips to the second-largest
    neighbour distance, which is this rule with ``delta`` = one neighbour's share. The
    quantile is scale-free, needs no honest set, and, with Byzantine weight below
    ``delta``, is at most the farthest honest distance. Whatever the neighbours send,
    ||x' - x|| <= sum_j w_j x tau. Trust: min(1, tau / ||x_j - x||).

    The quantile fails where attackers hold more than ``delta`` of a node's neighbour
    weight: the radius then reaches an attacker's distance. So the radius is also capped
    at ``kappa`` times the weighted median distance counting the own model at distance 0
    (:func:`median_cap`; a huge ``kappa`` turns the cap off), which stays honest while the
    node and its honest neighbours hold the majority of the weight. With the node's own
    last local step (``own_step``) given, the radius is also at most ``step_cap`` times it:
    however many neighbours attack, none drags the node further per round than that.
    Neighbours the harm check vetted reach ``vetted_scale`` radii, together no further
    beyond the radius than the largest vetted share alone (``shared_reach``; false lets
    each vetted neighbour use its own reach, as before issue 17's fourth pass).
    """
    if not isinstance(shared_reach, bool):
        raise AggregationError(f"shared_reach must be true or false, got {shared_reach!r}")
    span = Span.of(inp)  # diffs x_j - x are its rows 1..n
    dist = span.distances(torch.zeros(inp.count, dtype=torch.float64))[1:].to(inp.dtype)
    tau_ = _radius(inp, dist, tau, delta, kappa, step_cap)
    total = inp.weights.sum()
    scale = _checked_scale(vetted_scale)
    trust = _vetted_ratio(inp, tau_, dist, scale)
    coef = torch.zeros_like(trust)
    if total > 0:
        share = inp.weights[1:] / total
        coef = share * trust
        if shared_reach and inp.vetted is not None:
            coef = _shared_reach(coef, share, dist, span, tau_, inp.vetted, scale)
    return span.point(torch.cat([coef.new_zeros(1), coef])), trust, tau_


@rule("balance")
def balance(
    inp: Inputs,
    gamma: float = 0.3,
    kappa: float = 1.0,
    lambda_: float = 0.0,
    alpha: float | None = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Accept neighbours close to the own model, then mix them with it (BALANCE).

    Fang, Zhang, Hairi, Khanduri, Liu, Lu, Liu, Gong, "Byzantine-Robust Decentralized
    Federated Learning" (BALANCE), ACM CCS 2024, arXiv:2406.10416. Neighbour j is accepted iff
    ||x_j - x|| <= gamma exp(-kappa lambda_) ||x||, where ``lambda_`` in [0, 1] is the
    training progress t/T. Result: alpha x + (1 - alpha) (weighted mean of accepted),
    or x when none is accepted. ``alpha=None`` uses the normalised self weight
    self_weight / (self_weight + sum of accepted weights) instead. Defaults are the
    paper's (gamma 0.3, kappa 1, alpha 0.5). Trust: 1 accepted, else threshold / distance;
    ``radius`` is the acceptance distance (the threshold).
    """
    gamma, kappa = checked_number(gamma, "gamma", 0.0), checked_number(kappa, "kappa", 0.0)
    lambda_ = checked_number(lambda_, "lambda_", 0.0, 1.0)
    alpha = None if alpha is None else checked_number(alpha, "alpha", 0.0, 1.0)
    span = Span.of(inp)
    threshold = gamma * math.exp(-kappa * lambda_) * math.sqrt(span.own_square)
    dist = span.distances(torch.zeros(inp.count, dtype=torch.float64))[1:].to(inp.dtype)
    accepted = dist <= threshold
    used = accepted & (inp.weights[1:] > 0)
    trust = clip_ratio(threshold, dist)
    c = torch.zeros(inp.count, dtype=torch.float64)  # v = own
    if bool(used.any()):
        w = inp.weights[1:][used]
        a = float(inp.weights[0] / (inp.weights[0] + w.sum())) if alpha is None else alpha
        # a x + (1 - a) (weighted mean of the accepted) = x + (1 - a) sum_j w_j (x_j - x) / sum w
        c[1:][used] = (1 - a) * (w / w.sum()).double()
    return span.point(c), trust, threshold


@rule("ios")
def ios(inp: Inputs, f: int | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Iterative outlier scissor: f times drop the neighbour farthest from the weighted mean.

    Wu, Chen, Ling, "Byzantine-Resilient Decentralized Stochastic Optimization with
    Robust Aggregation Rules", IEEE TSP 2023. The weighted mean includes the own model
    (``self_weight``), which is never removed. ``f`` defaults to ceil(0.2 n) of the n
    neighbours with weight > 0 and is at most n - 1. A distance tie is broken towards
    the larger weight. Trust: 1 if kept, else min(1, r / ||x_j - v||) with r the distance
    of the farthest kept model (own included) to the result v: a removed honest
    neighbour just past the cut keeps most of its trust, a far outlier gets about 0.
    """
    kept = inp.taking_part
    n = int(kept.sum()) - 1
    f = checked_count(f, "f", math.ceil(DEFAULT_BYZANTINE_FRACTION * n), max(0, n - 1))
    span, w = Span.of(inp), inp.weights.to(torch.float64)
    for _ in range(f):
        dist = span.distances(mean_coefficients(w, kept))
        dist[~kept] = -math.inf
        dist[0] = -math.inf  # the own model is never removed
        if float(dist.max()) <= 0:
            break  # every candidate sits on the mean: nothing to scissor
        far = torch.nonzero(dist == dist.max()).flatten()
        kept[far[torch.argmax(w[far])]] = False
    c = mean_coefficients(w, kept)
    dist = span.distances(c)
    trust = torch.where(kept[1:], 1.0, clip_ratio(dist[kept].max(), dist[1:]))
    return span.point(c), trust.to(inp.dtype), None


__all__ = ["balance", "centered_clip", "clipped_gossip", "ios", "median_cap"]
