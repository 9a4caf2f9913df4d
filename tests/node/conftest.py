"""Nodes over the in-memory transport under a mock clock: fast and deterministic."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pfl.config import NetConfig
from p2pfl.core.crypto import Identity
from p2pfl.core.reputation import ReputationConfig
from p2pfl.learners.datasets import make_digits_learner
from p2pfl.net.memory import LinkProfile, MemoryNetwork
from p2pfl.node.behaviour import Behaviour
from p2pfl.node.config import NodeConfig, RoundConfig
from p2pfl.node.node import Node
from p2pfl.node.outbox import Transform


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identities(n: int) -> list[Identity]:
    """Deterministic keys so failures reproduce."""
    return [Identity.from_secret(bytes([i + 1]) * 32) for i in range(n)]


def complete(peers: Iterable[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(list(peers), 2))


def make_network(
    ids: list[Identity], edges: Iterable[tuple[str, str]] | None = None
) -> MemoryNetwork:
    network = MemoryNetwork(link=LinkProfile(latency=0.01, bandwidth=50e6), seed=1)
    for a, b in edges if edges is not None else complete(i.peer_id for i in ids):
        network.connect(a, b)
    return network


def make_node(
    network: MemoryNetwork,
    identity: Identity,
    index: int,
    num_nodes: int,
    *,
    data_dir: Path | None = None,
    rule: str = "clipped_gossip",
    round_timeout: float = 2.0,
    behaviour: Behaviour | None = None,
    reputation: ReputationConfig | None = None,
    transforms: Sequence[Transform] = (),
    net: NetConfig | None = None,
    **round_settings: int,
) -> Node:
    config = NodeConfig(
        network_id="test-net",
        rule=rule,
        rounds=RoundConfig(
            round_timeout=round_timeout, fetch_timeout=1.0, quorum=1.0, **round_settings
        ),
        data_dir=data_dir,
        reputation=reputation or ReputationConfig(),
    )
    learner = make_digits_learner(node_index=index, num_nodes=num_nodes, seed=0)
    return Node(
        config,
        learner,
        identity=identity,
        transport=lambda validator: network.open_transport(identity.peer_id, validator),
        offload=False,
        behaviour=behaviour,
        transforms=transforms,
        net=net,
    )
