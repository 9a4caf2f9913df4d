"""Robust aggregation rules, registered by name in :data:`RULES`.

Every rule is a pure function centred on the node's own model::

    rule(own, neighbours, weights, *, self_weight=None, **params) -> Aggregate

- ``weights[j] >= 0`` is neighbour ``j``'s relative weight (the node passes mixing
  weight x reputation, x sample share for rules registered with ``uses_samples``: ``mean``). Weight 0 ignores the neighbour's
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
- Each entry of :data:`RULES` is a :class:`RegisteredRule` carrying the capabilities the
  rule declared with ``@rule(name, clipping=..., uses_samples=...)``; the node reads
  those (``RULES[name].clipping``), never a list of names.
- All floating-point tensors are read as one vector per model (float64 if the model has
  a float64 tensor, else float32: half the memory and no slower), a block of columns of
  all the models at a time (:func:`~.flat.column_blocks`): no rule builds the
  (n+1, d) matrix, so a rule needs one model-sized vector (its result) beyond its inputs.
  Non-floating tensors (BatchNorm's ``num_batches_tracked``) keep the own model's value.
  Outputs have the input dtypes and are new tensors (those of the compute dtype views of
  one new vector); inputs are never mutated (they may be views of served payloads).
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

Layout: :mod:`.base` (inputs, registry, shared geometry), :mod:`.flat` (models as
vectors), :mod:`.server_rules` (FedAvg and the classic robust rules) and
:mod:`.gossip_rules` (rules centred on the own model, the default among them).
"""

from p2pfl.core.aggregation.base import (
    DEFAULT_BYZANTINE_FRACTION,
    DEFAULT_RULE,
    DEFAULT_VETTED_SCALE,
    RULES,
    STEP_CAP,
    Aggregate,
    RegisteredRule,
    Rule,
    adaptive_radius,
    aggregate,
)
from p2pfl.core.aggregation.flat import FlatSpec, flat_spec, flatten, unflatten
from p2pfl.core.aggregation.gossip_rules import balance, centered_clip, clipped_gossip, ios
from p2pfl.core.aggregation.server_rules import geomed, krum, mean, median, multi_krum, trimmed_mean

# Deprecated (kept for one release): read ``RULES[name].clipping`` instead.
CLIPPING_RULES = frozenset(name for name, entry in RULES.items() if entry.clipping)

__all__ = [
    "CLIPPING_RULES",
    "DEFAULT_BYZANTINE_FRACTION",
    "DEFAULT_RULE",
    "DEFAULT_VETTED_SCALE",
    "STEP_CAP",
    "RULES",
    "Aggregate",
    "FlatSpec",
    "RegisteredRule",
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
