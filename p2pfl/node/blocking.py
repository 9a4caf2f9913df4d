"""``run_node``: one node from a program that is not async (the API itself is trio-based).

``Node`` is an async context manager for `trio <https://trio.readthedocs.io>`_, not
asyncio (``asyncio.run`` on it fails). A program without an event loop calls
:func:`run_node`, which runs trio until the node's rounds are done and returns its
statistics. Two processes, each embedding one node: the first reports its address
through ``on_listening``; the second gets it as ``NetConfig(bootstrap=(address,))``;
both set ``RoundConfig(min_neighbours=1)`` so that round 0 waits for the other, and a
``linger`` of a few seconds so that the one that finishes first still serves the other
its last update (examples/embed_two_processes.py).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from p2pfl.config import NetConfig
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError, NetworkError
from p2pfl.learners.base import Learner
from p2pfl.node.config import NodeConfig
from p2pfl.node.node import Node
from p2pfl.node.stats import NodeStatistics


def run_node(
    config: NodeConfig,
    learner: Learner,
    *,
    net: NetConfig | None = None,
    rounds: int | None = None,
    identity: Identity | None = None,
    on_listening: Callable[[str], None] | None = None,
    linger: float = 0.0,
) -> NodeStatistics:
    """Run one node over libp2p until ``rounds`` are done (blocking); return its statistics.

    Args:
        config: The node's settings (network id, rounds, reputation...).
        learner: Local model and data, e.g. a :class:`~p2pfl.learners.TorchLearner`.
        net: libp2p settings: port, ``bootstrap`` multiaddrs of known nodes.
        rounds: Stop after this many rounds; None: until interrupted (Ctrl-C).
        identity: The node's key (its PeerId); default a new one.
        on_listening: Called once with the node's first multiaddr
            (``/ip4/.../tcp/PORT/p2p/PEERID``) when it listens, before round 0: tell it
            to the nodes that will bootstrap from this one.
        linger: Seconds to keep serving neighbours after the last round: a neighbour
            still in that round can fetch our update instead of timing out.
    """
    if linger < 0:
        raise ConfigError(f"linger: must be >= 0 seconds, got {linger}")
    return trio.run(_run, config, learner, net, rounds, identity, on_listening, linger)


async def _run(config: NodeConfig, learner: Learner, net: NetConfig | None, rounds: int | None,
               identity: Identity | None, on_listening: Callable[[str], None] | None,
               linger: float) -> NodeStatistics:
    async with Node(config, learner, net=net, identity=identity) as node:
        if on_listening is not None:
            addresses = node.transport.listen_addrs
            if not addresses:
                raise NetworkError("the node listens on no address; check [net] host and port")
            on_listening(str(addresses[0]))
        await node.run(rounds=rounds)
        await trio.sleep(linger)  # still serving: the transport stays open until we leave
        return node.statistics()


__all__ = ["run_node"]
