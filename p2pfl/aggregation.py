"""Public name of the aggregation rules: ``p2pfl.aggregation.RULES``.

The rules live in :mod:`p2pfl.core.aggregation` (pure, property-tested); this module
only re-exports them for users.
"""

from p2pfl.core.aggregation import DEFAULT_RULE, RULES, Aggregate, aggregate

__all__ = ["DEFAULT_RULE", "RULES", "Aggregate", "aggregate"]
