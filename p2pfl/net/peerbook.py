"""The bounded address book of :mod:`p2pfl.net.discovery`: peers, backoff, bans.

Pure bookkeeping: time comes in as an argument, nothing here does I/O.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import multiaddr
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2pfl.core.crypto import short_id

MAX_ADDR_CHARS = 256
MAX_ADDRS_PER_PEER = 4
BASE_BACKOFF = 0.5
# A connection that ends within SHORT_LIVED seconds of its start was most likely cut by a
# peer that had neighbours enough (trimmed: youngest first): not dialled again for
# COOL_OFF seconds. Redialled at once, a full hub took it back and cut another pull
# (session 11: 135 trims in a 4-minute run, each resetting the transfers on it).
SHORT_LIVED = 10.0
COOL_OFF = 30.0


@dataclass
class PeerRecord:
    """What we know about one peer."""

    addrs: list[str]
    bootstrap: bool = False
    confirmed: bool = False  # spoke our network's peer exchange
    failures: int = 0
    retry_at: float = 0.0
    banned_until: float = 0.0
    last_error: str = ""  # what the last failed dial or exchange answered
    relay_only: bool = False  # connected, but does not speak our peer exchange


class PeerBook:
    """A bounded address book with backoff and bans; time comes in as an argument."""

    def __init__(self, *, me: str, capacity: int, max_backoff: float, jitter: float = 0.5) -> None:
        """``jitter``: each backoff is shortened by up to this fraction, at random, so two
        peers dialling each other do not retry in lockstep (their simultaneous dials
        kept failing each other's handshakes off loopback)."""
        self.me = me
        self.jitter = jitter
        self.capacity = capacity
        self.max_backoff = max_backoff
        self.peers: dict[str, PeerRecord] = {}

    def learn(self, address: str, *, bootstrap: bool = False) -> str | None:
        """Record ``address``; return its PeerId, or None if invalid, ours, or no room."""
        peer = parse_p2p_addr(address)
        if peer is None or peer == self.me:
            return None
        record = self.peers.get(peer)
        if record is None:
            if len(self.peers) >= self.capacity and not self._evict_one():
                return None
            record = self.peers[peer] = PeerRecord(addrs=[], bootstrap=bootstrap)
        record.bootstrap |= bootstrap
        if address not in record.addrs:
            record.addrs.insert(0, address)
            del record.addrs[MAX_ADDRS_PER_PEER:]
        return peer

    def _evict_one(self) -> bool:
        """Forget the most-failed non-bootstrap, unconfirmed peer; False if none may go."""
        victims = [p for p, r in self.peers.items() if not r.bootstrap and not r.confirmed]
        if not victims:
            return False
        del self.peers[max(victims, key=lambda p: self.peers[p].failures)]
        return True

    def failed(self, peer: str, now: float, reason: str = "") -> float:
        """Count a failed dial or exchange, push the next attempt back; return the delay."""
        record = self.peers.get(peer)
        if record is None:
            return 0.0
        record.failures += 1
        record.last_error = reason or record.last_error
        delay = min(self.max_backoff, BASE_BACKOFF * 2 ** (record.failures - 1))
        delay *= 1.0 - self.jitter * random.random()
        record.retry_at = now + delay
        return delay

    def bootstrap_report(self, connected: set[str]) -> list[str]:
        """Return one ``<peer>: <what it answered>`` entry per bootstrap peer."""
        out = []
        for peer, record in self.peers.items():
            if record.bootstrap:
                state = ("connected" if peer in connected else "not tried yet") \
                    if not record.last_error else record.last_error
                out.append(f"{record.addrs[0] if record.addrs else short_id(peer)}: {state}")
        return out

    def succeeded(self, peer: str) -> None:
        """Mark ``peer`` as a confirmed member of our network; reset its backoff."""
        record = self.peers.get(peer)
        if record is not None:
            record.confirmed, record.failures, record.retry_at = True, 0, 0.0
            record.last_error, record.relay_only = "", False

    def cool(self, peer: str, until: float) -> None:
        """Do not offer ``peer`` as a candidate before ``until`` (no failure counted)."""
        if (record := self.peers.get(peer)) is not None:
            record.retry_at = max(record.retry_at, until)

    def ban(self, peer: str, until: float) -> None:
        """Refuse ``peer`` until ``until``."""
        record = self.peers.setdefault(peer, PeerRecord(addrs=[]))
        record.banned_until = max(record.banned_until, until)

    def is_banned(self, peer: str, now: float) -> bool:
        """Return whether ``peer`` is banned at ``now``."""
        record = self.peers.get(peer)
        return record is not None and record.banned_until > now

    def candidates(self, now: float, exclude: set[str]) -> list[str]:
        """Return dialable peers not in ``exclude``: confirmed first, then shuffled."""
        ready = [
            p for p, r in self.peers.items()
            if p not in exclude and r.addrs and r.retry_at <= now and r.banned_until <= now
        ]
        random.shuffle(ready)
        return sorted(ready, key=lambda p: not self.peers[p].confirmed)

    def target(self, configured: int | None) -> int:
        """Return how many neighbours to keep: configured, or max(3, ceil(log2 N))."""
        if configured is not None:
            return configured
        return max(3, math.ceil(math.log2(len(self.peers) + 1)))


class ConnectionAges:
    """When each connected peer was first seen connected (one maintenance pass's precision),
    and how many neighbours each said it has (its last peer-exchange reply)."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}  # bounded by our connections
        self.degree: dict[str, int] = {}  # likewise
        self.ours: set[str] = set()  # peers we disconnected ourselves since the last update

    def update(self, connected: set[str], now: float) -> list[str]:
        """Record ``connected`` at ``now``; return the peers gone within :data:`SHORT_LIVED`
        that we did not disconnect ourselves."""
        gone = [p for p, t in self.since.items()
                if p not in connected and p not in self.ours and now - t < SHORT_LIVED]
        self.ours.clear()
        self.since = {p: self.since.get(p, now) for p in connected}
        self.degree = {p: d for p, d in self.degree.items() if p in connected}
        return gone

    def trim_order(self, idle: list[str], busy: list[str], target: int) -> list[str]:
        """Neighbours in the order to cut: idle before busy; in each, first those that said
        they have more than ``target`` neighbours (they need not dial again), then the
        others; the youngest first within each (not an established neighbour's half-done
        pull). A newcomer (no reply yet) is cut only after those with neighbours to spare,
        so a full network still lets in a node that lost its neighbours."""
        def key(peer: str) -> tuple[bool, float]:
            return self.degree.get(peer, 0) <= target, -self.since.get(peer, math.inf)

        return [*sorted(idle, key=key), *sorted(busy, key=key)]


def parse_p2p_addr(address: str) -> str | None:
    """Return the PeerId of a ``/ip4|ip6|dns…/tcp/N/p2p/<id>`` multiaddr, or None."""
    if not isinstance(address, str) or len(address) > MAX_ADDR_CHARS or "/tcp/" not in address:
        return None
    return _peer_of(address)


@functools.lru_cache(maxsize=4096)  # every probe re-reads the same addresses: parse each once
def _peer_of(address: str) -> str | None:
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(address)).peer_id.to_string()
    except Exception:  # hostile text: any parse failure means "not an address"
        return None


__all__ = [
    "BASE_BACKOFF", "COOL_OFF", "MAX_ADDRS_PER_PEER", "MAX_ADDR_CHARS", "SHORT_LIVED", "ConnectionAges", "PeerBook",
    "PeerRecord", "parse_p2p_addr",
]
