"""The node: the only owner of concurrency. Round loop over a Transport and a Learner.

- ``config``: NodeConfig, RoundConfig.
- ``node``: Node (async context manager) and the round loop; it owns the parts below.
- ``ingress``: announcements verified and admitted, payloads fetched (``inbound``) into
  the inbox; the read-only view behaviours craft from.
- ``outbox``: outbound transforms -> encode -> sign -> serve -> publish; re-announce.
- ``mixer``: harm check (``harm``), mixing weights, aggregation, trust -> evidence.
- ``standing``: the reputation book and evidence tallies.
- ``behaviour``: Behaviour (honest; attacks subclass it), PeerView.
- ``transport``: TransportFactory, the default libp2p one.
- ``checkpoint``: atomic save/load of everything a node needs to resume.
- ``stats``: the frozen NodeStatistics record the CLI and HTTP endpoint render.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfl.node.config import NodeConfig, RoundConfig
    from p2pfl.node.node import Node
    from p2pfl.node.stats import NodeStatistics

# Imported on first use: `p2pfl node status` reads node.stats without importing torch.
_LAZY = {"NodeConfig": "p2pfl.node.config", "RoundConfig": "p2pfl.node.config",
         "Node": "p2pfl.node.node", "NodeStatistics": "p2pfl.node.stats"}


def __getattr__(name: str) -> Any:
    """Import the module of a public name on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'p2pfl.node' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["Node", "NodeConfig", "NodeStatistics", "RoundConfig"]
