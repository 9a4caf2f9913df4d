"""In-process transports over a simulated network: latency, loss, partitions, bans.

:class:`MemoryTransport` keeps the :class:`~p2pfl.net.transport.Transport` contract;
:class:`MemoryNetwork` is the medium that tests and simulations shape. Used by ``p2pfl
sim`` (hundreds of nodes in one trio run) and by the node's tests under
``MockClock(autojump_threshold=0)``. Nothing here sleeps on the wall clock.

The model (topology, delivery, fetches, and where it differs from libp2p) is described
in :mod:`p2pfl.net.memory_model`, which holds its pure parts: :class:`LinkProfile`,
the :class:`~p2pfl.net.memory_model.Topology` and each peer's
:class:`~p2pfl.net.memory_model.ReceiveFilter`.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import trio

from p2pfl.config import Limits, require
from p2pfl.core.crypto import short_id
from p2pfl.core.envelope import CheckedPayload
from p2pfl.errors import (
    ConfigError,
    NetworkError,
    PayloadNotFound,
    PayloadTooLarge,
    PeerUnreachable,
    ProtocolViolation,
    TamperedPayload,
    TransferTimeout,
)
from p2pfl.net.memory_model import LinkProfile, ReceiveFilter, ServingHook, Topology, _Served
from p2pfl.net.transport import Announcement, TrafficStats, Validator, sha256

log = logging.getLogger(__name__)

_DEFAULT_LINK = LinkProfile()

class MemoryNetwork:
    """The shared medium: topology, partitions, bans, and the open transports."""

    def __init__(
        self,
        *,
        link: LinkProfile = _DEFAULT_LINK,
        seed: int = 0,
        max_message_bytes: int = Limits().max_message_bytes,
        tick: float = 1e-4,
        publish_rate: float = 8.0,
        neighbours_only: bool = False,
    ) -> None:
        require(tick >= 0 and math.isfinite(tick), "tick", "must be >= 0 s (0: exact times)")
        require(max_message_bytes > 0, "max_message_bytes", "must be a positive byte count")
        require(publish_rate > 0, "publish_rate", "must be > 0 messages/s (math.inf: no limit)")
        # Each peer's own publishes wait for a token bucket of this rate (burst: one
        # second's worth), as p2pfl.net.gossip does to stay under GossipSub's burst drops.
        self.publish_rate = publish_rate
        self.link = link
        self.seed = seed
        self.max_message_bytes = max_message_bytes
        # Announcement arrival times are rounded up to a multiple of ``tick`` so that
        # jittered deliveries share scheduler wake-ups: each distinct arrival time costs
        # ~50 us of trio overhead, so exact jitter made large simulations ~15x slower.
        self.tick = tick
        # Deliver announcements one hop only, instead of to every reachable peer as
        # GossipSub's mesh does. Nodes act on their neighbours' announcements only, so
        # large simulations skip verifying the rest (64 nodes: 92 s -> 20 s).
        self.neighbours_only = neighbours_only
        self.topology = Topology()
        self._open: dict[str, MemoryTransport] = {}
        self._frozen: set[str] = set()
        self._hooks: dict[str, ServingHook] = {}
        self._state_changed: dict[str, trio.Event] = {}  # woken on thaw / close

    @asynccontextmanager
    async def open_transport(
        self, peer_id: str, validator: Validator, *, queue_size: int = 256
    ) -> AsyncIterator[MemoryTransport]:
        """Join the network as ``peer_id``; leaving the block is the peer vanishing."""
        if peer_id in self._open:
            raise ConfigError(f"peer {peer_id!r} is already open on this network")
        transport = MemoryTransport(self, peer_id, validator, queue_size)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport._deliver_forever)
            self._open[peer_id] = transport
            self.topology.open(peer_id)
            try:
                yield transport
            finally:
                del self._open[peer_id]
                self.topology.close(peer_id)
                transport._close()
                self._wake(peer_id)
                nursery.cancel_scope.cancel()

    def connect(self, a: str, b: str) -> None:
        """Add the undirected edge ``a``-``b`` (peers need not be open yet)."""
        self.topology.connect(a, b)

    def disconnect(self, a: str, b: str) -> None:
        """Remove the edge ``a``-``b`` if present."""
        self.topology.disconnect(a, b)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut all traffic between groups until :meth:`heal`; unnamed peers form one more group."""
        self.topology.partition(*groups)

    def heal(self) -> None:
        """End any partition."""
        self.topology.heal()

    def freeze(self, peer_id: str) -> None:
        """Make ``peer_id`` stop answering fetches (its fetchers hit their timeout)."""
        self._frozen.add(peer_id)

    def thaw(self, peer_id: str) -> None:
        """Let a frozen peer answer again, including the requests it sat on."""
        self._frozen.discard(peer_id)
        self._wake(peer_id)

    def set_serving_hook(self, peer_id: str, hook: ServingHook | None) -> None:
        """Substitute what ``peer_id`` sends for a digest (attack simulations); None removes."""
        if hook is None:
            self._hooks.pop(peer_id, None)
        else:
            self._hooks[peer_id] = hook

    # -- internals shared with MemoryTransport ---------------------------------------

    def _wake(self, peer_id: str) -> None:
        event = self._state_changed.pop(peer_id, None)
        if event is not None:
            event.set()

    async def _wait_state_change(self, peer_id: str) -> None:
        await self._state_changed.setdefault(peer_id, trio.Event()).wait()

    def _routes_from(self, origin: str) -> list[tuple[str, int]]:
        now = trio.current_time()
        if self.neighbours_only:
            return [(peer, 1) for peer in self.topology.neighbours(origin, now)]
        return self.topology.routes_from(origin, now)

    def _rng(self, *key: object) -> random.Random:
        return random.Random("/".join(map(str, (self.seed, *key))))

    def _broadcast(self, origin: str, count: int, data: bytes) -> None:
        link, now = self.link, trio.current_time()
        rng = self._rng("announce", origin, count) if link.loss or link.jitter else None
        for peer, hops in self._routes_from(origin):
            extra = 0.0
            if rng is not None:
                lost, extra = rng.random() < link.loss, rng.random() * link.jitter
                if lost:
                    continue
            self._open[peer]._schedule(
                self._round_up(now + hops * link.latency + extra), origin, data
            )

    def _round_up(self, due: float) -> float:
        if not self.tick:
            return due
        return math.ceil(due / self.tick - 1e-6) * self.tick  # 1e-6: float noise, not a tick

    async def _transfer(
        self, fetcher: MemoryTransport, peer: str, digest: bytes, max_size: int
    ) -> CheckedPayload:
        server = self._open.get(peer)
        if server is None or not self.topology.usable(fetcher.peer_id, peer, trio.current_time()):
            raise PeerUnreachable(f"{short_id(peer)} is not a usable neighbour of {fetcher}")
        while peer in self._frozen and not server.closed:  # the request sits unread
            await self._wait_state_change(peer)
        payload, genuine = server._lookup(digest, self._hooks.get(peer))
        delay = self.link.latency
        if self.link.jitter:
            now = trio.current_time()
            delay += (
                self._rng("fetch", fetcher.peer_id, peer, digest.hex(), now).random()
                * self.link.jitter
            )
        if payload is None:
            await server._answer_after(delay)
            raise PayloadNotFound(f"{short_id(peer)} does not serve {digest.hex()[:12]}")
        if len(payload) > max_size:
            await server._answer_after(delay)
            raise PayloadTooLarge(f"{short_id(peer)} offers {len(payload)} bytes > cap {max_size}")
        await server._answer_after(delay + len(payload) / self.link.bandwidth)
        fetcher._bytes_in, fetcher._payload_in = fetcher._bytes_in + len(payload), fetcher._payload_in + len(payload)
        server._bytes_out, server._payload_out = server._bytes_out + len(payload), server._payload_out + len(payload)
        if not genuine and sha256(payload) != digest:
            raise TamperedPayload(
                f"{short_id(peer)} sent bytes whose sha256 is not {digest.hex()[:12]}"
            )
        if (pullers := server._pulled.get(digest)) is not None:
            pullers.add(fetcher.peer_id)
        return CheckedPayload(payload, digest)


class MemoryTransport:
    """One peer of a :class:`MemoryNetwork`; implements :class:`~p2pfl.net.transport.Transport`.

    Obtain it from :meth:`MemoryNetwork.open_transport`.
    """

    def __init__(
        self, network: MemoryNetwork, peer_id: str, validator: Validator, queue_size: int
    ) -> None:
        self._network = network
        self._peer_id = peer_id
        self._validator = validator
        self._send, self._receive = trio.open_memory_channel[Announcement](queue_size)
        self._served: dict[bytes, _Served] = {}
        self._heap: list[tuple[float, int, str, bytes]] = []  # (due, seq, origin, data)
        self._seq = 0
        self._sleeper = trio.CancelScope()  # the delivery task sleeps until its deadline
        self._closed = trio.Event()
        self._published = 0
        self._tokens, self._stamp = max(1.0, network.publish_rate), trio.current_time()
        self._penalties: Counter[str] = Counter()
        self._bytes_in = self._bytes_out = self._payload_in = self._payload_out = 0
        self._pulled: dict[bytes, set[str]] = {}  # served digest -> peers that pulled it
        self._announcements_in = self._announcements_out = self._rejected_in = 0
        self._overflowed = self._duplicates = self._gated = 0
        self._filter = ReceiveFilter()

    def __repr__(self) -> str:
        return f"MemoryTransport({short_id(self._peer_id)})"

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        return self._peer_id

    @property
    def closed(self) -> bool:
        """Whether the transport's context has exited (the peer is gone)."""
        return self._closed.is_set()

    @property
    def overflowed(self) -> int:
        """Validated announcements dropped because the announcements channel was full."""
        return self._overflowed

    @property
    def gated(self) -> int:
        """Announcements dropped unvalidated because their origin sent too many invalid ones."""
        return self._gated

    @property
    def duplicates(self) -> int:
        """Re-announcements dropped because the same origin's same bytes were delivered."""
        return self._duplicates

    def penalties(self, peer: str) -> int:
        """Return how many announcements originating from ``peer`` this transport rejected."""
        return self._penalties[peer]

    async def publish(self, data: bytes) -> None:
        """Validate ``data`` locally, wait for the rate limiter, then announce it.

        Delivery to every reachable peer is scheduled; this does not wait for it.

        Raises:
            NetworkError: the transport is closed, ``data`` exceeds the network's
                ``max_message_bytes``, or this peer's own validator rejects it.
        """
        self._check_open()
        data = bytes(data)  # no copy for bytes; freezes a caller's bytearray
        limit = self._network.max_message_bytes
        if len(data) > limit:
            raise NetworkError(f"announcement of {len(data)} bytes exceeds {limit} bytes")
        try:
            self._validator(self._peer_id, data)
        except Exception as exc:  # validators see arbitrary bytes; any error rejects
            raise NetworkError(f"own validator rejected the announcement: {exc!r}") from exc
        self._published += 1
        count = self._published
        await trio.sleep(self._bucket_delay(trio.current_time()))
        self._announcements_out += 1
        self._bytes_out += len(data)
        self._network._broadcast(self._peer_id, count, data)

    def announcements(self) -> trio.MemoryReceiveChannel[Announcement]:
        """Return the one bounded, lossy stream of validated announcements."""
        return self._receive

    async def fetch(
        self, peer: str, digest: bytes, *, max_size: int, timeout: float
    ) -> CheckedPayload:
        """Pull the payload named ``digest`` from ``peer`` within ``timeout`` seconds.

        Returns the very bytes object the peer serves (no copy), with its digest (hashed
        once per serve, not once per fetch).

        Raises:
            PeerUnreachable: ``peer`` is not open, not an edge, partitioned off or banned.
            PayloadNotFound: ``peer`` does not serve ``digest``.
            PayloadTooLarge: the payload is larger than ``max_size``.
            TransferTimeout: the deadline passed (e.g. ``peer`` is frozen).
            ProtocolViolation: ``peer`` closed mid-transfer or sent bytes of another digest.
        """
        self._check_open()
        try:
            with trio.fail_after(timeout):
                return await self._network._transfer(self, peer, digest, max_size)
        except trio.TooSlowError:
            raise TransferTimeout(
                f"fetch of {digest.hex()[:12]} from {short_id(peer)} took over {timeout} s"
            ) from None

    async def fetch_from_holders(
        self, author: str, digest: bytes, *, size: int, holders: Callable[[], Iterable[str]],
        blame: Callable[[str, str], None], timeout: float, on_map: Callable[[], None] | None = None,
    ) -> CheckedPayload:
        """Pull from ``author`` alone (the memory network models no piece protocol)."""
        return await self.fetch(author, digest, max_size=size, timeout=timeout)

    def serve(self, digest: bytes, payload: bytes) -> None:
        """Offer ``payload`` (whose sha256 is ``digest``) to every neighbour."""
        self._served[digest] = _Served(payload)
        self._pulled.setdefault(digest, set())

    def unserve(self, digest: bytes) -> None:
        """Stop offering a payload; unknown digests are ignored."""
        self._served.pop(digest, None)
        self._pulled.pop(digest, None)

    def pulled_by(self, digest: bytes) -> frozenset[str]:
        """Peers that pulled ``digest`` from us in full while we served it."""
        return frozenset(self._pulled.get(digest, ()))

    def neighbours(self) -> tuple[str, ...]:
        """Return the peers with a usable edge to this one, sorted."""
        return self._network.topology.neighbours(self._peer_id, trio.current_time())

    @property
    def listen_addrs(self) -> list[str]:
        """None: memory peers are reached by id."""
        return []

    def bootstrap_report(self) -> list[str]:
        """None: a memory network has no bootstrap peers."""
        return []

    def ban(self, peer: str, *, seconds: float) -> None:
        """Cut the edge to ``peer`` both ways and drop its announcements for ``seconds``."""
        self._network.topology.ban(self._peer_id, peer, trio.current_time() + seconds)

    def stats(self) -> TrafficStats:
        """Return counters since the transport opened."""
        return TrafficStats(
            bytes_in=self._bytes_in, bytes_out=self._bytes_out, payload_in=self._payload_in,
            payload_out=self._payload_out, announcements_in=self._announcements_in,
            announcements_out=self._announcements_out, rejected_in=self._rejected_in)

    # -- internals -------------------------------------------------------------------

    def _bucket_delay(self, now: float) -> float:
        """Take a publish token; return how long to wait for it."""
        rate = self._network.publish_rate
        if math.isinf(rate):
            return 0.0
        burst = max(1.0, rate)
        self._tokens = min(burst, self._tokens + (now - self._stamp) * rate) - 1.0
        self._stamp = now
        return 0.0 if self._tokens >= 0 else -self._tokens / rate

    def _check_open(self) -> None:
        if self.closed:
            raise NetworkError(f"{self} is closed")

    def _close(self) -> None:
        self._closed.set()
        self._served.clear()
        self._heap.clear()
        self._send.close()

    def _schedule(self, due: float, origin: str, data: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, origin, data))
        if due < self._sleeper.deadline:  # bring the alarm forward; no task switch
            self._sleeper.deadline = due

    async def _deliver_forever(self) -> None:
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, origin, data = heapq.heappop(self._heap)
                self._accept(origin, data, now)
            self._sleeper = trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf)
            with self._sleeper:
                await trio.sleep_forever()

    def _accept(self, origin: str, data: bytes, now: float) -> None:
        if self._network.topology.banned(self._peer_id, origin, now):
            return
        if self._filter.gated(origin, now):
            self._gated += 1
            return
        key = (origin, data)  # bytes cache their hash: shared objects hash once per run
        if self._filter.seen(key):
            self._duplicates += 1
            return
        try:
            value = self._validator(origin, data)
        except Exception as exc:  # hostile bytes may raise anything; all of it rejects
            self._rejected_in += 1
            self._penalties[origin] += 1
            self._filter.penalise(origin, now)
            log.debug("%s rejected announcement from %s: %r", self, short_id(origin), exc)
            return
        try:
            self._send.send_nowait(Announcement(origin, data, value))
        except trio.WouldBlock:
            self._overflowed += 1
            return
        self._filter.remember(key)
        self._announcements_in += 1
        self._bytes_in += len(data)

    def _lookup(self, digest: bytes, hook: ServingHook | None) -> tuple[bytes | None, bool]:
        """Return what this peer sends for ``digest`` and whether it is known genuine."""
        entry = self._served.get(digest)
        payload = entry.payload if entry is not None else None
        if hook is not None:
            sent = hook(digest, payload)
            if sent is not payload:
                return sent, False
        if entry is None:
            return None, False
        if entry.genuine is None:  # hash once per serve, not once per fetch
            entry.genuine = sha256(entry.payload) == digest
        return entry.payload, entry.genuine

    async def _answer_after(self, delay: float) -> None:
        """Wait ``delay`` for the answer; fail at once if this (serving) peer closes."""
        with trio.move_on_after(delay):
            await self._closed.wait()
        if self.closed:
            raise ProtocolViolation(f"{self} closed the stream mid-transfer")


__all__ = ["LinkProfile", "MemoryNetwork", "MemoryTransport", "ServingHook"]
