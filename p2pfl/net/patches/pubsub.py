"""Pubsub patches: a hostile frame must not stop the host; our own messages flood-publish.

``pubsub_decode_error``
    ``Pubsub.stream_handler`` catches its own parse errors but not protobuf's
    ``DecodeError`` from one invalid frame on ``/meshsub/*``. Patched to treat it like a
    dead peer (reset the stream, forget the peer), as pubsub does for ``ParseError``.
``flood_publish``
    py-libp2p 0.8.1 sends an own message to mesh peers only, so a freshly connected
    neighbour (not yet GRAFTed, up to one heartbeat) only hears of it through IHAVE
    gossip a heartbeat or two later. :class:`FloodPublishGossipSub` sends own messages to
    every subscribed peer above the publish threshold, as go/js-libp2p do by default;
    forwarding is unchanged. It overrides a private method, so it acts only while the
    patch is applied (stock GossipSub behaviour otherwise).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub

from p2pfl.net.patches.streams import COUNTERS, reset_quietly

logger = logging.getLogger(__name__)

_flooding = {"on": False}


def decode_error() -> None:
    """Treat an undecodable ``/meshsub/*`` frame like a dead peer instead of stopping."""
    original = Pubsub.stream_handler

    @functools.wraps(original)
    async def stream_handler(self: Pubsub, stream: INetStream) -> None:
        try:
            await original(self, stream)
        except ProtobufDecodeError as error:
            COUNTERS.bad_pubsub_frames += 1
            peer_id = stream.muxed_conn.peer_id
            logger.info("invalid pubsub frame from %s: %s; dropping its stream", peer_id, error)
            await reset_quietly(stream)
            self._handle_dead_peer(peer_id)

    Pubsub.stream_handler = stream_handler  # type: ignore[method-assign]


def flood_publish() -> None:
    """Let :class:`FloodPublishGossipSub` flood our own messages."""
    _flooding["on"] = True


class FloodPublishGossipSub(GossipSub):
    """GossipSub that flood-publishes our *own* messages (GossipSub v1.1 ``floodPublish``)."""

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterable[ID]:
        topics = list(topic_ids)
        peers = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        pubsub = self.pubsub
        if not _flooding["on"] or pubsub is None or msg_forwarder != pubsub.my_id:
            return peers
        for topic in topics:
            for peer in pubsub.peer_topics.get(topic, ()):
                if peer != origin and (
                    self.scorer is None or self.scorer.allow_publish(peer, [topic])
                ):
                    peers.add(peer)
        return peers


__all__ = ["FloodPublishGossipSub", "decode_error", "flood_publish"]
