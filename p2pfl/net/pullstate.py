"""The state of one multi-source pull (:mod:`p2pfl.net.swarm`): pieces, chunks, sources.

Pure bookkeeping on trio's clock, no I/O: which chunks are queued, in flight and
complete, what each holder offers, and which chunk a holder is asked for next (our
region first from a full source, a co-puller's offers left to it while it is live,
duplicates only in the end game). Every piece is checked against the piece map before
it is kept; the complete prefix is hashed as it grows.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from p2pfl.core.envelope import CheckedPayload, PayloadHasher
from p2pfl.net.ranged import piece_count

HAVE_POLL = 0.5  # seconds between HAVE requests to a co-puller with nothing we lack...
MAX_HAVE_POLL = 2.0  # ...doubling up to this while its answers bring nothing new
LEND_FOR = 10.0  # seconds a co-puller's oldest request may run while its chunks wait for it


def region_start(peer: str, chunks: int) -> int:
    """The chunk a puller starts from when asking the author: spread by peer id."""
    return int.from_bytes(hashlib.sha256(peer.encode()).digest()[:8], "big") % chunks


@dataclass
class Source:
    """What we know of one holder during a pull."""

    full: bool  # holds every piece: the author, a verified holder, an earlier release
    chunks: set[int] = field(default_factory=set)  # chunks it holds in full (its last HAVE)
    workers: int = 0
    misses: int = 0  # NOT_FOUND in a row
    resets: int = 0  # the author's resets and BUSY in a row
    asking: dict[int, float] = field(default_factory=dict)  # chunk -> when we asked for it
    asked_have: float = float("-inf")
    have_pause: float = HAVE_POLL
    have_lock: trio.Lock = field(default_factory=trio.Lock)


class Pull:
    """The state of one multi-source pull: pieces held, chunks queued and in flight."""

    def __init__(self, hashes: Sequence[bytes], size: int, chunk_pieces: int, me: str) -> None:
        n = piece_count(size)
        self.size, self.hashes = size, hashes
        self.pieces: list[bytes | None] = [None] * n
        self.chunks = [(first, min(chunk_pieces, n - first)) for first in range(0, n, chunk_pieces)]
        k = len(self.chunks)
        start = region_start(me, k)
        self.order = [(start + i) % k for i in range(k)]  # ours first: see preference()
        self.queued = set(range(k))
        self.asked: list[set[str]] = [set() for _ in self.chunks]  # peers sending each chunk
        self.sources: dict[str, Source] = {}
        self.missing = k
        self._complete: set[int] = set()
        self.kept: Counter[str] = Counter()  # pieces kept, by the peer that sent them
        self.hasher = PayloadHasher()
        self._hashed = 0  # pieces fed to the hasher: the complete prefix
        self.changed = trio.Event()
        self.last_kept = trio.current_time()

    def preference(self) -> list[int]:
        """Chunks in the order a full source is asked: our region forward, then the rest
        backwards (from the end of the region before ours, toward its owner)."""
        starts = {region_start(p, len(self.chunks)) for p, s in self.sources.items() if s.workers and not s.full}
        cut = next((i for i in range(1, len(self.order)) if self.order[i] in starts), len(self.order))
        return self.order[:cut] + self.order[cut:][::-1]

    def _lent(self, now: float) -> set[int]:
        """Queued chunks a live co-puller offers: left to it rather than a full source."""
        lent: set[int] = set()
        for s in self.sources.values():
            if not s.full and s.workers and (not s.asking or now - min(s.asking.values()) < LEND_FOR):
                lent |= s.chunks
        return lent

    def take(self, peer: str) -> int | None:
        """Return a chunk for ``peer``: a queued one it holds (a full source: one no live
        co-puller offers), else one in flight elsewhere once none is queued (end game)."""
        source = self.sources[peer]
        if source.full:
            lent = self._lent(trio.current_time())
            chunk = next((c for c in self.preference() if c in self.queued and c not in lent), None)
        else:
            chunk = next((c for c in self.order if c in self.queued and c in source.chunks), None)
        if chunk is None and not self.queued:
            chunk = next((c for c, peers in enumerate(self.asked) if peers and peer not in peers and len(peers) < 2
                          and (source.full or c in source.chunks) and not self._done(c)), None)
        if chunk is None:
            return None
        self.queued.discard(chunk)
        self.asked[chunk].add(peer)
        source.asking[chunk] = trio.current_time()
        return chunk

    def give_back(self, chunk: int, peer: str) -> None:
        """``peer`` did not deliver ``chunk``: queue it again unless someone else has it."""
        self._settle(chunk, peer)
        if not self._done(chunk) and not self.asked[chunk]:
            self.queued.add(chunk)
        self.wake()

    def keep(self, chunk: int, got: Sequence[bytes], peer: str) -> bool:
        """Store the pieces of ``chunk`` that match the map; False if any did not."""
        first, count = self.chunks[chunk]
        self._settle(chunk, peer)
        good = len(got) == count
        for index, piece in zip(range(first, first + count), got, strict=False):
            if self.pieces[index] is not None:
                continue  # the other end-game copy came first
            if hashlib.sha256(piece).digest() == self.hashes[index]:
                self.pieces[index] = piece
                self.kept[peer] += 1
                self.last_kept = trio.current_time()
            else:
                good = False
        if self._done(chunk):
            if chunk not in self._complete:  # the other end-game copy may complete it again
                self._complete.add(chunk)
                self.missing -= 1
        elif not self.asked[chunk]:
            self.queued.add(chunk)
        self._advance()
        self.wake()
        return good

    def offer(self, peer: str, held: Sequence[bool]) -> bool:
        """Record a HAVE: the chunks ``peer`` holds in full (all of them makes it a full
        source); return whether it offers a chunk we still need that it did not before."""
        source = self.sources[peer]
        before = source.chunks
        source.chunks = {c for c, (f, n) in enumerate(self.chunks) if all(held[f : f + n])}
        source.full = len(source.chunks) == len(self.chunks)
        self.wake()
        return any(not self._done(c) for c in source.chunks - before)

    def payload(self) -> CheckedPayload:
        """Join the pieces (call once every chunk is in)."""
        self.pieces = []
        return self.hasher.finish()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _settle(self, chunk: int, peer: str) -> None:
        self.asked[chunk].discard(peer)
        if (source := self.sources.get(peer)) is not None:
            source.asking.pop(chunk, None)

    def _done(self, chunk: int) -> bool:
        first, count = self.chunks[chunk]
        return all(self.pieces[i] is not None for i in range(first, first + count))

    def _advance(self) -> None:
        while self._hashed < len(self.pieces) and (piece := self.pieces[self._hashed]) is not None:
            self.hasher.add(piece)
            self._hashed += 1


__all__ = ["HAVE_POLL", "LEND_FOR", "MAX_HAVE_POLL", "Pull", "Source", "region_start"]
