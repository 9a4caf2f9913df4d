"""Pull one payload from several holders at once, every piece checked before it is kept.

The author of an update is one uplink; every neighbour that said HOLDS is another: one
that verified the payload, or one still pulling it with pieces checked against the
author's piece map (a *co-puller*). :func:`fetch_from_holders` asks one holder (the
author first) for the payload's piece map (:mod:`p2pfl.net.ranged`), then keeps
``per_source`` requests of ``chunk_pieces`` pieces in flight to each of up to
``max_sources`` holders; a fast holder takes more chunks than a slow one. Each piece is
checked against the map as it arrives, the payload against the signed digest once the
last piece is in.

Swapping with co-pullers (session 10): in a synchronous round every neighbour of an
author pulls its update at the same time, so the author's uplink carries the payload
once per puller unless the pullers swap. A pull whose map came from the author is
served to others while in progress (``partials``; ``on_map`` lets the node say HOLDS at
once). Each source other than the author is asked which pieces it holds (HAVE, again
at most every :data:`HAVE_POLL` while it has nothing we lack, less often while its
answers bring nothing new) and only for those. A
source that holds everything (the author, a verified holder, a peer of an earlier
release that refuses HAVE) is asked for the chunks no co-puller offers: first those of
our own *region*, from an offset derived from our peer id up to the next co-puller's
offset, then the others from the end of each region backwards, so co-pullers ask the
author for different pieces and meet their neighbours' regions in the middle.

Hostile holders: a holder whose request fails (stall past ``request_timeout``, reset,
BUSY, a reply of the wrong length; NOT_FOUND from the author) is dropped for this pull
and its chunk goes back to the queue for another. The author alone is asked again after
a failure other than a stall: after a reset or BUSY (a connection cut under a saturated
link) after a pause doubling up to :data:`MAX_AUTHOR_PAUSE`, for as long as the pull's
deadline allows (session 11: dropped after 8 in a row, the slow author of an 8M run was
dropped 39 times, each pull then whole from it with the pieces in thrown away); while it
is not connected (``PeerUnreachable``: nobody is dialled for pieces), like a "not yet"
below. NOT_FOUND from another holder means "not yet" (a co-puller between its last piece and serving the whole payload, or a
bitfield ahead of itself): the chunk goes back, the holder is asked HAVE again after a
growing pause, and dropped after :data:`MAX_MISSES` such answers in a row. A co-puller
offers its chunks to us alone only while its oldest request is younger than
:data:`LEND_FOR`, so a stalled one does not hold the author back; co-pullers alone (no
source holding everything left) get :data:`STARVED_AFTER` without a new piece, then
the pull fails and the caller pulls whole. A holder whose piece
does not match the map is dropped too, and blamed once the payload verifies against
the signed digest (then the map was right, so the piece was wrong). If every piece
matches the map but the payload does not match the digest, the map was wrong: its
provider is blamed and the pull fails (the caller then falls back to whole-payload
pulls). When the queue is empty, an idle worker duplicates a chunk another holder is
still sending (end game), so one stalled holder does not hold the payload back until
its deadline. Holders are re-read as the pull goes (HOLDS may arrive meanwhile).

Memory: the pieces received (at most the payload) plus one joined copy at the end; a
piece received twice is dropped at once; serving a pull in progress references its
pieces. Transport-agnostic: the I/O is a :class:`PieceSource`, so tests drive hostile
holders in memory on a mock clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Protocol

import trio

from p2pfl.core.crypto import short_id
from p2pfl.core.envelope import CheckedPayload
from p2pfl.errors import (
    NetworkError,
    PayloadNotFound,
    PeerUnreachable,
    TransferError,
    TransferTimeout,
)
from p2pfl.net.pullstate import (  # LEND_FOR, region_start: re-exported, the pull's rules
    HAVE_POLL,
    LEND_FOR,
    MAX_HAVE_POLL,
    Pull,
    Source,
    region_start,
)
from p2pfl.net.ranged import MAX_RANGE_PIECES, Partial, piece_count
from p2pfl.net.transfer import within

log = logging.getLogger(__name__)

Blame = Callable[[str, str], None]  # peer, reason: it served bytes that were not the payload
HOLDER_POLL = 0.5  # seconds between looks for new holders while pieces are missing
MAX_MISSES = 8  # NOT_FOUND answers in a row before a holder other than the author is dropped
# With no full source left, co-pullers alone may never complete us (the author is gone
# for them too): give up after this long without a new piece, so the caller falls back.
STARVED_AFTER = 30.0
MAP_RETRIES = (1.0, 2.0, 4.0, 8.0)  # pauses before asking the holders for the piece map again
_MAP_FINAL = (PayloadNotFound, PeerUnreachable, TransferTimeout)  # not asked again for this pull
MAX_AUTHOR_PAUSE = 8.0  # the longest pause before asking the author again after a reset or BUSY


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

    async def have(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bool]:
        """Return which pieces ``peer`` says it holds (one flag per piece)."""
        ...


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
    me: str = "",
    partials: MutableMapping[bytes, Partial] | None = None,
    on_map: Callable[[], None] | None = None,
) -> CheckedPayload:
    """Pull the ``size``-byte payload ``digest`` from ``author`` and the current ``holders()``.

    ``me`` (our peer id) places our region; with ``partials``, a pull whose map came from
    the author is in it under ``digest`` until it ends (served to co-pullers), and
    ``on_map()`` is called once it is.

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
        me, partials if partials is not None else {}, on_map,
    ))


async def _fetch(
    source: PieceSource, digest: bytes, size: int, author: str, holders: Callable[[], Iterable[str]],
    blame: Blame, request_timeout: float, max_sources: int, per_source: int, chunk_pieces: int,
    me: str, partials: MutableMapping[bytes, Partial], on_map: Callable[[], None] | None,
) -> CheckedPayload:
    def candidates() -> list[str]:
        return list(dict.fromkeys([author, *holders()]))

    mapper, hashes = await _piece_map(source, digest, size, candidates, request_timeout)
    pull = Pull(hashes, size, chunk_pieces, me)
    shared = mapper == author and digest not in partials  # pieces checked against the author's map
    if shared:
        partials[digest] = pull
        if on_map is not None:
            on_map()
    try:
        suspects = await _swarm(pull, source, digest, author, candidates, request_timeout,
                                max_sources, per_source)
    finally:
        if shared:
            del partials[digest]
    if pull.missing:
        raise TransferError(f"every holder of {digest.hex()[:12]} failed ({len(pull.sources)} tried)")
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


async def _swarm(
    pull: Pull, source: PieceSource, digest: bytes, author: str, candidates: Callable[[], list[str]],
    request_timeout: float, max_sources: int, per_source: int,
) -> dict[str, str]:
    """Run the workers until every chunk is in or every source is gone; return the suspects."""
    suspects: dict[str, str] = {}
    size = pull.size

    def drop(peer: str) -> None:
        pull.sources[peer].workers = 0
        pull.wake()

    async def not_yet(peer: str) -> None:
        state = pull.sources[peer]
        state.misses += 1
        state.chunks = set()
        if state.misses > MAX_MISSES:
            log.info("%s still has no pieces of %s: dropped", short_id(peer), digest.hex()[:12])
            drop(peer)
        else:
            state.full = peer == author
            await trio.sleep(HAVE_POLL * state.misses)

    async def ask_have(peer: str) -> None:
        state = pull.sources[peer]
        asked = state.asked_have
        async with state.have_lock:
            if state.asked_have != asked or not state.workers:
                return  # the other worker just asked
            await trio.sleep_until(asked + state.have_pause)
            state.asked_have = trio.current_time()
            try:
                held = await source.have(peer, digest, size=size, timeout=request_timeout)
            except PayloadNotFound:
                await not_yet(peer)
                return
            except PeerUnreachable as exc:  # e.g. a holder that is no neighbour any more
                log.info("HAVE of %s from %s: %s", digest.hex()[:12], short_id(peer), exc)
                drop(peer)
                return
            except NetworkError as exc:  # an earlier release resets HAVE: it holds it all
                log.info("HAVE of %s from %s: %s; taken for a full holder", digest.hex()[:12], short_id(peer), exc)
                held = [True] * len(pull.pieces)
            if len(held) != len(pull.pieces):
                raise TransferError("a HAVE of the wrong length")  # PieceSource bug
            news = pull.offer(peer, held)
            state.have_pause = HAVE_POLL if news else min(2 * state.have_pause, MAX_HAVE_POLL)

    async def work(peer: str) -> None:
        state = pull.sources[peer]
        try:
            while state.workers and pull.missing:
                chunk = pull.take(peer)
                if chunk is None:
                    if state.full:
                        with trio.move_on_after(HAVE_POLL):  # a co-puller's lease may run out
                            await pull.changed.wait()
                    else:
                        await ask_have(peer)
                    continue
                first, count = pull.chunks[chunk]
                try:
                    got = await source.pieces(
                        peer, digest, size=size, first=first, count=count, timeout=request_timeout
                    )
                except PayloadNotFound as exc:
                    pull.give_back(chunk, peer)
                    if peer == author:
                        log.info("pieces %d+%d from %s failed: %s", first, count, short_id(peer), exc)
                        drop(peer)
                    else:
                        await not_yet(peer)
                    continue
                except NetworkError as exc:
                    log.info("pieces %d+%d from %s failed: %s", first, count, short_id(peer), exc)
                    pull.give_back(chunk, peer)
                    if peer != author or isinstance(exc, TransferTimeout):
                        drop(peer)
                        return
                    if isinstance(exc, PeerUnreachable):  # not dialled again: counted, dropped at MAX_MISSES
                        await not_yet(peer)
                    else:  # a reset or BUSY: the author is there, its link saturated; never dropped for it
                        state.resets += 1
                        await trio.sleep(min(HAVE_POLL * 2 ** min(state.resets, 8), MAX_AUTHOR_PAUSE))
                    continue
                state.misses = state.resets = 0
                if not pull.keep(chunk, got, peer):
                    suspects[peer] = f"pieces {first}+{count} differ from the piece map"
                    drop(peer)
                    return
        finally:
            pull.wake()

    async with trio.open_nursery() as nursery:
        while pull.missing:
            for peer in candidates():
                if peer not in pull.sources and len(pull.sources) < max_sources:
                    pull.sources[peer] = Source(full=peer == author, workers=per_source)
                    for _ in range(per_source):
                        nursery.start_soon(work, peer)
            alive = [s for s in pull.sources.values() if s.workers]
            starved = trio.current_time() - pull.last_kept > STARVED_AFTER
            if not alive or (starved and not any(s.full for s in alive)):
                break
            with trio.move_on_after(HOLDER_POLL):
                await pull.changed.wait()
        nursery.cancel_scope.cancel()
    return suspects


async def _piece_map(
    source: PieceSource, digest: bytes, size: int, peers: Callable[[], list[str]], timeout: float
) -> tuple[str, Sequence[bytes]]:
    """Return the first holder that gives a piece map of the right length, and the map.

    Every holder is asked in turn; if one failed on the way (a reset or BUSY under a
    saturated link, :data:`MAP_RETRIES`), all are asked again after a growing pause (the
    holders re-read): one reset of the map request used to cost a whole-payload pull.
    """
    for pause in (*MAP_RETRIES, None):
        transient = False
        for peer in peers():
            try:
                hashes = await source.piece_map(peer, digest, size=size, timeout=timeout)
            except NetworkError as exc:  # a reset, BUSY, a garbled reply: worth asking again
                log.info("piece map of %s from %s failed: %s", digest.hex()[:12], short_id(peer), exc)
                transient |= not isinstance(exc, _MAP_FINAL)
                continue
            if len(hashes) == piece_count(size) and all(len(h) == 32 for h in hashes):
                return peer, hashes
            log.info("piece map from %s has the wrong shape", short_id(peer))
        if not transient or pause is None:
            break
        await trio.sleep(pause)
    raise TransferError(f"no holder of {digest.hex()[:12]} gave a piece map")


__all__ = ["HAVE_POLL", "LEND_FOR", "Blame", "PieceSource", "fetch_from_holders", "region_start"]
