"""Where each relay stands with this node: the reputation book, fed by what circuits do.

A relay forwards Noise ciphertext it can neither read nor forge, but it can refuse,
drop, stall or garble circuits. Its users judge it with the same
:class:`~p2pfl.core.reputation.ReputationBook` and evidence kinds that judge updates
(a separate book: a peer's relaying says nothing about its updates, and the other way
round), one book round per :data:`RELAY_ROUND` seconds:

- :data:`WORKED`, a reservation or a pull over a relayed connection that works:
  ACCEPTED (a circuit dialled earns nothing yet: a hostile relay lets the handshakes
  through and breaks what follows);
- :data:`FAILED`, a reservation or circuit dial that fails without the relay refusing
  (a full relay, or a peer without a slot there, is no evidence): NO_SHOW, mild (a dead
  relay, or a slow one);
- :data:`STALLED`, a pull over a relayed connection that stalls to its deadline or
  cannot open its stream, or a peer exchange (the neighbour probe) through it that fails:
  OUTLIER by a half (an unknown relay falls to the bottom at once, one with a record of
  working circuits does not: the far end may have been slow);
- :data:`BROKEN`, a relayed connection that dies under a pull (the relay dropped it, or
  garbled a byte and Noise closed it), or a circuit to a peer opened through the same
  relay within :data:`EARLY` of the last one, whichever end dialled either (it broke
  whatever it carried; the far end redials at once, or we do):
  OUTLIER in full, a relay's worst (no ban at once: a far end that breaks its own
  connection could frame the relay).

:meth:`RelayBook.rank` orders relays best first and leaves out those at the bottom
(weight 0: below the threshold, or dropped by the book after ``drop_after`` rounds
there) while another exists: reservations and dials go to the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from p2pfl.core.crypto import short_id
from p2pfl.core.reputation import Evidence, ReputationBook, ReputationConfig

logger = logging.getLogger(__name__)

RELAY_ROUND = 10.0  # seconds of relay evidence per book round: forgetting 0.9 -> ~100 s memory
EARLY = 10.0  # a circuit to a peer redialled through the same relay sooner than this broke
# What a relay did -> (evidence, amount) in its book.
WORKED = (Evidence.ACCEPTED, 1.0)
FAILED = (Evidence.NO_SHOW, 1.0)
STALLED = (Evidence.OUTLIER, 0.5)
BROKEN = (Evidence.OUTLIER, 1.0)
CIRCUIT = "/p2p-circuit"


def relay_in(address: str) -> str | None:
    """The relay's PeerId in a ``…/p2p/<relay>/p2p-circuit/…`` address, else None."""
    before, found, _ = address.partition(CIRCUIT)
    _, p2p, relay = before.rpartition("/p2p/")
    return relay if found and p2p and relay else None


def relay_of(conn: object) -> str | None:
    """The relay a relayed swarm connection runs through (from its circuit address)."""
    try:
        addrs = conn.get_transport_addresses()  # type: ignore[attr-defined]
    except Exception:  # a half-built connection
        return None
    return next((r for a in addrs if (r := relay_in(str(a))) is not None), None)


class RelayBook:
    """Scores of the relays this node used (see module docstring)."""

    def __init__(self, config: ReputationConfig | None = None) -> None:
        self.book = ReputationBook(config or ReputationConfig())
        self._closed: int | None = None  # the last book round ended (None: none seen yet)
        self._dialled: dict[tuple[str, str], float] = {}  # (relay, peer) -> last circuit (trio time)

    def _round(self) -> int:
        """The current book round; rounds gone by are closed first (decay, drops)."""
        now = int(trio.current_time() // RELAY_ROUND)
        if self._closed is None:
            self._closed = now - 1
        if now - 1 > self._closed:
            for relay in self.book.end_round(now - 1):
                logger.info("relay %s: at the bottom for %d rounds, not used", short_id(relay),
                            self.book.config.drop_after)
            self._closed = now - 1
        return now

    def record(self, relay: str, what: tuple[Evidence, float], reason: str) -> None:
        """Record what a circuit or reservation through ``relay`` did (:data:`WORKED`, …)."""
        was_usable = self.weight(relay) > 0
        evidence, amount = what
        self.book.record(relay, evidence, round=self._round(), amount=amount, reason=reason)
        if what != WORKED:
            fell = was_usable and self.weight(relay) == 0
            logger.info("relay %s: %s (%s)", short_id(relay), reason,
                        "now at the bottom" if fell else f"score {self.book.score(relay):.2f}")

    def dialled(self, relay: str, peer: str) -> None:
        """Note a circuit to ``peer`` through ``relay`` opened (dialled by either end): BROKEN
        if the last one opened recently (it ended: the caller counts no circuit opened
        alongside a live one)."""
        now = trio.current_time()
        self._dialled = {k: t for k, t in self._dialled.items() if now - t < EARLY}
        last = self._dialled.get((relay, peer))
        self._dialled[(relay, peer)] = now
        if last is not None:
            self.record(relay, BROKEN, f"its circuit to {short_id(peer)} ended within {now - last:.1f} s")

    def weight(self, relay: str) -> float:
        """The relay's score, or 0 at the bottom (below the threshold, or dropped)."""
        return self.book.weight(relay) if not self.book.banned(relay, round=self._round()) else 0.0

    def rank(self, relays: Iterable[str]) -> list[str]:
        """``relays`` best first (stable among equals), without those at the bottom unless
        no other is left."""
        ordered = sorted(relays, key=lambda r: -self.book.score(r))
        usable = [r for r in ordered if self.weight(r) > 0]
        return usable or ordered

    def rank_addrs(self, addrs: Iterable[str]) -> list[str]:
        """A peer's addresses to dial: the relayed ones by :meth:`rank` of their relays
        (one at the bottom left out while another remains), then the direct ones."""
        addrs = list(addrs)
        relayed = {a: r for a in addrs if (r := relay_in(a)) is not None}
        kept = set(self.rank(dict.fromkeys(relayed.values())))
        ranked = sorted((a for a in relayed if relayed[a] in kept),
                        key=lambda a: -self.book.score(relayed[a]))
        return [*ranked, *(a for a in addrs if a not in relayed)]

    def scores(self) -> tuple[tuple[str, float], ...]:
        """Every judged relay with its weight (0: at the bottom), sorted by PeerId."""
        return tuple((relay, round(self.weight(relay), 3)) for relay in self.book.peers())


__all__ = ["BROKEN", "CIRCUIT", "EARLY", "FAILED", "RELAY_ROUND", "STALLED", "WORKED", "RelayBook", "relay_in", "relay_of"]
