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
``neighbour_only``
    GossipSub forwards every message to its mesh peers, so each node receives every
    announcement of the network several times (7-11 ms CPU each), while a p2pfl node only
    aggregates its direct neighbours' updates, and those reach it first-hand by flood
    publish (lost ones through re-announcement, IHAVE gossip and the round's catch-up).
    :class:`FloodPublishGossipSub` then forwards nothing and sends no IDONTWANT (nobody
    forwards to us what we already saw). A wire-level choice, not a bug: stock peers
    still interoperate.
``pubsub_live_subscriptions``
    A peer's subscriptions arrive on its stream to us; ``Pubsub._handle_dead_peer`` forgets
    them whenever *our* stream to the peer fails, though the peer is still connected. When
    a connection is replaced (a relayed one by a direct one, a circuit redialled), our
    stream to the peer on the old connection fails at its next write, after the peer has
    sent its subscriptions again on the new one: they are forgotten, the peer never sends
    them again, and we send it no message for good (the likely cause of the NAT test's
    runs, about 1 in 5, where a node never got a directly connected neighbour's update).
    Patched: the subscriptions of a peer still connected are kept (our stream to it is
    reopened as before); a peer gone is forgotten as before.
``signed_records``
    Every pubsub RPC carries the sender's signed peer record; py-libp2p parses, verifies
    and stores it on every RPC received (twice: pubsub and the router), and rebuilds the
    listen-address set of its own record on every RPC sent. Patched: an identical record
    from the same peer is consumed once a minute; our own is rebuilt at most every 10 s.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.pubsub import floodsub, gossipsub
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub

from p2pfl.net.patches.streams import COUNTERS, reset_quietly

logger = logging.getLogger(__name__)

_flooding = {"on": False, "neighbour_only": False}
# A peer's identical signed record is consumed again after this long (its TTL is 2 h).
RECORD_RECHECK_SECONDS = 60.0
# Our own record is rebuilt (listen addresses compared) at most this often.
OWN_RECORD_SECONDS = 10.0
_MAX_RECORD_PEERS = 1024
_RECORD_MODULES = (pubsub_module, gossipsub, floodsub)


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


def live_subscriptions() -> None:
    """Keep a still-connected peer's subscriptions when our stream to it dies."""
    original = Pubsub._handle_dead_peer

    @functools.wraps(original)
    def handle_dead_peer(self: Pubsub, peer_id: ID) -> None:
        if not self._peer_is_connected(peer_id):
            original(self, peer_id)
            return
        self._forget_all_subscriptions = _keep  # type: ignore[method-assign]  # this call only
        try:
            original(self, peer_id)
        finally:
            del self._forget_all_subscriptions

    Pubsub._handle_dead_peer = handle_dead_peer  # type: ignore[method-assign]


def _keep(peer_id: ID) -> None:
    """Stand-in for ``Pubsub._forget_all_subscriptions`` while a peer is still connected."""


def flood_publish() -> None:
    """Let :class:`FloodPublishGossipSub` flood our own messages."""
    _flooding["on"] = True


def neighbour_only() -> None:
    """Let :class:`FloodPublishGossipSub` forward nothing (announcements are first-hand)."""
    _flooding["neighbour_only"] = True


def signed_records() -> None:
    """Consume each peer's unchanged signed record once a minute; rebuild ours every 10 s."""
    consume = _cached_consume(pubsub_module.maybe_consume_signed_record)
    issue = _cached_issue(pubsub_module.env_to_send_in_RPC)
    for module in _RECORD_MODULES:
        module.maybe_consume_signed_record = consume  # type: ignore[attr-defined]
        module.env_to_send_in_RPC = issue  # type: ignore[attr-defined]


def _cached_consume(original: Callable[[Any, Any, ID], bool]) -> Callable[[Any, Any, ID], bool]:
    accepted: dict[ID, tuple[bytes, float]] = {}  # peer -> (record bytes, when consumed)

    @functools.wraps(original)
    def consume(msg: Any, host: Any, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        record, now = bytes(msg.senderRecord), time.monotonic()
        seen = accepted.get(peer_id)
        if seen is not None and seen[0] == record and now - seen[1] < RECORD_RECHECK_SECONDS:
            return True
        if not original(msg, host, peer_id):
            return False
        if len(accepted) >= _MAX_RECORD_PEERS:
            accepted.clear()  # a cache: forgetting only costs a re-check
        accepted[peer_id] = (record, now)
        return True

    return consume


def _cached_issue(original: Callable[[Any], tuple[bytes, bool]]) -> Callable[[Any], tuple[bytes, bool]]:
    @functools.wraps(original)
    def issue(host: Any) -> tuple[bytes, bool]:
        cached = getattr(host, "_p2pfl_own_record", None)
        now = time.monotonic()
        if cached is not None and now - cached[1] < OWN_RECORD_SECONDS:
            return cached[0], False
        envelope, fresh = original(host)
        host._p2pfl_own_record = (envelope, now)
        return envelope, fresh

    return issue


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
        pubsub = self.pubsub
        own = pubsub is not None and msg_forwarder == pubsub.my_id
        if _flooding["neighbour_only"] and not own:
            return set()
        peers = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        if not _flooding["on"] or pubsub is None or not own:
            return peers
        for topic in topics:
            for peer in pubsub.peer_topics.get(topic, ()):
                if peer != origin and (
                    self.scorer is None or self.scorer.allow_publish(peer, [topic])
                ):
                    peers.add(peer)
        return peers

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Iterable[str]) -> None:
        if not _flooding["neighbour_only"]:
            await super()._emit_idontwant_for_message(msg_id, topic_ids)


__all__ = ["FloodPublishGossipSub", "decode_error", "flood_publish", "neighbour_only", "signed_records"]
