"""Multi-source pulls (p2pfl.net.swarm) against honest and hostile holders, on a mock clock.

The holders are a test double of :class:`~p2pfl.net.swarm.PieceSource`: each sends
pieces after a delay proportional to their size (its "link"), and may lie, stall,
refuse or send too much. No wall-clock time passes.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence

import pytest
import trio

from p2pfl.errors import (
    PayloadNotFound,
    PeerBusy,
    PeerUnreachable,
    ProtocolViolation,
    TransferError,
    TransferTimeout,
)
from p2pfl.net.ranged import PIECE_BYTES, piece_map
from p2pfl.net.swarm import MAX_AUTHOR_PAUSE, fetch_from_holders

PAYLOAD = os.urandom(10 * PIECE_BYTES + 12345)  # 11 pieces, the last one short
DIGEST = hashlib.sha256(PAYLOAD).digest()
SECONDS_PER_PIECE = 0.1  # an honest holder's link
REQUEST_TIMEOUT = 30.0
TIMEOUT = 120.0


def pieces_of(payload: bytes) -> list[bytes]:
    return [payload[i : i + PIECE_BYTES] for i in range(0, len(payload), PIECE_BYTES)]


def hashes(payload: bytes) -> list[bytes]:
    joined = piece_map(payload)
    return [joined[i : i + 32] for i in range(0, len(joined), 32)]


class Holders:
    """Peers serving ``PAYLOAD``; ``behaviour[peer]`` makes one hostile."""

    def __init__(self, behaviour: dict[str, str] | None = None, slow: dict[str, float] | None = None) -> None:
        self.behaviour = behaviour or {}
        self.slow = slow or {}
        self.served: Counter[str] = Counter()  # pieces sent per peer
        self.maps: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()  # requests failed on purpose

    async def piece_map(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bytes]:
        self.maps[peer] += 1
        kind = self.behaviour.get(peer, "honest")
        if kind in ("missing", "no_map"):
            raise PayloadNotFound("not held")
        if kind == "old_release":  # speaks 1.0.0 only: no 1.1.0 stream opens
            raise PeerUnreachable("protocols not supported")
        if kind.startswith("map_resets") and self.maps[peer] <= int(kind[-1]):
            raise ProtocolViolation("stream ended early")
        return hashes(FAKE if kind == "liar" else PAYLOAD)  # liar: another payload's map

    async def pieces(
        self, peer: str, digest: bytes, *, size: int, first: int, count: int, timeout: float
    ) -> Sequence[bytes]:
        kind = self.behaviour.get(peer, "honest")
        with trio.move_on_after(timeout):
            if kind == "unreachable":
                raise PeerUnreachable("gone")
            if kind == "missing":
                raise PayloadNotFound("not held")
            if kind == "stall":
                await trio.sleep_forever()
            if kind.startswith("resets") and self.failed[peer] < int(kind.removeprefix("resets")):
                self.failed[peer] += 1
                raise (PeerBusy if self.failed[peer] % 2 else ProtocolViolation)("stream ended early")
            if kind == "reset_once" and not self.served[peer]:
                self.served[peer] = 0  # counted: the next request goes through
                self.behaviour[peer] = "honest"
                raise ProtocolViolation("stream ended early")
            await trio.sleep(count * SECONDS_PER_PIECE * self.slow.get(peer, 1.0))
            source = FAKE if kind == "liar" else PAYLOAD
            got = pieces_of(source)[first : first + count]
            if kind == "wrong":
                got = [bytes(len(p)) for p in got]
            if kind == "extra":
                got = [*got, b"more"]
            self.served[peer] += len(got)
            return got
        raise TransferTimeout("stalled")

    async def have(self, peer: str, digest: bytes, *, size: int, timeout: float) -> Sequence[bool]:
        kind = self.behaviour.get(peer, "honest")
        if kind == "missing":
            raise PayloadNotFound("not held")
        if kind in ("old", "unreachable"):  # an earlier release resets the unknown op
            raise (ProtocolViolation if kind == "old" else PeerUnreachable)("no HAVE")
        return [True] * len(pieces_of(PAYLOAD))


FAKE = os.urandom(len(PAYLOAD))


async def pull(
    holders: Holders, others: list[str], blamed: list[tuple[str, str]], **options: object
) -> bytes:
    """Pull PAYLOAD in one-piece chunks: more chunks than requests, so every holder is asked."""
    def holder_list() -> list[str]:
        return others

    def blame(peer: str, reason: str) -> None:
        blamed.append((peer, reason))

    got = await fetch_from_holders(
        holders, DIGEST, size=len(PAYLOAD), author="author", holders=holder_list, blame=blame,
        timeout=options.pop("timeout", TIMEOUT),  # type: ignore[arg-type]
        request_timeout=REQUEST_TIMEOUT, **{"chunk_pieces": 1, **options},  # type: ignore[arg-type]
    )
    assert got.digest == DIGEST
    return got.data


async def test_honest_holders_share_the_pull(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders(), []
    start = trio.current_time()
    # One-piece chunks: 11 of them for 4 holders x 2 requests, so every holder gets some.
    assert await pull(holders, ["h1", "h2", "h3"], blamed) == PAYLOAD
    assert blamed == []
    assert set(holders.served) == {"author", "h1", "h2", "h3"}
    assert sum(holders.served.values()) <= 11 + 4 * 2  # end-game duplicates at most
    # Four holders with two requests each: far faster than 11 pieces from one link.
    assert trio.current_time() - start < 11 * SECONDS_PER_PIECE


async def test_author_alone_still_works(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders(), []
    assert await pull(holders, [], blamed) == PAYLOAD
    assert set(holders.served) == {"author"}
    assert blamed == []


@pytest.mark.parametrize("kind", ["wrong", "extra"])
async def test_holder_serving_bad_bytes_is_blamed_and_its_chunk_refetched(
    autojump_clock: trio.abc.Clock, kind: str
) -> None:
    holders, blamed = Holders({"rogue": kind}), []
    assert await pull(holders, ["rogue", "h1"], blamed) == PAYLOAD
    assert [peer for peer, _ in blamed] == ["rogue"]
    assert "piece map" in blamed[0][1]


@pytest.mark.parametrize("kind", ["stall", "missing", "unreachable"])
async def test_failing_holder_is_dropped_without_blame(autojump_clock: trio.abc.Clock, kind: str) -> None:
    holders, blamed = Holders({"bad": kind}), []
    start = trio.current_time()
    assert await pull(holders, ["bad", "h1"], blamed) == PAYLOAD
    assert blamed == []
    # A stalled holder's chunks are duplicated by idle workers (end game): the pull does
    # not wait for its request deadline.
    assert trio.current_time() - start < REQUEST_TIMEOUT


async def test_lying_piece_map_blames_its_provider_only(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"author": "liar"}), []
    with pytest.raises(TransferError, match="piece map"):
        await pull(holders, ["h1", "h2"], blamed)
    assert [peer for peer, _ in blamed] == ["author"]  # honest holders not blamed


async def test_map_taken_from_a_holder_when_the_author_has_none(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"author": "no_map"}), []
    assert await pull(holders, ["h1"], blamed) == PAYLOAD
    assert holders.maps["h1"] == 1


async def test_no_piece_map_anywhere_fails_at_once(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"author": "missing", "h1": "missing"}), []
    start = trio.current_time()
    with pytest.raises(TransferError, match="no holder"):
        await pull(holders, ["h1"], blamed)
    assert trio.current_time() == start


async def test_a_reset_piece_map_is_asked_again(autojump_clock: trio.abc.Clock) -> None:
    # Under a saturated link the map request's stream may be reset: the author is asked
    # again after a pause, not given up for a whole-payload pull.
    holders, blamed = Holders({"author": "map_resets2"}), []
    start = trio.current_time()
    assert await pull(holders, [], blamed) == PAYLOAD
    assert holders.maps["author"] == 3
    assert set(holders.served) == {"author"}
    assert trio.current_time() - start < 11 * SECONDS_PER_PIECE + 1.0 + 2.0 + 1.0


async def test_piece_map_resets_for_good_fail_after_the_retries(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"author": "map_resets9"}), []
    start = trio.current_time()
    with pytest.raises(TransferError, match="no holder"):
        await pull(holders, [], blamed)
    assert holders.maps["author"] == 5  # once and four retries
    assert trio.current_time() - start == pytest.approx(1.0 + 2.0 + 4.0 + 8.0)
    assert blamed == []


async def test_an_author_of_an_earlier_release_fails_at_once(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"author": "old_release"}), []
    start = trio.current_time()
    with pytest.raises(TransferError, match="no holder"):  # the caller then pulls whole over 1.0.0
        await pull(holders, [], blamed)
    assert holders.maps["author"] == 1
    assert trio.current_time() == start


async def test_an_author_resetting_many_times_in_a_row_is_not_given_up(autojump_clock: trio.abc.Clock) -> None:
    # Resets and BUSY under a saturated link: the author is asked again after a pause
    # (doubling, at most MAX_AUTHOR_PAUSE) and the pieces in are kept; no whole pull.
    holders, blamed = Holders({"author": "resets20"}), []
    start = trio.current_time()
    assert await pull(holders, [], blamed) == PAYLOAD
    assert holders.failed["author"] == 20
    assert blamed == []
    assert trio.current_time() - start < 20 * MAX_AUTHOR_PAUSE


async def test_an_undialable_author_is_still_given_up(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"author": "unreachable"}), []
    start = trio.current_time()
    with pytest.raises(TransferError, match="every holder"):
        await pull(holders, [], blamed)
    assert trio.current_time() - start < REQUEST_TIMEOUT


async def test_every_holder_failing_fails_without_waiting_for_the_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    holders, blamed = Holders({"author": "unreachable", "h1": "unreachable"}), []
    with pytest.raises(TransferError, match="every holder"):
        await pull(holders, ["h1"], blamed)
    assert blamed == []


async def test_deadline_bounds_the_whole_pull(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"author": "stall"}), []
    start = trio.current_time()
    with pytest.raises(TransferTimeout):
        await pull(holders, [], blamed, timeout=10.0)
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_holders_announced_during_the_pull_join_it(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders(slow={"author": 10.0}), []
    others: list[str] = []

    async def announce_later() -> None:
        await trio.sleep(1.0)
        others.append("late")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(announce_later)
        assert await pull(holders, others, blamed) == PAYLOAD
    assert holders.served["late"] > holders.served["author"]


async def test_bigger_chunks_rebuild_the_payload(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders({"rogue": "wrong"}), []
    assert await pull(holders, ["rogue", "h1"], blamed, chunk_pieces=4) == PAYLOAD  # 4 + 4 + 3


async def test_sources_are_capped(autojump_clock: trio.abc.Clock) -> None:
    holders, blamed = Holders(), []
    assert await pull(holders, [f"h{i}" for i in range(10)], blamed, max_sources=3) == PAYLOAD
    assert len(holders.served) <= 3


def test_bad_options_are_caller_bugs() -> None:
    async def main() -> None:
        await pull(Holders(), [], [], chunk_pieces=17)

    with pytest.raises(ValueError):
        trio.run(main)


async def test_an_author_whose_connection_reset_is_asked_again(autojump_clock: trio.abc.Clock) -> None:
    """A reset under a saturated link costs a pause, not the pull (nor its pieces)."""
    holders, blamed = Holders({"author": "reset_once"}), []
    assert await pull(holders, [], blamed) == PAYLOAD
    assert holders.served["author"] == 11
    assert blamed == []
