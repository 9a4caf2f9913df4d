"""Relay reputation (p2pfl.net.relaybook) under a mock clock: no network, no sleeps."""

from __future__ import annotations

import trio
import trio.testing

from p2pfl.core.crypto import Identity
from p2pfl.net.relaybook import (
    BROKEN,
    EARLY,
    FAILED,
    RELAY_ROUND,
    STALLED,
    WORKED,
    RelayBook,
    relay_in,
)

GOOD, BAD, NEW = (Identity.generate().peer_id for _ in range(3))
DEST = Identity.generate().peer_id


def circuit(relay: str) -> str:
    return f"/ip4/10.0.0.1/tcp/7351/p2p/{relay}/p2p-circuit/p2p/{DEST}"


def test_the_relay_of_a_circuit_address() -> None:
    assert relay_in(circuit(BAD)) == BAD
    assert relay_in(f"/p2p/{BAD}/p2p-circuit/p2p/{DEST}") == BAD  # as a STOP side names it
    assert relay_in(f"/ip4/10.0.0.1/tcp/7351/p2p/{DEST}") is None
    assert relay_in(f"/ip4/10.0.0.1/tcp/7351/p2p-circuit/p2p/{DEST}") is None  # which relay?


async def test_one_broken_circuit_puts_a_relay_at_the_bottom_and_out_of_use() -> None:
    book = RelayBook()
    book.record(GOOD, WORKED, "reservation")
    book.record(BAD, BROKEN, "a relayed connection died under a pull")
    assert book.weight(BAD) == 0 < book.weight(GOOD)
    assert book.rank([BAD, NEW, GOOD]) == [GOOD, NEW]  # unknown relays stay usable
    assert book.rank([BAD]) == [BAD]  # the only one left: still tried
    addrs = [circuit(BAD), "/ip4/192.168.1.2/tcp/7351/p2p/" + DEST, circuit(GOOD)]
    assert book.rank_addrs(addrs) == [circuit(GOOD), addrs[1]]
    assert book.rank_addrs(addrs[:2]) == addrs[:2]  # no other relay: the bad one is kept
    assert dict(book.scores()) == {GOOD: book.weight(GOOD), BAD: 0.0}


async def test_failed_dials_count_less_than_a_stall_and_work_earns_trust_back() -> None:
    book = RelayBook()
    book.record(BAD, FAILED, "a circuit dial took over 5 s")
    assert 0 < book.weight(BAD) < book.weight(NEW)  # one failed dial: lower, still usable
    book.record(BAD, FAILED, "a circuit dial took over 5 s")
    book.record(BAD, FAILED, "reservation failed")
    assert book.weight(BAD) == 0
    for _ in range(3):
        book.record(BAD, WORKED, "a pull through it")
    assert book.weight(BAD) > 0


async def test_a_stall_sinks_an_unknown_relay_not_one_that_worked() -> None:
    book = RelayBook()
    for _ in range(3):
        book.record(GOOD, WORKED, "a pull through it")
    for relay in (GOOD, NEW):
        book.record(relay, STALLED, "a pull through it stalled")
    assert book.weight(NEW) == 0 < book.weight(GOOD)
    book.record(GOOD, BROKEN, "a relayed connection died under a pull")
    assert book.weight(GOOD) > 0  # a record of work outlives one mishap ...
    book.record(GOOD, BROKEN, "a relayed connection died under a pull")
    assert book.weight(GOOD) == 0  # ... not two


async def test_a_relay_at_the_bottom_recovers_as_its_evidence_fades(autojump_clock: trio.testing.MockClock) -> None:
    book = RelayBook()
    book.record(BAD, BROKEN, "a relayed connection died under a pull")
    assert book.weight(BAD) == 0
    await trio.sleep(5 * RELAY_ROUND)  # forgetting 0.9 a round: not enough yet
    assert book.weight(BAD) == 0
    await trio.sleep(20 * RELAY_ROUND)
    assert book.weight(BAD) > 0


async def test_a_relay_that_keeps_failing_is_dropped_for_good(autojump_clock: trio.testing.MockClock) -> None:
    book = RelayBook()
    for _ in range(book.book.config.drop_after + 1):  # evidence in every round at the bottom
        book.record(BAD, BROKEN, "a relayed connection died under a pull")
        await trio.sleep(RELAY_ROUND)
    await trio.sleep(50 * RELAY_ROUND)  # long after its score recovered: still banned
    assert book.weight(BAD) == 0
    assert book.book.score(BAD) > book.book.config.threshold  # decayed by the weight() above
    assert book.rank([BAD, NEW]) == [NEW]



async def test_a_circuit_redialled_soon_through_the_same_relay_broke(
    autojump_clock: trio.testing.MockClock,
) -> None:
    book = RelayBook()
    book.record(BAD, WORKED, "reservation")
    book.dialled(BAD, DEST)  # a first circuit: no evidence either way
    assert book.weight(BAD) > 0
    await trio.sleep(EARLY)
    book.dialled(BAD, DEST)  # the last one lasted: fine
    book.dialled(GOOD, DEST)  # another relay: fine
    assert book.weight(BAD) > 0
    await trio.sleep(EARLY / 2)
    book.dialled(BAD, DEST)  # the one before ended within EARLY: it broke
    assert book.weight(BAD) == 0
    assert book.rank([BAD, GOOD]) == [GOOD]
