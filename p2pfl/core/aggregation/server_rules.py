"""Rules from server-side federated learning, applied to a node and its neighbours.

``mean`` (FedAvg), and the classic robust ones: coordinate-wise ``median`` and
``trimmed_mean``, ``krum``/``multi_krum`` and the geometric median (``geomed``).
"""

from __future__ import annotations

import math

import torch

from p2pfl.core.aggregation.base import (
    Inputs,
    Span,
    checked_count,
    checked_number,
    clip_ratio,
    default_trim,
    full_trust,
    mean_coefficients,
    relative_distance_trust,
    rule,
)
from p2pfl.errors import AggregationError


@rule("mean", uses_samples=True)
def mean(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Weighted average of the own model and the neighbours (FedAvg).

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017. Not robust: one neighbour moves the result arbitrarily far.
    Pass sample counts (x mixing weight) as weights and the own sample count as
    ``self_weight``. Trust: 1 for every finite neighbour.
    """
    return inp.combine(mean_coefficients(inp.weights, inp.taking_part)), full_trust(inp), None


@rule("median")
def median(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Coordinate-wise median of the own model and the neighbours with weight > 0.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018. Unweighted (weights only select who takes
    part); with an even count the two middle values are averaged. Trust: see ``geomed``
    (min(1, r / ||x_j - median||), r the median participant distance), which stays
    meaningful up to the breakdown point, unlike a per-coordinate band.
    """
    mask, v = inp.taking_part, torch.empty(inp.size, dtype=inp.dtype)
    squares = torch.zeros(inp.count, dtype=torch.float64)  # ||x_i - v||^2, block by block
    for where, rows in inp.blocks():
        s = torch.sort(rows[mask], dim=0).values  # (k, b), ascending per coordinate
        k = s.shape[0]
        low, high = s[(k - 1) // 2], s[k // 2]
        v[where] = low + (high - low) / 2
        squares += torch.linalg.vector_norm(rows - v[where], dim=1).double().square()
    return v, relative_distance_trust(inp, squares.sqrt().to(inp.dtype)), None


@rule("trimmed_mean")
def trimmed_mean(inp: Inputs, trim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Coordinate-wise trimmed mean: drop the ``trim`` largest and smallest per coordinate.

    Yin et al., ICML 2018 (see ``median``). Over the k models taking part (own + weight
    > 0), unweighted. ``trim`` defaults to ceil(0.2 k) and is at most (k-1)//2. Trust:
    the share of a neighbour's coordinates that were kept (inside the kept band),
    relative to the expected (k - 2 trim) / k, capped at 1.
    """
    mask, v = inp.taking_part, torch.empty(inp.size, dtype=inp.dtype)
    k = int(mask.sum())
    b = checked_count(trim, "trim", default_trim(k), (k - 1) // 2)
    inside = torch.zeros(inp.count - 1, dtype=torch.int64)  # coordinates in the kept band
    for where, rows in inp.blocks():
        s = torch.sort(rows[mask], dim=0).values  # (k, b), ascending per coordinate
        v[where] = s[b : k - b].mean(dim=0)
        inside += ((rows[1:] >= s[b]) & (rows[1:] <= s[k - 1 - b])).sum(dim=1)
    if inp.size == 0:
        return v, torch.ones(inp.count - 1, dtype=inp.dtype), None
    return v, inside.to(inp.dtype) / (inp.size * (k - 2 * b) / k), None


def _krum_scores(inp: Inputs, f: int) -> torch.Tensor:
    """Return each row's sum of squared distances to its k - f - 2 nearest participants."""
    mask = inp.taking_part
    k = int(mask.sum())
    if k == 1:
        return torch.zeros(inp.count, dtype=torch.float64)
    gram = Span.of(inp).gram  # (n+1, n+1)
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    d2[:, ~mask] = math.inf  # scores count distances to participants only
    d2.fill_diagonal_(math.inf)
    nearest = max(1, min(k - f - 2, k - 1))
    return torch.sort(d2, dim=1).values[:, :nearest].sum(dim=1)


def _best(inp: Inputs, scores: torch.Tensor, m: int) -> torch.Tensor:
    """Mark rows scoring no worse than the m-th best participant (ties all included)."""
    boundary = torch.sort(scores[inp.taking_part]).values[m - 1]
    # Candidates tied with the m-th best are all selected, so neighbour order never matters.
    tol = boundary.abs() * torch.finfo(inp.dtype).eps * 64  # Gram in the model's dtype
    return (scores <= boundary + tol) & torch.cat([torch.ones(1, dtype=torch.bool), inp.finite])


def _krum(inp: Inputs, f: int | None, m: int | None) -> tuple[torch.Tensor, torch.Tensor, None]:
    k = int(inp.taking_part.sum())
    f = checked_count(f, "f", (k - 3) // 2, max(0, (k - 3) // 2))
    m = k - f if m is None else checked_count(m, "m", 1, k)
    if m < 1:
        raise AggregationError(f"m must be >= 1, got {m}")
    scores = _krum_scores(inp, f)
    used = _best(inp, scores, m) & inp.taking_part
    # Distance units (scores are squared): a neighbour just past the cut scores near 1.
    boundary = torch.sort(scores[inp.taking_part]).values[k - f - 1]
    trust = torch.where(used, 1.0, clip_ratio(boundary.sqrt(), scores.sqrt()))
    return inp.combine(mean_coefficients(inp.weights, used)), trust[1:].to(inp.dtype), None


@rule("krum")
def krum(inp: Inputs, f: int | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Return the model with the smallest Krum score.

    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS 2017. Score of a model: sum of squared
    distances to its k - f - 2 nearest other participants (own + weight > 0). ``f``
    (assumed Byzantine count) defaults to, and is capped at, max(0, (k-3)//2). Ties are
    averaged. Trust: 1 if selected, else min(1, sqrt(s* / s_j)) with s* the (k - f)-th
    best score, i.e. 1 for the k - f models multi-Krum would average and a distance-like
    ratio beyond (a zero-weight neighbour is scored against the participants). Krum uses
    one model, but calling every other honest neighbour an outlier each round would ruin
    honest reputations.
    """
    return _krum(inp, f, 1)


@rule("multi_krum")
def multi_krum(
    inp: Inputs, f: int | None = None, m: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Average (weighted) the ``m`` models with the best Krum scores (Blanchard et al. 2017).

    ``m`` defaults to k - f (El Mhamdi et al., ICML 2018); see ``krum`` for ``f`` and trust.
    """
    return _krum(inp, f, m)


@rule("geomed")
def geomed(
    inp: Inputs, nu: float = 1e-6, iters: int = 100, tol: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Weighted geometric median by the smoothed Weiszfeld algorithm (RFA).

    Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP
    2022. Starts from the weighted mean; v <- sum_i b_i x_i / sum_i b_i with
    b_i = w_i / max(nu, ||x_i - v||), at most ``iters`` times, stopping when a step is
    below ``tol`` (at least 8 machine epsilons) x max(1, ||v||); about 10-20 iterations
    in practice. Trust: min(1, r / ||x_j - v||) with r the median
    distance of the participants to v, i.e. a neighbour's Weiszfeld weight relative to
    the median participant's.
    """
    nu = checked_number(nu, "nu", 0.0)
    tol = max(checked_number(tol, "tol", 0.0), 8 * torch.finfo(inp.dtype).eps)
    iters = checked_count(iters, "iters", 100, 10_000)
    span, mask = Span.of(inp), inp.taking_part
    w = inp.weights.to(torch.float64) * mask
    w = w if w.sum() > 0 else mask.to(torch.float64)
    c = w / w.sum()  # start from the weighted mean
    for _ in range(iters):
        beta = w / span.distances(c).clamp_min(max(nu, torch.finfo(torch.float64).tiny))
        step, c = span.norm(beta / beta.sum() - c), beta / beta.sum()
        if step <= tol * max(1.0, span.point_norm(c)):
            break
    return span.point(c), relative_distance_trust(inp, span.distances(c)), None


__all__ = ["geomed", "krum", "mean", "median", "multi_krum", "trimmed_mean"]
