"""Adaptive attacks: crafted to stay inside what a distance- or clipping-based defence accepts.

Like :mod:`p2pfl.attacks.model`, every attack here reads only ``node.neighbour_states()``
(plus its own honestly trained model ``own`` and the round number). Colluding attackers
of one run share a :class:`Pool`: the union of what each of them receives, minus the
members' own models, so each sees the honest models any colluder legitimately holds.

Model-space adaptation (as in :mod:`p2pfl.attacks.model`): the honest models ``X`` are
the pool's observations (``own`` alone when nothing is observed yet), ``m`` their mean.
The *honest mean update* ``d`` is how that mean moved since the attacker's previous round
(``m - m_prev``); in its first round, or if the mean did not move, ``own - m`` (the
direction our own training took, as :class:`~p2pfl.attacks.model.SignFlip` uses).

The maths are pure functions on flat float64 vectors (``(n, d)`` stacks of honest models,
``(d,)`` directions), tested without a node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from p2pfl.attacks._common import StateLike, choice, integer, number
from p2pfl.attacks.model import Ipm
from p2pfl.core.aggregation import flatten, unflatten
from p2pfl.errors import ConfigError
from p2pfl.node.behaviour import Behaviour, State

if TYPE_CHECKING:
    from p2pfl.node.node import Node

PERTURBATIONS = ("std", "unit", "sign")
BISECTION_STEPS = 60  # halvings of the bracket: far below float64 noise at any scale


# ---------------------------------------------------------------- collusion


class Pool:
    """What colluding attackers share: member ids, their observations, a common direction."""

    def __init__(self) -> None:
        """Create an empty pool; members join when they first craft."""
        self.members: set[str] = set()
        self.observed: dict[str, StateLike] = {}  # freshest model per honest peer
        self.direction: torch.Tensor | None = None  # boiling_frog's frozen push, shared

    def observe(self, member: str, held: Mapping[str, StateLike]) -> dict[str, StateLike]:
        """Register ``member`` and what it holds; return every honest model known, by peer."""
        self.members.add(member)
        self.observed.update(held)
        for peer in self.members & self.observed.keys():
            del self.observed[peer]
        return {peer: self.observed[peer] for peer in sorted(self.observed)}


def _pool(attack: str, pool: object) -> Pool:
    if pool is None:
        return Pool()
    if not isinstance(pool, Pool):
        raise ConfigError(f"attack {attack}: pool must be a Pool, got {type(pool).__name__}")
    return pool


# ---------------------------------------------------------------- pure maths


def largest_fitting(fits: Callable[[float], bool], high: float) -> float:
    """Return the largest ``g`` in ``[0, high]`` with ``fits(g)``, by bisection.

    ``fits`` must hold on an interval starting at 0 (true of every convex constraint
    below that holds at 0). Returns 0 when ``fits(0)`` fails, ``high`` when it fits.
    """
    if not fits(0.0):
        return 0.0
    if fits(high):
        return high
    low = 0.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def perturbation(kind: str, honest: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Return Shejwalkar & Houmansadr's perturbation: ``-std``, ``-unit`` or ``-sign``.

    ``honest``: (n, d); ``direction``: (d,), the honest mean update. ``std`` is the
    coordinate-wise standard deviation of the honest models (0 for one model).
    """
    if kind == "std":
        return -honest.std(dim=0, correction=1 if len(honest) > 1 else 0)
    if kind == "unit":
        norm = torch.linalg.vector_norm(direction)
        return -direction / norm if norm > 0 else torch.zeros_like(direction)
    return -torch.sign(direction)


def min_max_gamma(honest: torch.Tensor, push: torch.Tensor) -> float:
    """Return the largest gamma with ``max_i ||m + gamma push - x_i|| <= max_ij ||x_i - x_j||``."""
    centre, bound = honest.mean(dim=0), float(torch.cdist(honest, honest).max())
    norm = float(torch.linalg.vector_norm(push))
    if norm == 0:
        return 0.0
    reach = float(torch.linalg.vector_norm(honest - centre, dim=1).max())

    def fits(gamma: float) -> bool:
        return float(torch.linalg.vector_norm(honest - (centre + gamma * push), dim=1).max()) <= bound

    return largest_fitting(fits, (bound + reach) / norm)  # triangle inequality: beyond fails


def min_sum_gamma(honest: torch.Tensor, push: torch.Tensor) -> float:
    """Return the largest gamma with ``sum_i ||m + gamma push - x_i||^2 <= max_i sum_j ||x_i - x_j||^2``."""
    centre = honest.mean(dim=0)
    bound = float((torch.cdist(honest, honest) ** 2).sum(dim=1).max())
    norm = float(torch.linalg.vector_norm(push))
    if norm == 0:
        return 0.0

    def fits(gamma: float) -> bool:
        return float(((honest - (centre + gamma * push)) ** 2).sum()) <= bound

    return largest_fitting(fits, math.sqrt(bound / len(honest)) / norm)  # n g^2 |p|^2 <= bound


def clip_aware_step(honest: torch.Tensor, victims: torch.Tensor, unit: torch.Tensor,
                    margin: float) -> float:
    """Return the largest ``s >= 0`` keeping ``m - s unit`` within reach of every victim.

    Victim ``v`` (a row of ``victims``, (k, d)) accepts the model if its distance is at
    most ``margin`` x the median distance from ``v`` to the honest models (its other
    neighbours, as far as we see them; (n, d)). Per victim the allowed ``s`` is an
    interval (a sphere cut by a line): ``s^2 - 2 s b + c <= 0`` with ``b = unit.(m - v)``,
    ``c = ||m - v||^2 - r^2``. Victims that reject even ``m`` (no ``s >= 0``) are left
    out; none left: 0.
    """
    centre = honest.mean(dim=0)
    best = math.inf
    for victim in victims:
        distances = torch.linalg.vector_norm(honest - victim, dim=1)
        others = distances[distances > 0]  # the victim's own model is not a neighbour
        if len(others) == 0:
            continue
        radius = margin * float(others.median())
        offset = centre - victim
        b = float(unit @ offset)
        c = float(offset @ offset) - radius**2
        if b * b - c < 0 or b + math.sqrt(b * b - c) < 0:
            continue
        best = min(best, b + math.sqrt(b * b - c))
    return 0.0 if math.isinf(best) else max(0.0, best)


def spread(honest: torch.Tensor) -> float:
    """Return the honest spread: root mean squared distance of the models to their mean."""
    return float(((honest - honest.mean(dim=0)) ** 2).sum(dim=1).mean().sqrt())


def retarget(labels: torch.Tensor, source: int = 7, target: int = 1) -> torch.Tensor:
    """Return ``labels`` with every ``source`` replaced by ``target`` (the rest unchanged)."""
    return torch.where(labels == source, torch.full_like(labels, target), labels)


# ---------------------------------------------------------------- behaviours


class _Adaptive(Behaviour):
    """Common steps: observe through the pool, flatten, remember the previous mean."""

    def __init__(self, pool: object) -> None:
        self.pool = _pool(str(self.name), pool)
        self._previous: torch.Tensor | None = None  # the honest mean of our last round

    def honest(self, node: Node, own: State) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the honest models as an (n, d) stack and our honest neighbours' rows by peer."""
        held = node.neighbour_states()
        known = self.pool.observe(node.peer_id, held)
        rows = {peer: flatten(state, torch.float64)[0] for peer, state in known.items()}
        stack = torch.stack(list(rows.values())) if rows else flatten(own, torch.float64)[0][None]
        neighbours = held.keys() - self.pool.members
        return stack, {peer: rows[peer] for peer in sorted(neighbours) if peer in rows}

    def mean_update(self, centre: torch.Tensor, own: State) -> torch.Tensor:
        """Return ``m - m_prev`` (then remember ``m``), or ``own - m`` if that is zero."""
        previous, self._previous = self._previous, centre
        if previous is not None and bool((centre != previous).any()):
            return centre - previous
        return flatten(own, torch.float64)[0] - centre


def _announce(vector: torch.Tensor, own: State) -> State:
    return unflatten(vector, flatten(own)[1], own)


class MinMax(_Adaptive):
    """Min-max (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine").

    Announce ``m + gamma p``: ``p`` the perturbation (``std``: -std of the honest models;
    ``unit``: -d/|d|; ``sign``: -sign(d)), ``gamma`` the largest whose farthest distance
    to an honest model is within the honest models' largest pairwise distance (found by
    bisection, as the paper), unless given.
    """

    name = "min_max"

    def __init__(self, perturbation: object = "std", gamma: object = None, pool: object = None) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        super().__init__(pool)
        self.perturbation = choice(self.name, "perturbation", perturbation, PERTURBATIONS)
        self.gamma = None if gamma is None else number(self.name, "gamma", gamma, low=0.0)

    def craft(self, node: Node, round: int, own: State) -> State:
        """Return ``m + gamma p``."""
        honest, _ = self.honest(node, own)
        centre = honest.mean(dim=0)
        push = perturbation(self.perturbation, honest, self.mean_update(centre, own))
        gamma = self.gamma if self.gamma is not None else self.largest_gamma(honest, push)
        return _announce(centre + gamma * push, own)

    def largest_gamma(self, honest: torch.Tensor, push: torch.Tensor) -> float:
        """Return the paper's gamma for this variant."""
        return min_max_gamma(honest, push)


class MinSum(MinMax):
    """Min-sum (same paper): gamma bounds the *summed* squared distance to the honest models.

    The bound is the largest sum of squared distances of one honest model to the others.
    """

    name = "min_sum"

    def largest_gamma(self, honest: torch.Tensor, push: torch.Tensor) -> float:
        """Return the paper's gamma for this variant."""
        return min_sum_gamma(honest, push)


class ClipAware(_Adaptive):
    """Push along minus the honest mean update, staying just inside every victim's clipping.

    Announce ``m - s d/|d|`` with the largest ``s`` such that, for each honest neighbour
    ``v``, the distance to ``v`` is at most ``margin`` x the median distance from ``v`` to
    the honest models (:func:`clip_aware_step`): a median-based clipping radius never
    clips it, so it keeps full trust and pulls every round in the direction it chooses.
    """

    name = "clip_aware"

    def __init__(self, margin: object = 0.95, pool: object = None) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        super().__init__(pool)
        self.margin = number(self.name, "margin", margin, low=0.0, strict=True)

    def craft(self, node: Node, round: int, own: State) -> State:
        """Return the pushed model."""
        honest, neighbours = self.honest(node, own)
        centre = honest.mean(dim=0)
        direction = self.mean_update(centre, own)
        norm = torch.linalg.vector_norm(direction)
        if norm == 0 or not neighbours:
            return _announce(centre, own)
        unit = direction / norm
        step = clip_aware_step(honest, torch.stack(list(neighbours.values())), unit, self.margin)
        return _announce(centre - step * unit, own)


class BoilingFrog(_Adaptive):
    """Slow drift: honest for ``start`` rounds, then ``m`` plus a bias growing every round.

    From round ``start`` on, announce ``m + k step s u`` in the ``k``-th biased round
    (k = round - start + 1), ``s`` the honest spread (:func:`spread`) and ``u`` one unit
    direction fixed at the first biased round (minus the honest mean update), shared by
    the pool so colluders push the same way.
    """

    name = "boiling_frog"

    def __init__(self, start: object = 10, step: object = 0.3, pool: object = None) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        super().__init__(pool)
        self.start = integer(self.name, "start", start, low=0)
        self.step = number(self.name, "step", step, low=0.0)

    def craft(self, node: Node, round: int, own: State) -> State:
        """Return ``own`` before ``start``, then the biased mean."""
        honest, _ = self.honest(node, own)
        centre = honest.mean(dim=0)
        direction = self.mean_update(centre, own)  # keeps m_prev current while honest
        if round < self.start:
            return own
        if self.pool.direction is None or self.pool.direction.shape != centre.shape:
            norm = torch.linalg.vector_norm(direction)
            self.pool.direction = -direction / norm if norm > 0 else torch.zeros_like(direction)
        bias = (round - self.start + 1) * self.step * spread(honest)
        return _announce(centre + bias * self.pool.direction, own)


class IpmUpdate(_Adaptive):
    """Inner product manipulation on the update (Xie, Koyejo, Gupta, UAI 2020).

    The paper's Byzantine update is ``-eps`` times the honest mean update. Honest models
    moved from ``m_prev`` by ``d`` on average, so announce ``m_prev - eps d`` =
    ``m - (1 + eps) d``. Built by ``ipm`` with ``space="update"`` (see :func:`ipm`).
    """

    name = "ipm"

    def __init__(self, eps: object = 10.0, pool: object = None) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        super().__init__(pool)
        self.eps = number(self.name, "eps", eps, low=0.0, strict=True)

    def craft(self, node: Node, round: int, own: State) -> State:
        """Return ``m - (1 + eps) d``."""
        honest, _ = self.honest(node, own)
        centre = honest.mean(dim=0)
        return _announce(centre - (1 + self.eps) * self.mean_update(centre, own), own)


def ipm(eps: object = 10.0, space: object = "model", pool: object = None) -> Behaviour:
    """Build ``ipm``: on the model (:class:`~p2pfl.attacks.model.Ipm`) or on the update."""
    if choice("ipm", "space", space, ("model", "update")) == "update":
        return IpmUpdate(eps, pool)
    return Ipm(eps)


class TargetedFlip(Behaviour):
    """Train honestly on labels with one class relabelled: ``source -> target``.

    Data poisoning, targeted (e.g. Tolpegin et al., ESORICS 2020): the mean accuracy
    barely moves while the source class is misread. The learner factory applies
    :func:`retarget` (``attack_label_map("targeted_flip")``) to the training set.
    """

    name = "targeted_flip"

    def __init__(self, source: object = 7, target: object = 1) -> None:
        """Check and keep the classes (the learner checks they exist)."""
        self.source = integer(self.name, "source", source, low=0)
        self.target = integer(self.name, "target", target, low=0)
        if self.source == self.target:
            raise ConfigError(f"attack {self.name}: source and target must differ, got {self.source}")


__all__ = [
    "PERTURBATIONS",
    "BoilingFrog",
    "ClipAware",
    "IpmUpdate",
    "MinMax",
    "MinSum",
    "Pool",
    "TargetedFlip",
    "clip_aware_step",
    "ipm",
    "largest_fitting",
    "min_max_gamma",
    "min_sum_gamma",
    "perturbation",
    "retarget",
    "spread",
]
