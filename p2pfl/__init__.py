"""p2pfl: peer-to-peer decentralized learning over libp2p.

Nodes train locally, gossip signed model updates to their neighbours, mix what they
receive with a robust aggregation rule, and keep a reputation for every peer.

Embedding a node::

    net = p2pfl.NetConfig(port=7351, bootstrap=("/ip4/10.0.0.7/tcp/7351/p2p/16Uiu2...",))
    async with p2pfl.Node(p2pfl.NodeConfig(network_id="my-task"), learner, net=net) as node:
        await node.run(rounds=10)

The API is trio-based (``trio.run``, not ``asyncio.run``); from code that is not async,
``stats = p2pfl.run_node(config, learner, net=net, rounds=10)`` blocks until done.

Package map (dependencies point down only)::

    cli        argv -> config; daemon; testnet; status
    sim        many nodes in one process over the memory transport
    assembly   NodeSpec -> build_node (the one way to build a node); the TOML reader
    attacks    Byzantine behaviours for test networks and simulations
    node       Node: round loop, ingress, reputation, checkpoints
    net        Transport: libp2p (gossip + /p2pfl/update/1.0.0) and in-memory
    learners   Learner protocol, TorchLearner, tasks by name (TASKS), digits data set
    core       pure: codec, crypto, envelope, aggregation, reputation, rounds
    config, errors
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from p2pfl import errors
from p2pfl.errors import P2PFLError

if TYPE_CHECKING:
    from p2pfl.config import Limits, NetConfig, PrivacyConfig
    from p2pfl.core.aggregation import RULES, Aggregate, aggregate
    from p2pfl.core.codec import decode_state, encode_state
    from p2pfl.core.crypto import Identity
    from p2pfl.core.reputation import ReputationConfig
    from p2pfl.learners import Learner, Metrics, TorchLearner
    from p2pfl.node import Node, NodeConfig, NodeStatistics, RoundConfig
    from p2pfl.node.blocking import run_node

# Imported on first use (PEP 562): `p2pfl --help` and `p2pfl node status` must not pay
# for torch. Name -> module that defines it.
_LAZY = {
    "Limits": "p2pfl.config", "NetConfig": "p2pfl.config", "PrivacyConfig": "p2pfl.config",
    "RULES": "p2pfl.core.aggregation", "Aggregate": "p2pfl.core.aggregation",
    "aggregate": "p2pfl.core.aggregation",
    "decode_state": "p2pfl.core.codec", "encode_state": "p2pfl.core.codec",
    "Identity": "p2pfl.core.crypto", "ReputationConfig": "p2pfl.core.reputation",
    "run_node": "p2pfl.node.blocking",
    "Learner": "p2pfl.learners", "Metrics": "p2pfl.learners", "TorchLearner": "p2pfl.learners",
    "Node": "p2pfl.node", "NodeConfig": "p2pfl.node", "NodeStatistics": "p2pfl.node",
    "RoundConfig": "p2pfl.node",
}


def __getattr__(name: str) -> Any:
    """Import the module of a public name on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'p2pfl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "RULES",
    "Aggregate",
    "Identity",
    "Learner",
    "Limits",
    "Metrics",
    "NetConfig",
    "Node",
    "NodeConfig",
    "NodeStatistics",
    "P2PFLError",
    "PrivacyConfig",
    "ReputationConfig",
    "RoundConfig",
    "TorchLearner",
    "aggregate",
    "decode_state",
    "encode_state",
    "errors",
    "run_node",
]
