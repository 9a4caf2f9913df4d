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

from p2pfl.assembly import NodeFile, build_node, load_node_file
from p2pfl.cli.http import serve_status
from p2pfl.net.host import require_listenable, route_libp2p_logs
from p2pfl.net.patches import apply_process_tweaks
from p2pfl.node import Node

log = logging.getLogger(__name__)


async def run_daemon(configs: Sequence[NodeFile], nodes: Sequence[Node] | None = None) -> None:
    """Run the nodes until their rounds are done (and, unless told to exit, until a signal).

    ``nodes`` are the configs' nodes built already (:func:`build_nodes`); default: built here.
    """
    built = build_nodes(configs) if nodes is None else nodes
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            async with trio.open_nursery() as running:
                for config, node in zip(configs, built, strict=True):
                    running.start_soon(_run_node, config, node)
            nursery.cancel_scope.cancel()  # every node exited when done


def build_nodes(configs: Sequence[NodeFile]) -> list[Node]:
    """Build every node (task data read, key loaded): a config error stops us before the network."""
    shared: dict[str, Any] = {}  # sybils of one process share one group
    return [build_node(config.spec, shared=shared) for config in configs]  # keys: [node] key_file


async def _run_node(config: NodeFile, node: Node) -> None:
    service = config.service
    log.info("node %s starting on network %r (waits for %d neighbour(s), at most %g s)",
             node.peer_id, config.node.network_id, config.node.rounds.min_neighbours,
             config.node.rounds.start_timeout)
    async with node, trio.open_nursery() as nursery:
        if service.http_port:
            await nursery.start(serve_status, service.http_port, node.statistics)
        await node.run(rounds=service.rounds)
        log.info("all %s rounds done", service.rounds)
        if service.exit_when_done:
            nursery.cancel_scope.cancel()
        else:
            await trio.sleep_forever()  # keep serving peers until a signal
    log.info("node %s stopped at round %d", node.peer_id, node.round)


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("received %s: stopping", signal.Signals(signum).name)
        scope.cancel()
        return


def run_command(args: argparse.Namespace) -> int:
    """Entry point of `p2pfl node run --config FILE [--config FILE ...]`."""
    configs = [load_node_file(Path(path)) for path in args.config]
    for config in configs:  # one line now rather than a half-started node later
        require_listenable(config.spec.net.listen_host, config.spec.net.port)
        require_listenable("127.0.0.1", config.service.http_port, "[node] http_port")
    # One intra-op thread: several nodes often share a machine, and the digits model is
    # far too small to gain from more.
    torch.set_num_threads(1)
    nodes = build_nodes(configs)  # a task's config error: one line, before the network starts
    apply_process_tweaks()  # malloc thresholds, Yamux credit batching: the process is ours
    route_libp2p_logs()
    trio.run(run_daemon, configs, nodes)
    return 0
