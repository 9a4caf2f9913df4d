"""The node: the only owner of concurrency. Round loop over a Transport and a Learner.

- ``config``: NodeConfig, RoundConfig.
- ``node``: Node (async context manager), the round loop, ingress and reputation.
- ``checkpoint``: atomic save/load of everything a node needs to resume.
- ``stats``: the frozen NodeStatistics record the CLI and HTTP endpoint render.
"""

from p2pfl.node.config import NodeConfig, RoundConfig
from p2pfl.node.node import Node
from p2pfl.node.stats import NodeStatistics

__all__ = ["Node", "NodeConfig", "NodeStatistics", "RoundConfig"]
