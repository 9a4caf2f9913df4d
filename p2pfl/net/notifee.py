"""Swarm notifees that only care about new connections; the ban gate."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from multiaddr import Multiaddr

from p2pfl.core.crypto import short_id

logger = logging.getLogger(__name__)


class ConnectionNotifee(INotifee):
    """Every swarm event ignored; subclasses override :meth:`connected`."""

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


class BanGate(ConnectionNotifee):
    """Close connections from banned peers as soon as they are established."""

    def __init__(
        self, is_banned: Callable[[str], bool], disconnect: Callable[[str], Awaitable[None]],
        nursery: trio.Nursery,
    ) -> None:
        self.is_banned, self.disconnect, self.nursery = is_banned, disconnect, nursery

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id.to_string()
        if self.is_banned(peer):
            logger.info("refusing banned peer %s", short_id(peer))
            self.nursery.start_soon(self.disconnect, peer)


__all__ = ["BanGate", "ConnectionNotifee"]
