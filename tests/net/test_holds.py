"""HOLDS: a node says it holds a big verified payload; pullers take pieces from such holders.

The node's side of multi-source pulls, on test doubles of the transport: the outbox
publishes one HOLDS per big payload it verified, and the fetcher hands the holders it
heard of to the transport, reports the holders the transport blames, and falls back to
whole pulls from each holder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import pytest
import torch
import trio

from p2pfl.config import Limits
from p2pfl.core.codec import encode_state
from p2pfl.core.envelope import (
    AnnouncementKind,
    CheckedPayload,
    VerifiedHeader,
    hash_payload,
    parse_announcement,
    sign_update,
)
from p2pfl.core.reputation import Evidence
from p2pfl.core.rounds import Inbox
from p2pfl.errors import NetworkError, PayloadNotFound, ProtocolViolation, TransferTimeout
from p2pfl.net.transport import Transport
from p2pfl.node import outbox as outbox_module
from p2pfl.node.inbound import Fetcher
from p2pfl.node.outbox import HOLDS_MIN_BYTES
from tests.node.conftest import identities
from tests.node.test_parts import NET, Recorder, recording_outbox

BIG = {"w": torch.zeros(HOLDS_MIN_BYTES // 4 + 1)}  # just over one piece of float32
SMALL = {"w": torch.zeros(8)}


def signed(state: dict[str, torch.Tensor], author: int = 1) -> tuple[VerifiedHeader, bytes]:
    payload = encode_state(state)
    update = sign_update(identities(2)[author], network_id=NET, round=0, payload=payload,
                         samples=1, ts_ms=0, codec="raw")
    return update, payload


async def test_a_big_verified_payload_is_served_and_announced_once() -> None:
    recorder = Recorder()
    outbox = recording_outbox(recorder)
    update, payload = signed(BIG)
    await outbox.hold(update, payload)
    await outbox.hold(update, payload)  # pulled again (another round's window): no second notice
    assert recorder.served[update.header.digest] is payload
    (me,) = identities(1)
    (notice,) = recorder.published
    parsed = parse_announcement(me.peer_id, notice, network_id=NET)  # any origin may say HOLDS
    assert parsed.kind is AnnouncementKind.HOLDS
    assert parsed.update.header == update.header  # the author's signed header, unchanged


async def test_a_pull_serving_its_pieces_says_holds_at_once_and_not_again_when_done() -> None:
    recorder = Recorder()
    outbox = recording_outbox(recorder)
    update, payload = signed(BIG)
    await outbox.pulling(update)  # the piece map is in: co-pullers may take our pieces
    assert len(recorder.published) == 1
    assert recorder.served == {}  # nothing whole yet
    await outbox.hold(update, payload)  # verified: served whole, no second notice
    assert recorder.served[update.header.digest] is payload
    assert len(recorder.published) == 1
    small, _ = signed(SMALL)
    await outbox.pulling(small)
    assert len(recorder.published) == 1


async def test_no_early_holds_in_a_network_of_author_only_pulls() -> None:
    recorder = Recorder()
    (me,) = identities(1)
    outbox = outbox_module.Outbox(transport=cast(Transport, recorder), identity=me, network_id=NET,
                                  max_lag=1, compute=None, holds=False)  # type: ignore[arg-type]
    update, payload = signed(BIG)
    await outbox.pulling(update)
    await outbox.hold(update, payload)
    assert recorder.published == []
    assert recorder.served == {}


async def test_a_small_payload_is_served_without_a_notice() -> None:
    recorder = Recorder()
    update, payload = signed(SMALL)
    await recording_outbox(recorder).hold(update, payload)
    assert update.header.digest in recorder.served
    assert recorder.published == []


class Pulls:
    """The part of a transport the fetcher uses; the author's pull fails or blames."""

    def __init__(self, payload: bytes, *, author_fails: bool, blames: str | None = None) -> None:
        self.payload, self.author_fails, self.blames = payload, author_fails, blames
        self.holders_seen: list[list[str]] = []
        self.whole_from: list[str] = []

    def neighbours(self) -> tuple[str, ...]:
        return tuple(i.peer_id for i in identities(2)) + ("h1", "h2")

    async def fetch_from_holders(
        self, author: str, digest: bytes, *, size: int, holders: Callable[[], Iterable[str]],
        blame: Callable[[str, str], None], timeout: float, on_map: Callable[[], None] | None = None,
    ) -> CheckedPayload:
        self.holders_seen.append(list(holders()))
        if on_map is not None:
            on_map()  # the pull serves its pieces
        if self.blames is not None:
            blame(self.blames, "pieces 0+4 differ from the piece map")
        if self.author_fails:
            raise TransferTimeout("author stalled")
        return hash_payload(self.payload)

    async def fetch(self, peer: str, digest: bytes, *, max_size: int, timeout: float) -> CheckedPayload:
        self.whole_from.append(peer)
        return hash_payload(self.payload)


async def fetch_with(
    pulls: Pulls | Flaky, update: VerifiedHeader, *, within: float = 5.0, pulling: list[Any] | None = None
) -> list[tuple[str, Evidence]]:
    reports: list[tuple[str, Evidence]] = []

    async def on_pulling(update: VerifiedHeader) -> None:
        if pulling is not None:
            pulling.append(update)
    delivered = trio.Event()

    async def inline(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    async def on_delivered(update: VerifiedHeader, payload: bytes) -> None:
        delivered.set()

    fetcher = Fetcher(
        transport=cast(Transport, pulls), inbox=Inbox(), template={"w": (torch.Size([8]), torch.float32)},
        limits=Limits(), fetch_timeout=5.0, compute=inline,
        report=lambda peer, evidence, reason: reports.append((peer, evidence)), delivered=on_delivered,
        pulling=on_pulling,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        for holder in ("h2", "h1", update.header.sender):  # the author's own notice is no extra source
            fetcher.remember_holder(update.header.digest, holder)
        fetcher.start(update)
        with trio.move_on_after(within):
            await delivered.wait()
        nursery.cancel_scope.cancel()
    if not delivered.is_set():
        raise TimeoutError(f"nothing delivered in {within} s")
    return reports


async def test_fetcher_hands_the_holders_to_the_transport_and_reports_its_blame() -> None:
    update, payload = signed(SMALL)
    pulls = Pulls(payload, author_fails=False, blames="h2")
    pulling: list[VerifiedHeader] = []
    reports = await fetch_with(pulls, update, pulling=pulling)
    assert pulling == [update]  # the transport said its pull serves pieces: HOLDS at once
    assert pulls.holders_seen == [["h1", "h2"]]
    assert reports == [("h2", Evidence.INVALID_FORMAT)]
    assert pulls.whole_from == []


async def test_fetcher_falls_back_to_whole_pulls_from_holders() -> None:
    update, payload = signed(SMALL)
    pulls = Pulls(payload, author_fails=True)
    assert await fetch_with(pulls, update) == []
    assert pulls.whole_from == ["h1"]  # the first holder answered


async def test_whole_pulls_go_to_holders_that_are_still_neighbours_only() -> None:
    # A holder we are no longer connected to is not dialled for it (it would become a
    # neighbour; redials of that kind kept a full hub trimming).
    update, payload = signed(SMALL)
    pulls = Pulls(payload, author_fails=True)
    pulls.neighbours = lambda: tuple(i.peer_id for i in identities(2)) + ("h2",)  # type: ignore[method-assign]
    assert await fetch_with(pulls, update) == []
    assert pulls.whole_from == ["h2"]


class Flaky:
    """A transport whose author fails with ``errors`` in turn, then serves; holders hold nothing."""

    def __init__(self, payload: bytes, errors: list[NetworkError]) -> None:
        self.payload, self.errors = payload, errors
        self.attempts: list[float] = []  # when each pull of the author began

    def neighbours(self) -> tuple[str, ...]:
        return tuple(i.peer_id for i in identities(2))

    async def fetch_from_holders(self, author: str, digest: bytes, **_: Any) -> CheckedPayload:
        self.attempts.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return hash_payload(self.payload)

    async def fetch(self, peer: str, digest: bytes, **_: Any) -> CheckedPayload:
        raise PayloadNotFound(f"{peer} holds nothing")  # the holders fetch_with names


async def test_a_pull_broken_on_the_way_is_pulled_again_after_a_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    update, payload = signed(SMALL)
    broken = [ProtocolViolation("stream ended early"), TransferTimeout("stalled")]
    pulls = Flaky(payload, broken)
    assert await fetch_with(pulls, update, within=60.0) == []
    assert len(pulls.attempts) == 3
    waits = [b - a for a, b in zip(pulls.attempts, pulls.attempts[1:], strict=False)]
    assert waits == pytest.approx([1.0, 2.0])  # backing off, not hammering the author


async def test_pulls_again_stop_when_nothing_can_mend_them(autojump_clock: trio.testing.MockClock) -> None:
    update, payload = signed(SMALL)
    pulls = Flaky(payload, [TransferTimeout("stalled"), PayloadNotFound("not served any more")])
    with pytest.raises(TimeoutError):
        await fetch_with(pulls, update, within=600.0)
    assert len(pulls.attempts) == 2  # not found is final: no third pull


async def test_no_pull_again_from_an_author_that_is_no_neighbour_any_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    update, payload = signed(SMALL)
    pulls = Flaky(payload, [TransferTimeout("stalled")])
    # Trimmed after the first try:
    pulls.neighbours = lambda: () if pulls.attempts else (update.header.sender,)  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await fetch_with(pulls, update, within=600.0)
    assert len(pulls.attempts) == 1  # no dial back to it just for this payload


async def test_pulls_again_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    update, payload = signed(SMALL)
    pulls = Flaky(payload, [TransferTimeout("stalled")] * 100)
    with pytest.raises(TimeoutError):
        await fetch_with(pulls, update, within=3600.0)
    assert 2 <= len(pulls.attempts) <= 8


async def test_the_serving_window_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "WINDOW_BYTES", 2 * len(signed(BIG)[1]))
    recorder = Recorder(neighbours=4)  # 20 payloads by count: only the bytes bound applies
    outbox = recording_outbox(recorder)
    digests = []
    for step in (1, 2, 1, 3):  # step 1's payload again: it becomes the newest, not a twin
        update, payload = signed({"w": BIG["w"] + step})
        await outbox.hold(update, payload)
        digests.append(update.header.digest)
    assert list(recorder.served) == digests[-2:]  # steps 1 and 3: the two newest fit
