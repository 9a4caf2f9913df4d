"""Waiting for neighbours before a round: loud, bounded, and saying what it waits for."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import trio

from p2pfl.core.crypto import short_id
from p2pfl.errors import NoNeighbours
from p2pfl.net.transport import Transport
from p2pfl.node.ingress import Ingress

log = logging.getLogger(__name__)

WAIT_LOG_INTERVAL = 10.0  # seconds between "waiting for neighbours" lines


async def wait_for_neighbours(
    transport: Transport, peer_id: str, need: int, timeout: float | None
) -> None:
    """Wait until ``need`` neighbours are connected, saying every 10 s what for.

    Raises:
        NoNeighbours: ``timeout`` seconds passed first (None: wait for ever); the
            message names each bootstrap peer and what it answered.
    """
    started = trio.current_time()
    next_log = started + WAIT_LOG_INTERVAL
    while len(transport.neighbours()) < need:
        now = trio.current_time()
        if timeout is not None and now - started >= timeout:
            raise NoNeighbours(f"{len(transport.neighbours())} of {need} neighbour(s) "
                               f"after start_timeout = {timeout:g} s; {tried(transport)}")
        if now >= next_log:
            log.info("[%s] waiting for %d neighbour(s), have %d, %.0f s so far; %s",
                     short_id(peer_id), need, len(transport.neighbours()), now - started,
                     tried(transport))
            next_log = now + WAIT_LOG_INTERVAL
        await trio.sleep(0.1)  # bounded by the timeout; no event for neighbour changes


def tried(transport: Transport) -> str:
    """Which bootstrap peers were tried and what each answered, in one phrase."""
    report = transport.bootstrap_report()
    if not report:
        return "no [net] bootstrap peers configured and no peer of this network dialled in"
    return "bootstrap peers: " + "; ".join(report)


async def observe(ingress: Ingress, round: int, rounds: int | None) -> AsyncIterator[int]:
    """Yield the rounds the network has finished, as their updates arrive (observer role).

    Each delivered update is verified and counted by ``ingress``; what is held is freed.
    """
    while rounds is None or round < rounds:
        await ingress.next_delivery()
        newest = max((u.header.round for u in ingress.freshest.values()), default=-1)
        round = max(round, newest + 1)
        ingress.take(round)
        yield round
