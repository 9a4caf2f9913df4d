"""How each neighbour reaches us: its path logged when it changes, one line in ``/status``.

:class:`PathLog` logs each connected peer's path (direct or through a relay) when it
changes. :func:`describe_all` gives one line per neighbour (``/status`` ``peer_paths``).

For a node that never gets a neighbour's update, the line says where the path breaks:
the connections to the peer (direct, or through which relay, with their open streams),
the connection our GossipSub stream to it runs on and how many RPCs wait in its queue,
whether pubsub lists it as subscribed to our topic and in our mesh or fanout, how many
announcements it published reached us (and how long ago the last one), and the last
pull from it that failed and why. Cheap: counters bumped per announcement and per failed
pull; the lines are built only when asked, at most once a second (:class:`PeerPaths`:
every round end and every /status poll asks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
from libp2p.abc import IHost

from p2pfl.core.bounded import BoundedMap
from p2pfl.core.crypto import short_id
from p2pfl.net.gossip import Gossip
from p2pfl.net.reach import is_relayed
from p2pfl.net.relaybook import relay_of
from p2pfl.net.streamio import parse_peer_id

logger = logging.getLogger(__name__)

_MAX_PEERS = 1024  # peers whose failed pulls are remembered (bounded: any peer may fail)
# The lines are rebuilt at most this often (s): every round end and every /status poll
# read them, and a line costs ~10-60 us per neighbour; a diagnosis may be a second old.
PATHS_TTL = 1.0


class PathLog:
    """Log each connected peer's path when it changes."""

    def __init__(self) -> None:
        self._paths: dict[str, bool] = {}  # connected peer -> relayed? (as last logged)

    def update(self, connected: Iterable[str], relayed: Iterable[str]) -> None:
        """Log the peers in ``connected`` whose path changed (``relayed``: through a relay only)."""
        through = set(relayed)
        now = {p: p in through for p in connected}
        for peer, through_relay in now.items():
            if self._paths.get(peer) != through_relay:
                logger.info("peer %s: %s", short_id(peer), "through a relay" if through_relay else "direct")
        self._paths = now


@dataclass(frozen=True, slots=True)
class Failure:
    """The last failed pull from a peer."""

    at: float  # trio time
    error: str
    count: int


class PullFailures:
    """The last failed pull per peer (bounded)."""

    def __init__(self) -> None:
        self._last: BoundedMap[str, Failure] = BoundedMap(_MAX_PEERS)

    def record(self, peer: str, error: BaseException) -> None:
        """Note that a pull from ``peer`` failed with ``error``."""
        before = self._last.peek(peer)
        text = f"{type(error).__name__}: {error}"[:120]
        self._last.put(peer, Failure(trio.current_time(), text, 1 + (before.count if before else 0)))

    def last(self, peer: str) -> Failure | None:
        """The last failed pull from ``peer``, or None."""
        return self._last.peek(peer)


def _path(conn: object) -> str:
    if not is_relayed(conn):
        return "direct"
    relay = relay_of(conn)
    return f"via {short_id(relay) if relay else '?'}"


def describe(host: IHost, gossip: Gossip, failures: PullFailures, peer: str) -> str:
    """One line on ``peer``'s connections, gossip state, announcements heard, failed pulls."""
    now = trio.current_time()
    peer_id = parse_peer_id(peer)
    conns = list(host.get_network().get_connections(peer_id))
    parts = ["conns " + (", ".join(f"{_path(c)} s{len(c.get_streams())}"  # type: ignore[attr-defined]
                                  + (" closed" if c.is_closed else "") for c in conns) or "none")]
    stream = gossip.pubsub.peers.get(peer_id)
    if stream is None:
        parts.append("pubsub out none")
    else:
        on = next((c for c in conns if c.muxed_conn is stream.muxed_conn), None)  # type: ignore[attr-defined]
        queue = gossip.pubsub.peer_queues.get(peer_id)
        parts.append(f"pubsub out {_path(on) if on is not None else 'gone'} q{len(queue) if queue else 0}")
    router = gossip.router
    parts.append(" ".join(
        name for name, yes in (
            ("subscribed", peer_id in gossip.pubsub.peer_topics.get(gossip.topic, ())),
            ("mesh", peer_id in router.mesh.get(gossip.topic, ())),
            ("fanout", peer_id in router.fanout.get(gossip.topic, ())),
        ) if yes) or "unsubscribed")
    heard = gossip.heard(peer)
    parts.append(f"heard {heard[0]}" + (f" ({now - heard[1]:.1f} s ago)" if heard[0] else ""))
    failed = failures.last(peer)
    if failed is not None:
        parts.append(f"pulls failed {failed.count}, last {now - failed.at:.1f} s ago: {failed.error}")
    return "; ".join(parts)


def describe_all(host: IHost, gossip: Gossip, failures: PullFailures,
                 peers: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(peer, line) for each of ``peers``; a peer that cannot be described says why."""
    rows = []
    for peer in peers:
        try:
            rows.append((peer, describe(host, gossip, failures, peer)))
        except Exception as error:  # a diagnosis never takes /status down
            rows.append((peer, f"undescribed: {error!r}"))
    return tuple(rows)


class PeerPaths:
    """A transport's ``peer_paths``: its failed pulls, and the lines rebuilt at most every
    :data:`PATHS_TTL` seconds."""

    def __init__(self, host: IHost, gossip: Gossip) -> None:
        self.host = host
        self.gossip = gossip
        self.failures = PullFailures()
        self._built: tuple[float, tuple[tuple[str, str], ...]] | None = None  # (trio time, lines)

    def lines(self, neighbours: Callable[[], tuple[str, ...]]) -> tuple[tuple[str, str], ...]:
        """(peer, line) for each of ``neighbours()``, at most :data:`PATHS_TTL` s old."""
        now = trio.current_time()
        if self._built is None or now - self._built[0] >= PATHS_TTL:
            self._built = (now, describe_all(self.host, self.gossip, self.failures, neighbours()))
        return self._built[1]


__all__ = ["PATHS_TTL", "Failure", "PathLog", "PeerPaths", "PullFailures", "describe", "describe_all"]
