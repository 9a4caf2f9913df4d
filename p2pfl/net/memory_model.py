"""Models of the simulated medium of :mod:`p2pfl.net.memory`: links, topology, receipt.

Model, and where it differs from libp2p (GossipSub + ``/p2pfl/update/1.0.0``):

- Topology is an undirected edge graph (:meth:`MemoryNetwork.connect`) that may be laid
  out before any peer opens. An edge is *usable* when both ends are open, in the same
  partition group, and neither end bans the other.
- An announcement reaches every other open peer in the publisher's component of usable
  edges (GossipSub's multi-hop mesh), each receiver independently: lost with probability
  ``loss``, else delivered after ``hops * latency + U(0, jitter)`` where ``hops`` is the
  shortest path length. Routes are taken when the message is published; a message in
  flight is still delivered after a partition or disconnect (it was already forwarded).
  Unlike GossipSub, a relay that rejects a message does not stop it reaching peers
  behind that relay. Invalid messages penalise their *origin* (there are no relays to
  blame) and, as in ``p2pfl.net.gossip``'s scoring, gate its messages for a while.
- Randomness is keyed by ``(seed, origin, n-th publish)`` and ``(seed, fetcher, peer,
  digest, time)``, not drawn from one shared stream, so a run on a ``MockClock`` is
  reproducible even though trio shuffles the order in which ready tasks run.
- Arrival times of announcements are rounded up to a multiple of ``tick`` (0.1 ms by
  default; 0 for exact times) so that jittered deliveries share scheduler wake-ups.
- A fetch needs a usable edge to the serving peer. It takes ``latency + U(0, jitter) +
  size / bandwidth``; transfers do not share bandwidth. Not-found and too-large answers
  take ``latency + U(0, jitter)``. The request is decided when it is sent: a partition,
  ban or ``unserve`` during the transfer does not interrupt it; the serving peer closing
  does (``ProtocolViolation``, at once).
- A frozen peer (think SIGSTOP) keeps its edges and still relays and receives
  announcements, but answers no fetch until thawed.
- As in ``p2pfl.net.gossip``, a re-announcement (same origin, same bytes) already
  delivered to a peer is dropped before validation; the memory of that is bounded
  (``SEEN_CAPACITY`` per peer). Rejected messages are validated again on every arrival.
- Every peer delivers announcements from one task that sleeps until the earliest due
  message of its heap: no task per message.

Here: :class:`LinkProfile` (what every link does), :class:`Topology` (plain state
with time passed in; routes cached until the topology changes or the next ban expires)
and :class:`ReceiveFilter` (dedupe and the invalid-origin gate, per receiving peer).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from p2pfl.config import require
from p2pfl.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkProfile:
    """Properties of every link of a :class:`MemoryNetwork`."""

    latency: float = 0.005  # seconds, one way, per hop
    jitter: float = 0.0  # seconds: uniform extra delay in [0, jitter]
    loss: float = 0.0  # probability one announcement is lost for one receiver
    bandwidth: float = 100e6  # bytes/s of one payload transfer (math.inf: instant)

    def __post_init__(self) -> None:
        require(self.latency >= 0 and math.isfinite(self.latency), "link.latency", "must be >= 0 s")
        require(self.jitter >= 0 and math.isfinite(self.jitter), "link.jitter", "must be >= 0 s")
        require(0.0 <= self.loss <= 1.0, "link.loss", "must be a probability in [0, 1]")
        require(self.bandwidth > 0, "link.bandwidth", "must be > 0 bytes/s")


class Topology:
    """Edges, open peers, partition groups and bans; routes over the usable edges."""

    def __init__(self) -> None:
        self._open: set[str] = set()
        self._edges: dict[str, set[str]] = {}
        self._group: dict[str, int] | None = None  # peer -> partition group; None: healed
        self._bans: dict[tuple[str, str], float] = {}  # (banner, banned) -> until
        self._routes: dict[str, list[tuple[str, int]]] = {}  # cache, cleared on change
        self._routes_until = math.inf  # the cache also expires when the next ban does

    def open(self, peer: str) -> None:
        """Mark ``peer`` open (its edges become usable)."""
        self._open.add(peer)
        self._changed()

    def close(self, peer: str) -> None:
        """Mark ``peer`` closed; its edges stay for when it opens again."""
        self._open.discard(peer)
        self._changed()

    def connect(self, a: str, b: str) -> None:
        """Add the undirected edge ``a``-``b``."""
        if a == b:
            raise ConfigError(f"cannot connect peer {a!r} to itself")
        self._edges.setdefault(a, set()).add(b)
        self._edges.setdefault(b, set()).add(a)
        self._changed()

    def disconnect(self, a: str, b: str) -> None:
        """Remove the edge ``a``-``b`` if present."""
        self._edges.get(a, set()).discard(b)
        self._edges.get(b, set()).discard(a)
        self._changed()

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut all traffic between groups until :meth:`heal`; unnamed peers form one more group."""
        group: dict[str, int] = {}
        for index, members in enumerate(groups):
            for peer in members:
                if peer in group:
                    raise ConfigError(f"peer {peer!r} is in two partition groups")
                group[peer] = index
        self._group = group
        self._changed()

    def heal(self) -> None:
        """End any partition."""
        self._group = None
        self._changed()

    def ban(self, banner: str, banned: str, until: float) -> None:
        """Make ``banner`` refuse ``banned`` (both directions of their edge) until ``until``."""
        self._bans[banner, banned] = until
        self._changed()

    def banned(self, banner: str, banned: str, now: float) -> bool:
        """Return whether ``banner`` bans ``banned`` at ``now``."""
        until = self._bans.get((banner, banned))
        return until is not None and until > now

    def usable(self, a: str, b: str, now: float) -> bool:
        """Return whether traffic flows directly between ``a`` and ``b`` at ``now``."""
        if a not in self._open or b not in self._open or b not in self._edges.get(a, ()):
            return False
        if self._group is not None and self._group.get(a, -1) != self._group.get(b, -1):
            return False
        return not (self.banned(a, b, now) or self.banned(b, a, now))

    def neighbours(self, peer: str, now: float) -> tuple[str, ...]:
        """Return the peers with a usable edge to ``peer``, sorted."""
        return tuple(sorted(b for b in self._edges.get(peer, ()) if self.usable(peer, b, now)))

    def routes_from(self, origin: str, now: float) -> list[tuple[str, int]]:
        """Return ``(peer, hops)`` for every peer reachable from ``origin``, in BFS order."""
        if now >= self._routes_until:
            self._bans = {key: until for key, until in self._bans.items() if until > now}
            self._changed()
        routes = self._routes.get(origin)
        if routes is None:
            routes, seen, frontier = [], {origin}, deque([(origin, 0)])
            while frontier:
                peer, hops = frontier.popleft()
                for other in sorted(self._edges.get(peer, ())):
                    if other not in seen and self.usable(peer, other, now):
                        seen.add(other)
                        routes.append((other, hops + 1))
                        frontier.append((other, hops + 1))
            self._routes[origin] = routes
        return routes

    def _changed(self) -> None:
        self._routes.clear()
        self._routes_until = min(self._bans.values(), default=math.inf)


# Like the libp2p gossip layer, each peer delivers an (origin, bytes) pair once: the node
# still dedupes, because the memory is bounded. ~120 bytes per entry (the data is shared).
SEEN_CAPACITY = 1024
# GossipSub's invalid-message penalty (P4) as p2pfl.net.gossip configures it, with the
# origin standing in for the forwarder: each invalid message counts 1, decaying 1% per
# second; above 2.5 (the 3rd in a row) the origin's messages are dropped unvalidated,
# for ~18 s after the 3rd. Gated messages do not count again.
INVALID_DECAY = 0.99
INVALID_CAP = 100.0
GATE_ABOVE = 2.5


class ReceiveFilter:
    """One receiving peer's memory of delivered announcements and of invalid origins."""

    def __init__(self) -> None:
        self._invalid: dict[str, tuple[float, float]] = {}  # origin -> (decayed count, when)
        self._seen: set[tuple[str, bytes]] = set()  # delivered (origin, data), FIFO-bounded
        self._seen_order: deque[tuple[str, bytes]] = deque()

    def gated(self, origin: str, now: float) -> bool:
        """Return whether ``origin``'s announcements are dropped unvalidated at ``now``."""
        return bool(self._invalid) and self._invalid_count(origin, now) > GATE_ABOVE

    def seen(self, key: tuple[str, bytes]) -> bool:
        """Return whether this ``(origin, data)`` was already delivered (bounded memory)."""
        return key in self._seen

    def remember(self, key: tuple[str, bytes]) -> None:
        """Record a delivered ``(origin, data)``, forgetting the oldest beyond capacity."""
        self._seen.add(key)
        self._seen_order.append(key)
        if len(self._seen_order) > SEEN_CAPACITY:
            self._seen.discard(self._seen_order.popleft())

    def penalise(self, origin: str, now: float) -> None:
        """Count one invalid announcement against ``origin``."""
        self._invalid[origin] = (min(INVALID_CAP, self._invalid_count(origin, now) + 1), now)

    def _invalid_count(self, origin: str, now: float) -> float:
        count, stamp = self._invalid.get(origin, (0.0, now))
        return float(count * INVALID_DECAY ** (now - stamp))


__all__ = ["GATE_ABOVE", "SEEN_CAPACITY", "LinkProfile", "ReceiveFilter", "Topology"]


ServingHook = Callable[[bytes, bytes | None], bytes | None]
"""``hook(digest, served_payload_or_None) -> bytes to send, or None for "not found"``."""


@dataclass(slots=True)
class _Served:
    """A payload a memory transport serves."""

    payload: bytes
    genuine: bool | None = None  # sha256(payload) == digest, computed on first fetch
