"""Robust aggregation rules, registered by name in :data:`RULES`.

Every rule is a pure function centred on the node's own model::

    rule(own, neighbours, weights, *, self_weight=None, **params) -> Aggregate

- ``weights[j] >= 0`` is neighbour ``j``'s relative weight (the node passes mixing
  weight x reputation, x sample share for ``mean``). Weight 0 ignores the neighbour's
  model but it still gets a ``trust`` value, so an excluded peer can earn its way back.
- ``self_weight >= 0`` weighs the own model; ``None`` (the default for every rule) means
  "as much as an average neighbour": the mean of the positive neighbour weights, or 1.0
  when there are none. With uniform neighbour weights the own model's normalised weight is
  then 1/(n+1), the Metropolis-style diagonal. For ``mean`` the node passes its own
  sample count. Rules that ignore weights (``median``, ``trimmed_mean``, Krum selection)
  always include the own model and every neighbour with weight > 0.
- Two more context keywords every rule accepts: ``own_step``, the length of the node's
  last local update (clipping rules bound each pull by a few of it), and ``vetted``, one
  flag per neighbour that the node checked does no harm when mixed at its weight
  (:mod:`p2pfl.node.harm`): clipping rules use those in full. Other rules ignore both.
- All floating-point tensors are flattened into one vector per model (float64 if the
  model has a float64 tensor, else float32: half the memory and no slower); non-floating
  tensors (BatchNorm's ``num_batches_tracked``) keep the own model's value. Outputs have
  the input dtypes and are new tensors; inputs are never mutated.
- A neighbour holding NaN/Inf, or values so large (norm above sqrt(dtype max)/16, about
  1e18 in float32) that distances would overflow, is excluded with trust 0 instead of
  raising: a peer must not be able to make the node fail. Disagreeing keys/shapes/dtypes, a non-finite own model and
  bad parameters raise :class:`~p2pfl.errors.AggregationError`.
- ``Aggregate.trust[j]`` in [0, 1] says how much of neighbour ``j``'s model was used:
  1 in full; for clipping rules the clip ratio; for rules that select or cut, the ratio
  of the rule's cut-off distance to the neighbour's distance, so an honest neighbour just
  past the cut keeps a trust near 1 and a far outlier gets about 0 (each rule says how);
  0 for a non-finite model. The node turns it into reputation evidence, so a rule that
  drops f honest models every round must not call them outliers. ``Aggregate.radius``
  is the clipping radius or acceptance distance of rules that have one.

``f``/``trim``/``delta`` defaults assume a Byzantine share of
:data:`DEFAULT_BYZANTINE_FRACTION`; a count too large for the inputs at hand (neighbours
drop out) is reduced to the largest admissible one rather than raising.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pfl.core.codec import State
from p2pfl.core.state import mismatch, template_of
from p2pfl.errors import AggregationError

log = logging.getLogger(__name__)

Model = Mapping[str, torch.Tensor]
DEFAULT_RULE = "clipped_gossip"
DEFAULT_BYZANTINE_FRACTION = 0.2
# Radius cap in units of the weighted median distance (see median_cap): honest
# neighbours on non-IID data sit within ~2x of each other's distance.
DEFAULT_MEDIAN_CAP = 2.0
# Radius cap in units of the node's own last local update (``own_step``), when given.
STEP_CAP = 4.0
# Rules with a clipping radius: they use ``own_step`` and ``vetted``.
CLIPPING_RULES = frozenset({"clipped_gossip", "centered_clip"})


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The result of one aggregation."""

    state: State  # the new own model (new tensors)
    trust: tuple[float, ...]  # per neighbour, in [0, 1]: share of its model used
    radius: float | None = None  # clipping radius / acceptance distance, if the rule has one


Rule = Callable[..., Aggregate]
RULES: dict[str, Rule] = {}


@dataclass(frozen=True, slots=True)
class FlatSpec:
    """Where each floating-point tensor of a state lives in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    size: int

    def slices(self) -> list[tuple[str, slice]]:
        """Return each floating tensor's name and its slice of the vector."""
        ends = (*self.offsets[1:], self.size)
        return [(n, slice(a, b)) for n, a, b in zip(self.names, self.offsets, ends, strict=True)]


def flat_spec(state: Model) -> FlatSpec:
    """Describe the floating-point tensors of ``state`` in key order."""
    names, shapes, dtypes, offsets, size = [], [], [], [], 0
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise AggregationError(f"{name!r}: not a tensor ({type(tensor).__name__})")
        if tensor.is_floating_point():
            names.append(name)
            shapes.append(tensor.shape)
            dtypes.append(tensor.dtype)
            offsets.append(size)
            size += tensor.numel()
    return FlatSpec(tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets), size)


def _compute_dtype(spec: FlatSpec) -> torch.dtype:
    return torch.float64 if torch.float64 in spec.dtypes else torch.float32


def flatten(state: Model, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, FlatSpec]:
    """Concatenate the floating-point tensors of ``state`` into one new 1-D vector."""
    spec = flat_spec(state)
    vector = torch.empty(spec.size, dtype=dtype or _compute_dtype(spec))
    _fill(vector, state, spec)
    return vector, spec


def _fill(out: torch.Tensor, state: Model, spec: FlatSpec) -> None:
    for name, where in spec.slices():
        out[where].copy_(state[name].reshape(-1))


def unflatten(vector: torch.Tensor, spec: FlatSpec, like: Model) -> State:
    """Rebuild a state: floating tensors from ``vector``, all others copied from ``like``."""
    floating = set(spec.names)
    state = {name: t if name in floating else t.clone() for name, t in like.items()}
    for (name, where), shape, dtype in zip(spec.slices(), spec.shapes, spec.dtypes, strict=True):
        state[name] = vector[where].to(dtype).reshape(shape).clone()
    return state


# --- validation and stacking ------------------------------------------------------------


def _check_weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AggregationError(f"{what} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise AggregationError(f"{what} must be finite and >= 0, got {value!r}")
    return float(value)


def _nonfinite_key(row: torch.Tensor, spec: FlatSpec) -> str | None:
    for name, where in spec.slices():
        if not bool(torch.isfinite(row[where]).all()):
            return name
    return None


def _unusable_rows(rows: torch.Tensor, spec: FlatSpec) -> list[tuple[int, str]]:
    """Find rows with NaN/Inf, or so large that squared distances would overflow."""
    # One fused pass: NaN/Inf make the norm non-finite. Norms below sqrt(max)/16 keep
    # every squared distance and Gram entry finite, and no trained model comes close.
    limit = math.sqrt(torch.finfo(rows.dtype).max) / 16
    norms = torch.linalg.vector_norm(rows, dim=1)
    found = []
    for i in torch.nonzero(~(norms <= limit)).flatten().tolist():
        key = _nonfinite_key(rows[i], spec)
        found.append((i, f"non-finite values in {key!r}" if key else "values too large"))
    return found


@dataclass(frozen=True, slots=True)
class _Inputs:
    """Own model and neighbours stacked once: row 0 own, row j+1 neighbour j."""

    rows: torch.Tensor  # (n+1, d)
    weights: torch.Tensor  # (n+1,): self weight, then neighbour weights (0 if excluded)
    finite: torch.Tensor  # (n,) bool: neighbour had only finite values
    own_step: float | None = None  # length of the node's own last local update, if known
    vetted: torch.Tensor | None = None  # (n,) bool: the node checked these pulls are harmless

    @property
    def own(self) -> torch.Tensor:
        return self.rows[0]

    @property
    def neighbours(self) -> torch.Tensor:
        return self.rows[1:]

    @property
    def taking_part(self) -> torch.Tensor:
        """Return the (n+1,) mask of rows in the aggregate: own and weight > 0."""
        mask = self.weights > 0
        mask[0] = True
        return mask

    def participants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (k, d) rows and (k,) weights of the models taking part, own first."""
        mask = self.taking_part
        if bool(mask.all()):
            return self.rows, self.weights
        return self.rows[mask], self.weights[mask]


def _prepare(
    own: Model, neighbours: Sequence[Model], weights: Sequence[float], self_weight: Any
) -> tuple[_Inputs, FlatSpec]:
    if len(weights) != len(neighbours):
        raise AggregationError(f"{len(weights)} weights for {len(neighbours)} neighbours")
    ws = [_check_weight(w, f"weights[{j}]") for j, w in enumerate(weights)]
    if self_weight is None:
        positive = [w for w in ws if w > 0]
        self_weight = sum(positive) / len(positive) if positive else 1.0
    ws.insert(0, _check_weight(self_weight, "self_weight"))
    spec = flat_spec(own)
    reference = template_of(own)
    for j, other in enumerate(neighbours):
        if problem := mismatch(reference, other):
            raise AggregationError(f"neighbour {j}: {problem}")
    rows = torch.empty(len(neighbours) + 1, spec.size, dtype=_compute_dtype(spec))
    for row, state in zip(rows, (own, *neighbours), strict=True):
        _fill(row, state, spec)
    finite = torch.ones(len(rows), dtype=torch.bool)
    for i, problem in _unusable_rows(rows, spec):
        if i == 0:
            raise AggregationError(f"own model has {problem}")
        log.debug("neighbour %d excluded: %s", i - 1, problem)
        finite[i] = False
        ws[i] = 0.0
        rows[i].zero_()  # keeps NaN/Inf out of shared computations (Gram matrix, sorts)
    w = torch.tensor(ws, dtype=rows.dtype)
    return _Inputs(rows, w, finite[1:]), spec


# --- registration -------------------------------------------------------------------------

_Core = Callable[..., tuple[torch.Tensor, torch.Tensor, float | None]]


def rule(name: str) -> Callable[[_Core], Rule]:
    """Register a rule core ``(inputs, **params) -> (vector, trust, radius)`` as ``name``."""

    def register(core: _Core) -> Rule:
        allowed = [p for p in inspect.signature(core).parameters if p != "inp"]

        def apply(
            own: Model,
            neighbours: Sequence[Model],
            weights: Sequence[float],
            *,
            self_weight: float | None = None,
            own_step: float | None = None,
            vetted: Sequence[bool] | None = None,
            **params: Any,
        ) -> Aggregate:
            if unknown := sorted(set(params) - set(allowed)):
                raise AggregationError(
                    f"{name}: unknown parameter {unknown[0]!r}; accepted: {', '.join(allowed)}"
                )
            inp, spec = _prepare(own, neighbours, weights, self_weight)
            if own_step is not None:
                inp = dataclasses.replace(inp, own_step=_number(own_step, "own_step", 0.0))
            if vetted is not None:
                if len(vetted) != len(neighbours):
                    raise AggregationError(
                        f"vetted: {len(vetted)} flags for {len(neighbours)} neighbours"
                    )
                flags = torch.tensor([bool(v) for v in vetted], dtype=torch.bool)
                inp = dataclasses.replace(inp, vetted=flags & inp.finite)
            vector, trust, radius = core(inp, **params)
            trust = torch.where(inp.finite, trust.clamp(0.0, 1.0), 0.0)
            return Aggregate(unflatten(vector, spec, own), tuple(trust.tolist()), radius)

        # Not functools.wraps: it would advertise the core's (inputs, ...) signature.
        apply.__name__ = apply.__qualname__ = core.__name__
        apply.__doc__ = core.__doc__
        RULES[name] = apply
        return apply

    return register


def aggregate(
    name: str,
    own: Model,
    neighbours: Sequence[Model],
    weights: Sequence[float],
    **params: Any,
) -> Aggregate:
    """Aggregate with the rule registered as ``name``; see the module docstring."""
    try:
        chosen = RULES[name]
    except KeyError:
        raise AggregationError(
            f"unknown rule {name!r}; choose one of {', '.join(sorted(RULES))}"
        ) from None
    return chosen(own, neighbours, weights, **params)


# --- parameters and shared pieces --------------------------------------------------------


def _count(value: Any, name: str, default: int, cap: int) -> int:
    """Validate an optional count parameter, reduced to ``cap`` when inputs are few."""
    if value is None:
        return max(0, min(default, cap))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AggregationError(f"{name} must be an integer >= 0, got {value!r}")
    return max(0, min(value, cap))


def _number(value: Any, name: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AggregationError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise AggregationError(f"{name} must be finite and in [{low}, {high}], got {value!r}")
    return float(value)


def _weighted_mean(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Return sum_i w_i x_i / sum_i w_i, or the plain mean when all weights are 0."""
    total = w.sum()
    if total <= 0:
        return rows.mean(dim=0)
    return (w / total) @ rows  # (k,) @ (k, d) -> (d,)


def _ratio(radius: float | torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Return min(1, radius / dist) elementwise (1 where dist <= radius, including 0/0)."""
    inside = dist <= radius
    return torch.where(inside, 1.0, radius / dist.clamp_min(torch.finfo(dist.dtype).tiny))


def _distances(rows: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(rows - centre, dim=1)


def _default_trim(k: int) -> int:
    # ceil rather than floor: with the usual 3-8 neighbours floor(0.2 k) is often 0, i.e.
    # no robustness at all.
    return min(math.ceil(DEFAULT_BYZANTINE_FRACTION * k), (k - 1) // 2)


def _relative_distance_trust(inp: _Inputs, dist: torch.Tensor) -> torch.Tensor:
    """Return min(1, r / dist_j) for the neighbours, r the participants' median distance."""
    reference = torch.quantile(dist[inp.taking_part], 0.5)
    return _ratio(reference, dist[1:])


@dataclass(frozen=True, slots=True)
class _Span:
    """Points v = own + c @ D (D: rows centred on own), measured via the Gram matrix.

    Iterative rules (geomed, centered_clip, ios) only form affine combinations of the
    rows, so with coefficients ``c`` each iteration costs O(n^2) instead of passes over
    all d parameters, and the vector is built once at the end. Centring on own keeps the
    Gram entries at the scale of the spread, so the distance formula does not cancel.
    """

    own: torch.Tensor  # (d,)
    centred: torch.Tensor  # (n+1, d)
    gram: torch.Tensor  # (n+1, n+1), float64
    own_dots: torch.Tensor  # (n+1,) float64: D @ own, for ||v||

    @classmethod
    def of(cls, inp: _Inputs) -> _Span:
        centred = inp.rows - inp.own
        gram = (centred @ centred.T).to(torch.float64)
        return cls(inp.own, centred, gram, (centred @ inp.own).to(torch.float64))

    def distances(self, c: torch.Tensor) -> torch.Tensor:
        """Return ||x_i - v|| for every row i, v = own + c @ D."""
        gc = self.gram @ c
        return (self.gram.diagonal() - 2 * gc + c @ gc).clamp_min(0).sqrt()

    def norm(self, c: torch.Tensor) -> float:
        """Return ||c @ D||."""
        return float((c @ self.gram @ c).clamp_min(0).sqrt())

    def point_norm(self, c: torch.Tensor) -> float:
        """Return ||own + c @ D||."""
        own_sq = float(self.own.to(torch.float64).square().sum())
        return math.sqrt(max(0.0, own_sq + 2 * float(c @ self.own_dots)) + self.norm(c) ** 2)

    def point(self, c: torch.Tensor) -> torch.Tensor:
        return self.own + c.to(self.centred.dtype) @ self.centred


def _mean_coefficients(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the coefficients of the weighted mean of the masked rows (plain if all 0)."""
    wm = w * mask
    return wm / wm.sum() if wm.sum() > 0 else mask.to(w.dtype) / mask.sum()


def _band_trust(inp: _Inputs, low: torch.Tensor, high: torch.Tensor, kept: float) -> torch.Tensor:
    """Share of coordinates inside [low, high], relative to the ``kept`` share expected."""
    if inp.rows.shape[1] == 0:
        return torch.ones(len(inp.finite), dtype=inp.rows.dtype)
    inside = ((inp.neighbours >= low) & (inp.neighbours <= high)).sum(dim=1)
    return inside.to(inp.rows.dtype) / (inp.rows.shape[1] * kept)


def adaptive_radius(dist: torch.Tensor, w: torch.Tensor, delta: float) -> float:
    """Return the clipping radius that leaves at least ``delta`` of the weight outside.

    The radius is the largest neighbour distance ``d`` such that neighbours at distance
    ``<= d`` hold at most ``1 - delta`` of the (normalised) neighbour weight; when even the
    closest group holds more, its distance. If the Byzantine weight is below ``delta``,
    the radius is then at most the farthest honest neighbour's distance, whatever the
    Byzantine neighbours send. Ties in distance are decided as a group so the result does
    not depend on neighbour order.
    """
    if len(dist) == 0 or w.sum() <= 0:
        return 0.0
    order = torch.argsort(dist)
    d, cum = dist[order], torch.cumsum(w[order] / w.sum(), dim=0)
    group_end = torch.ones_like(d, dtype=torch.bool)
    group_end[:-1] = d[:-1] < d[1:]
    ok = group_end & (cum <= 1.0 - delta + 1e-9)
    if not bool(ok.any()):
        return float(d[group_end][0])
    return float(d[ok][-1])


# --- rules --------------------------------------------------------------------------------


def _ones(inp: _Inputs) -> torch.Tensor:
    return torch.ones(len(inp.finite), dtype=inp.rows.dtype)


@rule("mean")
def mean(inp: _Inputs) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Weighted average of the own model and the neighbours (FedAvg).

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017. Not robust: one neighbour moves the result arbitrarily far.
    Pass sample counts (x mixing weight) as weights and the own sample count as
    ``self_weight``. Trust: 1 for every finite neighbour.
    """
    rows, w = inp.participants()
    return _weighted_mean(rows, w), _ones(inp), None


def _sorted(inp: _Inputs) -> torch.Tensor:
    rows, _ = inp.participants()
    return torch.sort(rows, dim=0).values  # (k, d), ascending per coordinate


@rule("median")
def median(inp: _Inputs) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Coordinate-wise median of the own model and the neighbours with weight > 0.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018. Unweighted (weights only select who takes
    part); with an even count the two middle values are averaged. Trust: see ``geomed``
    (min(1, r / ||x_j - median||), r the median participant distance), which stays
    meaningful up to the breakdown point, unlike a per-coordinate band.
    """
    s = _sorted(inp)
    k = s.shape[0]
    low, high = s[(k - 1) // 2], s[k // 2]
    v = low + (high - low) / 2
    return v, _relative_distance_trust(inp, _distances(inp.rows, v)), None


@rule("trimmed_mean")
def trimmed_mean(inp: _Inputs, trim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Coordinate-wise trimmed mean: drop the ``trim`` largest and smallest per coordinate.

    Yin et al., ICML 2018 (see ``median``). Over the k models taking part (own + weight
    > 0), unweighted. ``trim`` defaults to ceil(0.2 k) and is at most (k-1)//2. Trust:
    the share of a neighbour's coordinates that were kept (inside the kept band),
    relative to the expected (k - 2 trim) / k, capped at 1.
    """
    s = _sorted(inp)
    k = s.shape[0]
    b = _count(trim, "trim", _default_trim(k), (k - 1) // 2)
    return s[b : k - b].mean(dim=0), _band_trust(inp, s[b], s[k - 1 - b], (k - 2 * b) / k), None


def _krum_scores(inp: _Inputs, f: int) -> torch.Tensor:
    """Return each row's sum of squared distances to its k - f - 2 nearest participants."""
    mask = inp.taking_part
    k = int(mask.sum())
    if k == 1:
        return torch.zeros(len(inp.rows), dtype=torch.float64)
    gram = _Span.of(inp).gram  # (n+1, n+1)
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    d2[:, ~mask] = math.inf  # scores count distances to participants only
    d2.fill_diagonal_(math.inf)
    nearest = max(1, min(k - f - 2, k - 1))
    return torch.sort(d2, dim=1).values[:, :nearest].sum(dim=1)


def _best(inp: _Inputs, scores: torch.Tensor, m: int) -> torch.Tensor:
    """Mark rows scoring no worse than the m-th best participant (ties all included)."""
    boundary = torch.sort(scores[inp.taking_part]).values[m - 1]
    # Candidates tied with the m-th best are all selected, so neighbour order never matters.
    tol = boundary.abs() * torch.finfo(inp.rows.dtype).eps * 64  # Gram in the model's dtype
    return (scores <= boundary + tol) & torch.cat([torch.ones(1, dtype=torch.bool), inp.finite])


def _krum(inp: _Inputs, f: int | None, m: int | None) -> tuple[torch.Tensor, torch.Tensor, None]:
    k = int(inp.taking_part.sum())
    f = _count(f, "f", (k - 3) // 2, max(0, (k - 3) // 2))
    m = k - f if m is None else _count(m, "m", 1, k)
    if m < 1:
        raise AggregationError(f"m must be >= 1, got {m}")
    scores = _krum_scores(inp, f)
    used = _best(inp, scores, m) & inp.taking_part
    # Distance units (scores are squared): a neighbour just past the cut scores near 1.
    boundary = torch.sort(scores[inp.taking_part]).values[k - f - 1]
    trust = torch.where(used, 1.0, _ratio(boundary.sqrt(), scores.sqrt()))
    return _weighted_mean(inp.rows[used], inp.weights[used]), trust[1:].to(inp.rows.dtype), None


@rule("krum")
def krum(inp: _Inputs, f: int | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
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
    inp: _Inputs, f: int | None = None, m: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Average (weighted) the ``m`` models with the best Krum scores (Blanchard et al. 2017).

    ``m`` defaults to k - f (El Mhamdi et al., ICML 2018); see ``krum`` for ``f`` and trust.
    """
    return _krum(inp, f, m)


@rule("geomed")
def geomed(
    inp: _Inputs, nu: float = 1e-6, iters: int = 100, tol: float = 1e-7
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
    nu = _number(nu, "nu", 0.0)
    tol = max(_number(tol, "tol", 0.0), 8 * torch.finfo(inp.rows.dtype).eps)
    iters = _count(iters, "iters", 100, 10_000)
    span, mask = _Span.of(inp), inp.taking_part
    w = inp.weights.to(torch.float64) * mask
    w = w if w.sum() > 0 else mask.to(torch.float64)
    c = w / w.sum()  # start from the weighted mean
    for _ in range(iters):
        beta = w / span.distances(c).clamp_min(max(nu, torch.finfo(torch.float64).tiny))
        step, c = span.norm(beta / beta.sum() - c), beta / beta.sum()
        if step <= tol * max(1.0, span.point_norm(c)):
            break
    return span.point(c), _relative_distance_trust(inp, span.distances(c)), None


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


def _radius(inp: _Inputs, dist: torch.Tensor, tau: float | None, delta: float, kappa: float) -> float:
    if tau is not None:
        return _number(tau, "tau", 0.0)
    delta = _number(delta, "delta", 0.0, 1.0)
    kappa = _number(kappa, "kappa", 0.0)
    taking = inp.taking_part[1:]
    dist, w = dist[taking], inp.weights[1:][taking]
    radius = adaptive_radius(dist, w, delta)
    if len(dist):
        radius = min(radius, median_cap(dist, w, kappa))
    if inp.own_step:
        # Self-centred: however many neighbours attack, nobody pulls the model further per
        # round than a few of its own local updates would (it still mixes, just slower)...
        step_cap = STEP_CAP * inp.own_step
        reputable = dist[w > 0]
        if len(reputable):
            # ...except the nearest reputable neighbour: a node that drifted from the
            # network (its own steps shrink as it fits its local data) would otherwise
            # distrust its honest neighbours one by one and end up alone (the attack grid
            # showed it: an honest node with one honest neighbour of four fell to 0.49).
            step_cap = max(step_cap, float(reputable.min()))
        radius = min(radius, step_cap)
    return radius


def _unclipped_if_vetted(inp: _Inputs, ratio: torch.Tensor) -> torch.Tensor:
    """Clip ratios, with neighbours the node vetted (``vetted``) used in full."""
    if inp.vetted is None:
        return ratio
    return torch.where(inp.vetted, torch.ones_like(ratio), ratio)


@rule("centered_clip")
def centered_clip(
    inp: _Inputs,
    tau: float | None = None,
    iters: int = 3,
    delta: float = DEFAULT_BYZANTINE_FRACTION,
    kappa: float = DEFAULT_MEDIAN_CAP,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centered clipping: v <- v + sum_i w_i clip(x_i - v, tau) / sum_i w_i, from v = own.

    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021. The sum runs over the own model (``self_weight``) and the neighbours, for
    ``iters`` (L) iterations. ``tau`` fixed, or None: the adaptive radius of
    ``clipped_gossip`` (``delta``) measured at the start; one iteration then equals
    ``clipped_gossip``. Trust: the clip ratio min(1, tau / ||x_j - v||) of the last
    iteration.
    """
    iters = _count(iters, "iters", 3, 10_000)
    span = _Span.of(inp)
    c = torch.zeros(len(inp.rows), dtype=torch.float64)  # v = own
    tau_ = _radius(inp, span.distances(c)[1:], tau, delta, kappa)
    w = inp.weights.to(torch.float64)
    w = w / w.sum() if w.sum() > 0 else w
    centre = c
    for _ in range(iters):
        centre = c
        # v + sum_i s_i (x_i - v) with x_i - v = (e_i - c) @ D
        ratio = _ratio(tau_, span.distances(c))
        ratio[1:] = _unclipped_if_vetted(inp, ratio[1:])
        s = w * ratio
        c = c * (1 - s.sum()) + s
    trust = _unclipped_if_vetted(inp, _ratio(tau_, span.distances(centre)[1:]))
    return span.point(c), trust.to(inp.rows.dtype), tau_


@rule("clipped_gossip")
def clipped_gossip(
    inp: _Inputs,
    tau: float | None = None,
    delta: float = DEFAULT_BYZANTINE_FRACTION,
    kappa: float = DEFAULT_MEDIAN_CAP,
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
    node and its honest neighbours hold the majority of the weight.
    """
    diffs = inp.neighbours - inp.own  # (n, d)
    dist = torch.linalg.vector_norm(diffs, dim=1)
    tau_ = _radius(inp, dist, tau, delta, kappa)
    total = inp.weights.sum()
    trust = _unclipped_if_vetted(inp, _ratio(tau_, dist))
    if total <= 0:
        return inp.own.clone(), trust, tau_
    return inp.own + (inp.weights[1:] / total * trust) @ diffs, trust, tau_


@rule("balance")
def balance(
    inp: _Inputs,
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
    gamma, kappa = _number(gamma, "gamma", 0.0), _number(kappa, "kappa", 0.0)
    lambda_ = _number(lambda_, "lambda_", 0.0, 1.0)
    alpha = None if alpha is None else _number(alpha, "alpha", 0.0, 1.0)
    threshold = gamma * math.exp(-kappa * lambda_) * float(inp.own.norm())
    dist = _distances(inp.neighbours, inp.own)
    accepted = dist <= threshold
    used = accepted & (inp.weights[1:] > 0)
    trust = _ratio(threshold, dist)
    if not bool(used.any()):
        return inp.own.clone(), trust, threshold
    w = inp.weights[1:][used]
    a = float(inp.weights[0] / (inp.weights[0] + w.sum())) if alpha is None else alpha
    return a * inp.own + (1 - a) * _weighted_mean(inp.neighbours[used], w), trust, threshold


@rule("ios")
def ios(inp: _Inputs, f: int | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
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
    f = _count(f, "f", math.ceil(DEFAULT_BYZANTINE_FRACTION * n), max(0, n - 1))
    span, w = _Span.of(inp), inp.weights.to(torch.float64)
    for _ in range(f):
        dist = span.distances(_mean_coefficients(w, kept))
        dist[~kept] = -math.inf
        dist[0] = -math.inf  # the own model is never removed
        if float(dist.max()) <= 0:
            break  # every candidate sits on the mean: nothing to scissor
        far = torch.nonzero(dist == dist.max()).flatten()
        kept[far[torch.argmax(w[far])]] = False
    c = _mean_coefficients(w, kept)
    dist = span.distances(c)
    trust = torch.where(kept[1:], 1.0, _ratio(dist[kept].max(), dist[1:]))
    return span.point(c), trust.to(inp.rows.dtype), None


__all__ = [
    "DEFAULT_BYZANTINE_FRACTION",
    "DEFAULT_RULE",
    "RULES",
    "Aggregate",
    "FlatSpec",
    "Rule",
    "adaptive_radius",
    "aggregate",
    "balance",
    "centered_clip",
    "clipped_gossip",
    "flat_spec",
    "flatten",
    "geomed",
    "ios",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "trimmed_mean",
    "unflatten",
]
