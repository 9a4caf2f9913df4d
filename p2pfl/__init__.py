"""p2pfl: peer-to-peer decentralized learning over libp2p.

Nodes train locally, gossip signed model updates to their neighbours, mix what they
receive with a robust aggregation rule, and keep a reputation for every peer.

Embedding a node::

    net = p2pfl.NetConfig(port=7351, bootstrap=("/ip4/10.0.0.7/tcp/7351/p2p/16Uiu2...",))
    async with p2pfl.Node(p2pfl.NodeConfig(network_id="my-task"), learner, net=net) as node:
        await node.run(rounds=10)

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

from p2pfl import errors
from p2pfl.config import Limits, NetConfig
from p2pfl.core.aggregation import RULES, Aggregate, aggregate
from p2pfl.core.codec import decode_state, encode_state
from p2pfl.core.crypto import Identity
from p2pfl.core.reputation import ReputationConfig
from p2pfl.errors import P2PFLError
from p2pfl.learners import Learner, Metrics, TorchLearner
from p2pfl.node import Node, NodeConfig, NodeStatistics, RoundConfig

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
    "ReputationConfig",
    "RoundConfig",
    "TorchLearner",
    "aggregate",
    "decode_state",
    "encode_state",
    "errors",
]
