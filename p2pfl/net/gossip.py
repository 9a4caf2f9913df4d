"""GossipSub announcements: one topic per network, validated, scored, deduplicated.

Topic ``p2pfl/<network-id>/updates/1``. Choices against py-libp2p 0.8.1 (LIBP2P_NOTES):

- Heartbeat 1 s and adaptive gossip off (defaults 120 s / 30-60 s, trap 4).
- Strict signing: ``msg.from_id`` is authenticated, so the origin handed to the
  validator is the publisher's real PeerId, not the forwarder's.
- One topic validator wraps the node's :data:`~p2pfl.net.transport.Validator`. It catches
  ``Exception`` (a raising validator otherwise stops the host) and returns False on any
  error, so pubsub counts an invalid message against the *forwarder* (GossipSub P4). An
  honest forwarder validates before forwarding, so P4 lands on whoever injected the
  forgery. Scoring is configured so P4 gates delivery (trap 8): positive weight, finite
  cap, and publish/gossip/graylist thresholds a few invalid messages deep.
- Messages over ``Limits.max_message_bytes`` are rejected before the validator runs.
- Own publishes pass a token bucket (default 8 msg/s): GossipSub silently stops
  forwarding a peer's bursts above its per-topic rate (trap 5). Our receive-side limit
  is raised above that because a forwarder relays *everyone's* messages.
- Own messages are flood-published to every subscribed neighbour (v1.1 ``floodPublish``,
  see :class:`FloodPublishGossipSub`); forwarded ones follow the mesh.
- Delivery: validated messages become :class:`~p2pfl.net.transport.Announcement` on a
  bounded memory channel (dropped and counted when full). Exact duplicates are stopped by
  GossipSub's seen-cache; re-announcements (same origin, same bytes, new seqno) by an LRU
  that also caches the validator's value so a re-announcement is not re-verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.tools.anyio_service import background_trio_service

from p2pfl.config import Limits
from p2pfl.core.bounded import BoundedMap
from p2pfl.errors import NetworkError
from p2pfl.net.patches.pubsub import FloodPublishGossipSub
from p2pfl.net.transport import Announcement, Validator

logger = logging.getLogger(__name__)

# P4: each invalid message costs 10 points, counted up to 100 messages, and decays by
# 1% per 1 s heartbeat (half-life ~70 s), so a forger stays gated for minutes.
INVALID_WEIGHT = 10.0
INVALID_CAP = 100.0
INVALID_DECAY = 0.99
# Thresholds on the P4-only topic score: the rate limit of the ban policy (docs/PROTOCOL.md).
# At this layer one invalid message is tolerated (a bug, a version skew); forgery is
# also banned at once by the node's reputation (node/inbound.py), network/version/format
# mismatches only counted there. The 2nd stops IHAVE gossip with the peer; the 3rd (score -30) drops its
# messages before validation (publish gate) and graylists it (its GRAFTs are refused and
# it gets no gossip). Gated messages are not counted again, so the score then only
# decays: ~18 s to climb back above -25, after which one more invalid message re-gates.
GOSSIP_THRESHOLD = -15.0
PUBLISH_THRESHOLD = -25.0
GRAYLIST_THRESHOLD = -25.0
# A forwarder relays every peer's announcements; 50/s stays under the ~100-140 msg/s CPU
# ceiling between two nodes while letting 8 nodes at 8 msg/s through one relay mostly.
RECEIVE_RATE_PER_FORWARDER = 50.0
# Control RPCs carry IHAVE/IWANT id lists besides messages; 256 KiB is plenty and caps
# what one frame can make us buffer (the default is 1 MiB).
MAX_RPC_BYTES = 256 * 1024
SEEN_CAPACITY = 4096
# A connected neighbour that pubsub has not listed as subscribed to our topic for this
# long gets none of our announcements, and nothing in pubsub asks it again (see
# :meth:`Gossip.unlisted`).
UNLISTED_AFTER = 5.0


def topic_for(network_id: str) -> str:
    """Return the announcement topic of a network."""
    return f"p2pfl/{network_id}/updates/1"


def score_params() -> ScoreParams:
    """Return GossipSub scoring in which only the invalid-message penalty (P4) counts."""
    return ScoreParams(
        p4_invalid_messages=TopicScoreParams(
            weight=INVALID_WEIGHT, cap=INVALID_CAP, decay=INVALID_DECAY
        ),
        publish_threshold=PUBLISH_THRESHOLD,
        gossip_threshold=GOSSIP_THRESHOLD,
        graylist_threshold=GRAYLIST_THRESHOLD,
        accept_px_threshold=0.0,
    )


class TokenBucket:
    """A token bucket over a caller-supplied clock (seconds)."""

    def __init__(self, rate: float, *, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def delay(self, now: float) -> float:
        """Take one token; return how long to wait before using it (0 if available)."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


# Deprecated alias (one release): the one bounded map is p2pfl.core.bounded.BoundedMap.
BoundedCache = BoundedMap


@dataclass
class GossipCounters:
    """Message counters of one gossip instance."""

    published: int = 0
    delivered: int = 0
    rejected: int = 0
    oversize: int = 0
    duplicates: int = 0
    dropped_full: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


_UNSEEN = object()


class Gossip:
    """Announcements on one network's topic: publish, validate, deliver."""

    def __init__(
        self,
        host: IHost,
        pubsub: Pubsub,
        router: GossipSub,
        *,
        topic: str,
        limits: Limits,
        validator: Validator,
        publish_rate: float,
        buffer: int,
    ) -> None:
        self.host = host
        self.pubsub = pubsub
        self.router = router
        self.topic = topic
        self.limits = limits
        self.counters = GossipCounters()
        self._validator = validator
        # (origin, sha256) -> validator value; (origin, sha256) -> True once delivered
        self._values: BoundedMap[tuple[str, bytes], Any] = BoundedMap(SEEN_CAPACITY)
        self._delivered: BoundedMap[tuple[str, bytes], bool] = BoundedMap(SEEN_CAPACITY)
        self._bucket = TokenBucket(publish_rate, burst=max(1.0, publish_rate), now=trio.current_time())
        self._send, self._receive = trio.open_memory_channel[Announcement](buffer)
        # neighbour -> (its connections, since when pubsub has not listed it over them)
        self._unlisted: dict[str, tuple[set[int], float]] = {}
        # origin -> (announcements of it validated, trio time of the last): diagnosis only
        self._heard: BoundedMap[str, tuple[int, float]] = BoundedMap(SEEN_CAPACITY)

    def announcements(self) -> trio.MemoryReceiveChannel[Announcement]:
        """Return the bounded channel of validated announcements from other peers."""
        return self._receive

    def validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """Pubsub's topic validator: never raises, False on any rejection."""
        data = bytes(msg.data)
        if len(data) > self.limits.max_message_bytes:
            self.counters.oversize += 1
            return False
        try:
            origin = ID(msg.from_id).to_string()
            heard = self._heard.peek(origin)
            self._heard.put(origin, (1 + (heard[0] if heard else 0), trio.current_time()))
            key = (origin, hashlib.sha256(data).digest())
            if key not in self._values:
                self._values.put(key, self._validator(origin, data))
        except Exception as error:  # hostile bytes: any error is a rejection, never a crash
            self.counters.rejected += 1
            logger.info("rejected announcement forwarded by %s: %r", str(forwarder)[-8:], error)
            return False
        return True

    async def publish(self, data: bytes) -> None:
        """Validate ``data`` locally, then publish it, waiting for the rate limiter.

        The local check matters: pubsub runs our validator on our own publishes too and
        would count a rejection against *us* in our own scorer (P4), gating our next
        publishes.

        Raises:
            NetworkError: ``data`` is over ``Limits.max_message_bytes`` or our own
                validator rejects it.
        """
        data = bytes(data)
        if len(data) > self.limits.max_message_bytes:
            raise NetworkError(
                f"announcement of {len(data)} bytes exceeds max_message_bytes "
                f"{self.limits.max_message_bytes}"
            )
        me = self.host.get_id().to_string()
        key = (me, hashlib.sha256(data).digest())
        if key not in self._values:
            try:
                self._values.put(key, self._validator(me, data))
            except Exception as error:  # the validator's verdict, whatever its type
                raise NetworkError(f"own validator rejected the announcement: {error!r}") from error
        await trio.sleep(self._bucket.delay(trio.current_time()))
        await self.pubsub.publish(self.topic, data)
        self.counters.published += 1
        self.counters.bytes_out += len(data)

    def penalise(self, peer: str, *, invalid_messages: float = INVALID_CAP) -> None:
        """Charge ``peer`` invalid messages in GossipSub scoring (a ban: graylisted).

        The default charge (score -1000) decays below the gates in ~6 minutes.
        """
        scorer = self.router.scorer
        try:
            peer_id = ID.from_base58(peer)
        except Exception:  # not a PeerId: nothing to penalise
            logger.warning("cannot penalise %r: not a PeerId", peer)
            return
        if scorer is not None:
            scorer.invalid_messages[peer_id][self.topic] += invalid_messages

    def score(self, peer: str) -> float:
        """Return ``peer``'s GossipSub score on our topic."""
        scorer = self.router.scorer
        return 0.0 if scorer is None else scorer.score(ID.from_base58(peer), [self.topic])

    def heard(self, origin: str) -> tuple[int, float]:
        """(announcements published by ``origin`` that reached us, trio time of the last)."""
        return self._heard.peek(origin) or (0, 0.0)

    def subscribed_peers(self) -> tuple[str, ...]:
        """Return the peers subscribed to our topic that pubsub knows, sorted."""
        peers = self.pubsub.peer_topics.get(self.topic, set())
        return tuple(sorted(p.to_string() for p in peers))

    def unlisted(self, neighbours: Iterable[str]) -> list[str]:
        """``neighbours`` that pubsub has not listed as subscribed to our topic, or has no
        stream of ours to, for :data:`UNLISTED_AFTER` seconds over the same connections
        (over a new one the peer may yet say hello: the wait starts over), sorted: we send
        them no announcement.

        A peer's subscriptions arrive once, on its stream to us. py-libp2p forgot them when
        our stream to a still-connected peer failed (patch ``pubsub_live_subscriptions``),
        which a replaced connection caused; this is the safety net for any other way of
        losing them: the caller reconnects these peers (both ends then say hello again).
        Our own stream counts too: when it fails pubsub opens another, and when that fails
        as well (a relay that stalls stream openings; a CI run of the hostile-relay test,
        session 21) the peer stays subscribed but hears nothing from us.
        """
        now = trio.current_time()
        streams = {peer.to_string() for peer in self.pubsub.peers}
        listed = set(self.subscribed_peers()) & streams
        network, seen = self.host.get_network(), self._unlisted
        self._unlisted = {}
        for peer in (p for p in neighbours if p not in listed):
            conns = {id(c) for c in network.get_connections(ID.from_base58(peer))}
            self._unlisted[peer] = seen[peer] if peer in seen and seen[peer][0] == conns else (conns, now)
        return sorted(p for p, (_, since) in self._unlisted.items() if now - since >= UNLISTED_AFTER)

    async def deliver(self, subscription: Any) -> None:
        """Move validated messages from the subscription to the announcement channel."""
        me = self.host.get_id().to_bytes()
        async with self._send:
            while True:
                msg = await subscription.get()
                if msg.from_id != me:
                    self._deliver_one(msg)

    def _deliver_one(self, msg: rpc_pb2.Message) -> None:
        data = bytes(msg.data)
        origin = ID(msg.from_id).to_string()
        key = (origin, hashlib.sha256(data).digest())
        value = self._values.get(key, _UNSEEN)
        if value is _UNSEEN:  # evicted between validation and delivery: rare, safe to drop
            return
        if key in self._delivered:
            self.counters.duplicates += 1
            return
        try:
            self._send.send_nowait(Announcement(origin=origin, data=data, value=value))
        except trio.WouldBlock:
            self.counters.dropped_full += 1
            return
        self._delivered.put(key, True)
        self.counters.delivered += 1
        self.counters.bytes_in += len(data)


def build_router(*, heartbeat_interval: float) -> GossipSub:
    """Return the GossipSub router p2pfl runs with."""
    return FloodPublishGossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=heartbeat_interval,  # type: ignore[arg-type]  # float works
        heartbeat_initial_delay=0.1,
        score_params=score_params(),
        adaptive_gossip_enabled=False,
        max_messages_per_topic_per_second=RECEIVE_RATE_PER_FORWARDER,
    )


@contextlib.asynccontextmanager
async def open_gossip(
    host: IHost,
    *,
    network_id: str,
    limits: Limits,
    validator: Validator,
    heartbeat_interval: float = 1.0,
    publish_rate: float = 8.0,
    buffer: int = 256,
) -> AsyncIterator[Gossip]:
    """Run GossipSub on ``host`` subscribed to the network's topic; yield a :class:`Gossip`.

    Must be entered before peers connect so identify advertises ``/meshsub/*``.
    """
    router = build_router(heartbeat_interval=heartbeat_interval)
    pubsub = Pubsub(host, router, strict_signing=True, max_inbound_rpc_size=MAX_RPC_BYTES)
    gossip = Gossip(
        host,
        pubsub,
        router,
        topic=topic_for(network_id),
        limits=limits,
        validator=validator,
        publish_rate=publish_rate,
        buffer=buffer,
    )
    pubsub.set_topic_validator(gossip.topic, gossip.validate, is_async_validator=False)
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        subscription = await pubsub.subscribe(gossip.topic)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gossip.deliver, subscription)
            try:
                yield gossip
            finally:
                nursery.cancel_scope.cancel()


__all__ = [
    "BoundedCache",
    "FloodPublishGossipSub",
    "Gossip",
    "GossipCounters",
    "TokenBucket",
    "UNLISTED_AFTER",
    "build_router",
    "open_gossip",
    "score_params",
    "topic_for",
]
