"""Co-pullers swap pieces (p2pfl.net.swarm): several nodes pull one payload at once from
an author with a slow uplink, each serving the pieces it checked to the others.

The network is a test double on a mock clock: every peer has one uplink that sends one
reply at a time (the author's slow, the pullers' fast); a puller serves what its pull in
progress holds (its ``partials``), as :class:`~p2pfl.net.ranged.RangedServer` does, and
everything once its pull is done (as a node serving what it verified). No wall-clock
time passes.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence

import pytest
import trio

from p2pfl.errors import PayloadNotFound, PeerUnreachable, TransferError, TransferTimeout
from p2pfl.net.ranged import PIECE_BYTES, Partial
from p2pfl.net.swarm import (
    HOLDER_POLL,
    LEND_FOR,
    MAX_MISSES,
    STARVED_AFTER,
    fetch_from_holders,
    region_start,
)
from tests.net.test_swarm import hashes, pieces_of

PAYLOAD = os.urandom(24 * PIECE_BYTES)
DIGEST = hashlib.sha256(PAYLOAD).digest()
PIECES = pieces_of(PAYLOAD)
AUTHOR_SECONDS = 1.0  # per piece through the author's uplink
PEER_SECONDS = 0.1  # per piece between pullers
TIMEOUT = 600.0
REQUEST_TIMEOUT = 150.0


class Net:
    """The author, pullers serving their pulls in progress, and hostile peers."""

    def __init__(self, pullers: Sequence[str], hostile: dict[str, str] | None = None) -> None:
        self.partials: dict[str, dict[bytes, Partial]] = {p: {} for p in pullers}
        self.done: set[str] = set()
        self.hostile = hostile or {}
        self.uplinks = {p: trio.Lock() for p in ["author", *pullers, *self.hostile]}
        self.sent: Counter[str] = Counter()  # pieces sent, per peer
        self.haves: Counter[str] = Counter()

    def _held(self, peer: str) -> list[bytes | None]:
        if peer == "author" or peer in self.done:
            return list(PIECES)
        partial = self.partials.get(peer, {}).get(DIGEST)
        if partial is None:
            raise PayloadNotFound("not held")
        return list(partial.pieces)

    async def piece_map(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bytes]:
        if peer != "author":
            raise PayloadNotFound("asked the author first")
        return hashes(PAYLOAD)

    async def have(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bool]:
        self.haves[peer] += 1
        kind = self.hostile.get(peer)
        if kind in ("claims_all", "wrong"):
            return [True] * len(PIECES)
        if kind in ("claims_half", "stall"):
            return [i < len(PIECES) // 2 for i in range(len(PIECES))]
        if kind == "empty":
            return [False] * len(PIECES)
        return [p is not None for p in self._held(peer)]

    async def pieces(
        self, peer: str, digest: bytes, *, size: int, first: int, count: int, timeout: float
    ) -> Sequence[bytes]:
        kind = self.hostile.get(peer)
        with trio.fail_after(timeout):
            if peer == "author" and "author" in self.hostile:
                raise PeerUnreachable("the author left")
            if kind == "stall":
                await trio.sleep_forever()
            held = [bytes(len(p)) for p in PIECES] if kind == "wrong" else (
                [None] * len(PIECES) if kind else self._held(peer))
            got = held[first : first + count]
            if any(p is None for p in got):
                raise PayloadNotFound("not yet")
            async with self.uplinks[peer]:
                await trio.sleep(count * (AUTHOR_SECONDS if peer == "author" else PEER_SECONDS))
            self.sent[peer] += count
            return [p for p in got if p is not None]

    async def pull(
        self, me: str, holders: Sequence[str], blamed: list[str], *, share: bool = True
    ) -> float:
        """Pull as ``me`` from the author and ``holders``; return when it finished."""
        got = await fetch_from_holders(
            self, DIGEST, size=len(PAYLOAD), author="author", holders=lambda: list(holders),
            blame=lambda peer, reason: blamed.append(peer), timeout=TIMEOUT,
            request_timeout=REQUEST_TIMEOUT, me=me, partials=self.partials[me] if share else None,
        )
        assert got.data == PAYLOAD
        self.done.add(me)  # then it serves the verified payload whole
        return trio.current_time()


async def pull_together(net: Net, pullers: Sequence[str], **options: object) -> list[float]:
    """Every puller pulls at once, each naming the others (and any hostile peer) as holders."""
    finished: dict[str, float] = {}
    blamed: list[str] = []

    async def one(me: str) -> None:
        others = [p for p in [*pullers, *net.hostile] if p != me]
        finished[me] = await net.pull(me, others, blamed, **options)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        for me in pullers:
            nursery.start_soon(one, me)
    net.blamed = blamed  # type: ignore[attr-defined]
    return [finished[p] for p in pullers]


PULLERS = ["p1", "p2", "p3"]


async def test_co_pullers_take_each_piece_from_the_author_about_once(autojump_clock: trio.abc.Clock) -> None:
    alone, swapped = Net(PULLERS), Net(PULLERS)
    start = trio.current_time()
    slow = max(await pull_together(alone, PULLERS, share=False)) - start
    start = trio.current_time()
    fast = max(await pull_together(swapped, PULLERS)) - start
    # Without swapping the author's uplink carries the payload once per puller.
    assert alone.sent["author"] >= 3 * len(PIECES) - 2
    assert slow >= 3 * len(PIECES) * AUTHOR_SECONDS * 0.9
    # Swapping: each piece leaves the author about once, and the pullers finish far sooner.
    assert swapped.sent["author"] <= 1.5 * len(PIECES)
    assert sum(swapped.sent[p] for p in PULLERS) >= len(PIECES)
    assert fast <= 0.5 * slow
    assert swapped.blamed == []  # type: ignore[attr-defined]


async def test_pullers_start_their_regions_apart() -> None:
    starts = {region_start(p, 6) for p in ["p1", "p2", "p3", "p4", "p5"]}
    assert len(starts) >= 3  # spread by peer id (a hash): not all from chunk 0


@pytest.mark.parametrize("kind", ["claims_all", "claims_half"])
async def test_a_co_puller_lying_about_what_it_has_is_dropped_unblamed(
    autojump_clock: trio.abc.Clock, kind: str
) -> None:
    net = Net(PULLERS, {"liar": kind})
    start = trio.current_time()
    done = await pull_together(net, PULLERS)
    assert net.blamed == []  # type: ignore[attr-defined]  # it sent nothing wrong
    assert net.sent["liar"] == 0
    # Its "not yet" answers cost a few pauses, not the pull: MAX_MISSES growing pauses at most.
    assert max(done) - start <= 1.5 * len(PIECES) * AUTHOR_SECONDS + 0.5 * MAX_MISSES * (MAX_MISSES + 1)


async def test_a_co_puller_sending_wrong_pieces_is_blamed(autojump_clock: trio.abc.Clock) -> None:
    net = Net(PULLERS, {"rogue": "wrong"})
    await pull_together(net, PULLERS)
    assert set(net.blamed) == {"rogue"}  # type: ignore[attr-defined]  # by every puller it served


async def test_a_stalled_co_puller_holds_the_author_back_no_longer_than_its_lease(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = Net(["p1"], {"staller": "stall"})
    start = trio.current_time()
    blamed: list[str] = []
    done = await net.pull("p1", ["staller"], blamed)
    assert blamed == []
    # It offers the first half: the author leaves those chunks to it until its oldest
    # request is LEND_FOR old, then takes them; the end game duplicates its two.
    assert done - start <= len(PIECES) * AUTHOR_SECONDS + LEND_FOR


async def test_a_co_puller_with_nothing_yet_is_asked_again_not_dropped(autojump_clock: trio.abc.Clock) -> None:
    """p2 says HOLDS before it has a piece (and between its last piece and serving it
    whole, it answers NOT_FOUND): p1 keeps asking it and takes pieces from it later."""
    net = Net(["p1", "p2"])
    blamed: list[str] = []
    async with trio.open_nursery() as nursery:

        async def p2_later() -> None:
            await trio.sleep(3.0)  # NOT_FOUND meanwhile: "not yet"
            await net.pull("p2", ["p1"], blamed)

        nursery.start_soon(p2_later)
        await net.pull("p1", ["p2"], blamed)
    assert blamed == []
    assert net.haves["p2"] >= 2
    assert net.sent["p2"] > 0


async def test_a_pull_is_served_only_while_it_runs_and_only_with_the_authors_map(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = Net(["p1"])
    seen: list[bool] = []

    def on_map() -> None:
        seen.append(DIGEST in net.partials["p1"])

    got = await fetch_from_holders(
        net, DIGEST, size=len(PAYLOAD), author="author", holders=list, blame=lambda p, r: None,
        timeout=TIMEOUT, request_timeout=REQUEST_TIMEOUT, me="p1", partials=net.partials["p1"],
        on_map=on_map)
    assert got.data == PAYLOAD
    assert seen == [True]
    assert net.partials["p1"] == {}

    class NoAuthorMap(Net):
        async def piece_map(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bytes]:
            if peer == "author":
                raise PayloadNotFound("no map")
            return hashes(PAYLOAD)

    other = NoAuthorMap(["p1", "h"])
    other.done.add("h")
    seen.clear()
    await fetch_from_holders(
        other, DIGEST, size=len(PAYLOAD), author="author", holders=lambda: ["h"], blame=lambda p, r: None,
        timeout=TIMEOUT, request_timeout=REQUEST_TIMEOUT, me="p1", partials=other.partials["p1"],
        on_map=lambda: seen.append(True))
    assert seen == []  # a holder's map is its word only: nothing served from it

    with pytest.raises(TransferTimeout):  # a failed pull is unregistered too
        await fetch_from_holders(
            net, DIGEST, size=len(PAYLOAD), author="author", holders=list, blame=lambda p, r: None,
            timeout=2.0, request_timeout=REQUEST_TIMEOUT, me="p1", partials=net.partials["p1"])
    assert net.partials["p1"] == {}


async def test_co_pullers_alone_give_up_when_nothing_comes(autojump_clock: trio.abc.Clock) -> None:
    """The author left after its map; a co-puller stays but never has a piece for us: the
    pull fails after STARVED_AFTER (the caller then pulls whole), not at its deadline."""
    net = Net(["p1"], {"author": "gone", "idle": "empty"})
    start = trio.current_time()
    with pytest.raises(TransferError, match="every holder"):
        await net.pull("p1", ["idle"], [])
    assert STARVED_AFTER <= trio.current_time() - start <= STARVED_AFTER + 2 * HOLDER_POLL
