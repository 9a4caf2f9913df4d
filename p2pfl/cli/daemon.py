"""`p2pfl node run`: a node as a long-running process.

Logs to stderr, serves /status and /metrics on 127.0.0.1, checkpoints after every round,
stops gracefully on SIGTERM/SIGINT (the last finished round is on disk), and resumes from
its checkpoint after a crash or SIGKILL.

Several ``--config`` files run several nodes in one process, each with its own key,
ports and data directory. That is how a test network runs one attacker with k
identities: sybils of one process share one :class:`~p2pfl.attacks.SybilGroup`.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from p2pfl.attacks import attack_label_map, make_attack, with_accomplices
from p2pfl.cli.config_file import DaemonConfig, load_daemon_config
from p2pfl.cli.http import serve_status
from p2pfl.core.crypto import Identity
from p2pfl.errors import KeyFileError
from p2pfl.learners.datasets import make_digits_learner
from p2pfl.node.node import Node

log = logging.getLogger(__name__)


def load_or_create_identity(path: Path) -> Identity:
    """Load the node key, creating it (mode 0600) on first start."""
    try:
        return Identity.load(path)
    except KeyFileError:
        if path.exists():
            raise
    identity = Identity.generate()
    identity.save(path)
    log.info("created a new key at %s (peer id %s)", path, identity.peer_id)
    return identity


def build_node(config: DaemonConfig, identity: Identity, shared: dict[str, Any] | None = None) -> Node:
    """Assemble the node a config file describes (digits task, optional attack).

    Attackers built with the same ``shared`` dict collude (sybils share one group).
    """
    train = config.train
    behaviour = label_map = None
    if config.attack is not None:  # a Byzantine node of a test network
        params = with_accomplices(config.attack, config.attack_params, {} if shared is None else shared)
        behaviour = make_attack(config.attack, **params)
        label_map = attack_label_map(config.attack, **dict(config.attack_params))
    learner = make_digits_learner(
        node_index=train.node_index,
        num_nodes=train.num_nodes,
        partition=train.partition,
        alpha=train.alpha,
        seed=train.seed,
        batch_size=train.batch_size,
        lr=train.lr,
        momentum=train.momentum,
        label_map=label_map,
    )
    return Node(
        config.node,
        learner,
        identity=identity,
        net=config.net,
        behaviour=behaviour,
    )


async def run_daemon(configs: Sequence[DaemonConfig]) -> None:
    """Run the nodes until their rounds are done (and, unless told to exit, until a signal)."""
    shared: dict[str, Any] = {}
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            async with trio.open_nursery() as nodes:
                for config in configs:
                    nodes.start_soon(_run_node, config, shared)
            nursery.cancel_scope.cancel()  # every node exited when done


async def _run_node(config: DaemonConfig, shared: dict[str, Any]) -> None:
    identity = load_or_create_identity(config.key_file)
    node = build_node(config, identity, shared)
    log.info("node %s starting on network %r", identity.peer_id, config.node.network_id)
    async with node, trio.open_nursery() as nursery:
        if config.http_port:
            await nursery.start(serve_status, config.http_port, node.statistics)
        await node.run(rounds=config.rounds)
        log.info("all %s rounds done", config.rounds)
        if config.exit_when_done:
            nursery.cancel_scope.cancel()
        else:
            await trio.sleep_forever()  # keep serving peers until a signal
    log.info("node %s stopped at round %d", identity.peer_id, node.round)


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("received %s: stopping", signal.Signals(signum).name)
        scope.cancel()
        return


def run_command(args: argparse.Namespace) -> int:
    """Entry point of `p2pfl node run --config FILE [--config FILE ...]`."""
    configs = [load_daemon_config(Path(path)) for path in args.config]
    # One intra-op thread: several nodes often share a machine, and the digits model is
    # far too small to gain from more.
    torch.set_num_threads(1)
    trio.run(run_daemon, configs)
    return 0
