"""Swarm patches: inbound connection slots, stream events and the auto-connector.

``inbound_slot_release``
    ``Swarm._handle_inbound_connection`` takes a slot of its inbound limiter
    (``max_connections - min_connections``, 300 by default) and, after a successful
    upgrade, waits for the *swarm* to stop inside that slot
    (``_do_handle_inbound_connection``: ``await self.manager.wait_finished()``). After 300
    lifetime inbound connections every new one is reset, from anyone, until restart.
    Patched: the inner handler waits for *this connection* to close instead, so the
    stock outer handler releases the slot then. Connections that arrive already
    multiplexed (QUIC; p2pfl listens on TCP only) keep the stock path.
``close_peer_keeps_newcomers``
    ``Swarm.close_peer`` closes the connections a peer has when it starts, one by one
    (each close takes 0.1 s or more: its cleanup sleeps that long), then drops the
    peer's whole entry from ``Swarm.connections``: a connection the peer made meanwhile
    (it redials at once when we drop it) is dropped from the table without being
    closed. It stays alive: the peer uses it (streams, GossipSub), while we list the
    peer as disconnected, so we neither send it announcements nor take its own, and a
    relay refuses it a slot ("Failed to create reservation"). In the NAT test such a
    connection cost a pair of nodes each other's updates for good. Patched: only the
    connections closed are forgotten.
``stream_events_inline``
    ``Swarm._notify`` runs every notifee callback in a task of its own, in a nursery the
    caller waits for: for every stream opened and every stream closed, a nursery and one
    task per notifee (five in a p2pfl node: pubsub, the tag store, the host, the ban gate
    and the relay's), every one of which does nothing with a stream event. ~22 streams
    per node-round at 16 nodes make that ~220 task spawns. Patched: stream events call the
    notifees in turn, in the caller's task (as go-libp2p does), a raising one logged and
    the rest still called; connection events keep the stock fan-out. The caller waited for
    every notifee before too, so a slow one holds it up no longer than it did.
``no_auto_connector`` (per host)
    ``min_connections=0`` and a huge interval do not stop 0.8.1's auto-connector: it
    still runs one pass at start-up and one after *every* disconnect (aiming for 200
    connections, dialling whatever the peerstore holds, banned peers included).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from libp2p.abc import IHost, IMuxedConn
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm

logger = logging.getLogger(__name__)


async def _close_quietly(conn: Any) -> None:
    try:
        await conn.close()
    except Exception as error:  # already gone
        logger.debug("close failed: %r", error)


async def _wait_closed(swarm: Any, muxed: IMuxedConn) -> None:
    """Wait until the swarm connection carrying ``muxed`` closes (now if it is not there)."""
    for conn in list(swarm.connections.get(muxed.peer_id, ())):
        if conn.muxed_conn is muxed:
            await conn.event_closed.wait()
            return


def inbound_slot_release() -> None:
    """Hold an inbound slot for the life of the connection, not of the swarm."""
    stock: Any = Swarm._do_handle_inbound_connection

    @functools.wraps(stock)
    async def handle(self: Any, read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        if isinstance(read_write_closer, IMuxedConn):
            await stock(self, read_write_closer, maddr, failure_event)
            return
        remote = self._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await self.connection_gate.is_allowed(remote):
            logger.debug("inbound connection from %s denied by the connection gate", remote)
            await _close_quietly(read_write_closer)
            return
        raw_conn = RawConnection(read_write_closer, False)
        try:
            muxed = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        except Exception as error:
            logger.debug("inbound upgrade failed: %r", error)
            await _close_quietly(raw_conn)
            return
        await _wait_closed(self, muxed)

    Swarm._do_handle_inbound_connection = handle  # type: ignore[method-assign]


def close_peer_keeps_newcomers() -> None:
    """Forget only the connections ``Swarm.close_peer`` closed, not the ones made meanwhile."""
    stock: Any = Swarm.close_peer

    @functools.wraps(stock)
    async def close_peer(self: Any, peer_id: Any) -> None:
        closing = list(self.get_connections(peer_id))
        for conn in closing:
            try:
                self.cleanup_connection_health(peer_id, conn)
                await conn.close()
            except Exception as error:  # already gone
                logger.debug("close failed: %r", error)
        kept = [c for c in self.connections.get(peer_id, ()) if all(c is not old for old in closing)]
        if kept:
            self.connections[peer_id] = kept
        else:
            self.connections.pop(peer_id, None)

    Swarm.close_peer = close_peer  # type: ignore[method-assign]


STREAM_EVENTS = frozenset({"opened_stream", "closed_stream"})


def stream_events_inline() -> None:
    """Deliver stream opened/closed events to the notifees in the caller's task."""
    stock: Any = Swarm._notify

    @functools.wraps(stock)
    async def notify(self: Any, method: str, *args: Any) -> None:
        if method not in STREAM_EVENTS:
            await stock(self, method, *args)
            return
        for notifee in list(self.notifees):
            try:
                await getattr(notifee, method)(self, *args)
            except Exception:
                logger.exception("notifee %s.%s raised", type(notifee).__name__, method)

    Swarm._notify = notify  # type: ignore[method-assign]


def no_auto_connector(host: IHost) -> None:
    """Make ``host``'s auto-connector dial nobody."""
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is not None:

        async def _no_dials() -> None:
            return None

        connector.maybe_connect = _no_dials


__all__ = ["close_peer_keeps_newcomers", "inbound_slot_release", "no_auto_connector", "stream_events_inline"]
