"""Pull one payload from several holders at once, every piece checked before it is kept.

The author of an update is one uplink; every verified copy a neighbour holds (a HOLDS
announcement) is another. :func:`fetch_from_holders` asks one holder (the author first)
for the payload's piece map (:mod:`p2pfl.net.ranged`), then keeps ``per_source``
requests of ``chunk_pieces`` pieces in flight to each of up to ``max_sources`` holders;
a fast holder takes more chunks than a slow one. Each piece is checked against the map
as it arrives, the payload against the signed digest once the last piece is in.

Hostile holders: a holder whose request fails (stall past ``request_timeout``, reset,
NOT_FOUND, BUSY, a reply of the wrong length) is dropped for this pull and its chunk
goes back to the queue for another. A holder whose piece does not match the map is
dropped too, and blamed once the payload verifies against the signed digest (then the
map was right, so the piece was wrong). If every piece matches the map but the payload
does not match the digest, the map was wrong: its provider is blamed and the pull fails
(the caller then falls back to whole-payload pulls). When the queue is empty, an idle
worker duplicates a chunk another holder is still sending (end game), so one stalled
holder does not hold the payload back until its deadline. Holders are re-read as the
pull goes (HOLDS may arrive meanwhile).

Memory: the pieces received (at most the payload) plus one joined copy at the end; a
piece received twice is dropped at once. Transport-agnostic: the I/O is a
:class:`PieceSource`, so tests drive hostile holders in memory on a mock clock.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import trio

from p2pfl.core.crypto import short_id
from p2pfl.core.envelope import CheckedPayload, PayloadHasher
from p2pfl.errors import NetworkError, TransferError
from p2pfl.net.ranged import MAX_RANGE_PIECES, piece_count
from p2pfl.net.transfer import within

log = logging.getLogger(__name__)

Blame = Callable[[str, str], None]  # peer, reason: it served bytes that were not the payload
HOLDER_POLL = 0.5  # seconds between looks for new holders while pieces are missing


class PieceSource(Protocol):
    """Where pieces come from (``p2pfl.net.ranged`` over libp2p, or a test double)."""

    async def piece_map(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bytes]:
        """Return the sha256 of every piece, as ``peer`` says."""
        ...

    async def pieces(
        self, peer: str, digest: bytes, *, size: int, first: int, count: int, timeout: float
    ) -> Sequence[bytes]:
        """Return pieces ``first .. first + count - 1`` as ``peer`` sends them (unchecked)."""
        ...


class _Pull:
    """The state of one multi-source pull: pieces held, chunks queued and in flight."""

    def __init__(self, hashes: Sequence[bytes], size: int, chunk_pieces: int) -> None:
        n = piece_count(size)
        self.hashes = hashes
        self.pieces: list[bytes | None] = [None] * n
        self.chunks = [(first, min(chunk_pieces, n - first)) for first in range(0, n, chunk_pieces)]
        self.queue = deque(range(len(self.chunks)))
        self.asked: list[set[str]] = [set() for _ in self.chunks]  # peers sending each chunk
        self.missing = len(self.chunks)
        self._complete: set[int] = set()
        self.kept: Counter[str] = Counter()  # pieces kept, by the peer that sent them
        self.hasher = PayloadHasher()
        self._hashed = 0  # pieces fed to the hasher: the complete prefix
        self.changed = trio.Event()

    def take(self, peer: str) -> int | None:
        """Return a chunk for ``peer``: a queued one, else one in flight elsewhere (end game)."""
        while self.queue:
            chunk = self.queue.popleft()
            if not self._done(chunk):
                self.asked[chunk].add(peer)
                return chunk
        for chunk, peers in enumerate(self.asked):
            if peers and peer not in peers and len(peers) < 2 and not self._done(chunk):
                peers.add(peer)
                return chunk
        return None

    def give_back(self, chunk: int, peer: str) -> None:
        """``peer`` did not deliver ``chunk``: queue it again unless someone else has it."""
        self.asked[chunk].discard(peer)
        if not self._done(chunk) and not self.asked[chunk]:
            self.queue.appendleft(chunk)
        self.wake()

    def keep(self, chunk: int, got: Sequence[bytes], peer: str) -> bool:
        """Store the pieces of ``chunk`` that match the map; False if any did not."""
        first, count = self.chunks[chunk]
        self.asked[chunk].discard(peer)
        good = len(got) == count
        for index, piece in zip(range(first, first + count), got, strict=False):
            if self.pieces[index] is not None:
                continue  # the other end-game copy came first
            if hashlib.sha256(piece).digest() == self.hashes[index]:
                self.pieces[index] = piece
                self.kept[peer] += 1
            else:
                good = False
        if self._done(chunk):
            if chunk not in self._complete:  # the other end-game copy may complete it again
                self._complete.add(chunk)
                self.missing -= 1
        elif not self.asked[chunk]:
            self.queue.appendleft(chunk)
        self._advance()
        self.wake()
        return good

    def payload(self) -> CheckedPayload:
        """Join the pieces (call once every chunk is in)."""
        self.pieces = []
        return self.hasher.finish()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _done(self, chunk: int) -> bool:
        first, count = self.chunks[chunk]
        return all(self.pieces[i] is not None for i in range(first, first + count))

    def _advance(self) -> None:
        while self._hashed < len(self.pieces) and (piece := self.pieces[self._hashed]) is not None:
            self.hasher.add(piece)
            self._hashed += 1


async def fetch_from_holders(
    source: PieceSource,
    digest: bytes,
    *,
    size: int,
    author: str,
    holders: Callable[[], Iterable[str]],
    blame: Blame,
    timeout: float,
    request_timeout: float,
    max_sources: int = 4,
    per_source: int = 2,
    chunk_pieces: int = 4,
) -> CheckedPayload:
    """Pull the ``size``-byte payload ``digest`` from ``author`` and the current ``holders()``.

    Raises:
        TransferTimeout: ``timeout`` passed before the payload was complete and verified.
        TransferError: no holder gave a piece map, every holder failed, or the pieces
            matched the map but not ``digest`` (the map's provider is blamed).
        ValueError: ``chunk_pieces`` outside 1..16 or a non-positive count (caller bug).
    """
    if not 1 <= chunk_pieces <= MAX_RANGE_PIECES or max_sources < 1 or per_source < 1:
        raise ValueError("chunk_pieces must be 1..16, max_sources and per_source >= 1")
    return await within(timeout, f"payload {digest.hex()[:12]} not complete from its holders", lambda: _fetch(
        source, digest, size, author, holders, blame, request_timeout, max_sources, per_source, chunk_pieces,
    ))


async def _fetch(
    source: PieceSource, digest: bytes, size: int, author: str, holders: Callable[[], Iterable[str]],
    blame: Blame, request_timeout: float, max_sources: int, per_source: int, chunk_pieces: int,
) -> CheckedPayload:
    def candidates() -> list[str]:
        return list(dict.fromkeys([author, *holders()]))

    mapper, hashes = await _piece_map(source, digest, size, candidates(), request_timeout)
    pull = _Pull(hashes, size, chunk_pieces)
    suspects: dict[str, str] = {}
    started: set[str] = set()
    active: dict[str, int] = {}  # peer -> workers running

    async def work(peer: str) -> None:
        try:
            while peer in active and pull.missing:
                chunk = pull.take(peer)
                if chunk is None:
                    await pull.changed.wait()
                    continue
                first, count = pull.chunks[chunk]
                try:
                    got = await source.pieces(
                        peer, digest, size=size, first=first, count=count, timeout=request_timeout
                    )
                except NetworkError as exc:
                    log.info("pieces %d+%d from %s failed: %s", first, count, short_id(peer), exc)
                    active.pop(peer, None)
                    pull.give_back(chunk, peer)
                    return
                if not pull.keep(chunk, got, peer):
                    suspects[peer] = f"pieces {first}+{count} differ from the piece map"
                    active.pop(peer, None)
                    return
        finally:
            if peer in active:
                active[peer] -= 1
                if not active[peer]:
                    del active[peer]
            pull.wake()

    async with trio.open_nursery() as nursery:
        while pull.missing:
            for peer in candidates():
                if peer not in started and len(started) < max_sources:
                    started.add(peer)
                    active[peer] = per_source
                    for _ in range(per_source):
                        nursery.start_soon(work, peer)
            if not active:
                break
            with trio.move_on_after(HOLDER_POLL):
                await pull.changed.wait()
        nursery.cancel_scope.cancel()
    if pull.missing:
        raise TransferError(f"every holder of {digest.hex()[:12]} failed ({len(started)} tried)")
    payload = pull.payload()
    if payload.digest != digest:
        blame(mapper, "its piece map does not match the signed digest")
        raise TransferError(f"piece map from {short_id(mapper)} does not match {digest.hex()[:12]}")
    for peer, reason in suspects.items():
        blame(peer, reason)
    others = sum(n for peer, n in pull.kept.items() if peer != author)
    log.info("pulled %s: %d pieces, %d from its author, %d from %d other holders",
             digest.hex()[:12], sum(pull.kept.values()), pull.kept[author], others,
             len([p for p in pull.kept if p != author]))
    return payload


async def _piece_map(
    source: PieceSource, digest: bytes, size: int, peers: list[str], timeout: float
) -> tuple[str, Sequence[bytes]]:
    """Return the first holder that gives a piece map of the right length, and the map."""
    for peer in peers:
        try:
            hashes = await source.piece_map(peer, digest, size=size, timeout=timeout)
        except NetworkError as exc:
            log.info("piece map of %s from %s failed: %s", digest.hex()[:12], short_id(peer), exc)
            continue
        if len(hashes) == piece_count(size) and all(len(h) == 32 for h in hashes):
            return peer, hashes
        log.info("piece map from %s has the wrong shape", short_id(peer))
    raise TransferError(f"no holder of {digest.hex()[:12]} gave a piece map")


__all__ = ["Blame", "PieceSource", "fetch_from_holders"]
