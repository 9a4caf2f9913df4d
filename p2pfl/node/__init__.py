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

from p2pfl.node.config import NodeConfig, RoundConfig
from p2pfl.node.node import Node
from p2pfl.node.stats import NodeStatistics

__all__ = ["Node", "NodeConfig", "NodeStatistics", "RoundConfig"]
