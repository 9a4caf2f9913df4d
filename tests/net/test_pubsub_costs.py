"""What a node pays per announcement in pubsub: first-hand delivery only, records consumed once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub import gossipsub
from libp2p.pubsub.pb import rpc_pb2

from p2pfl.config import Limits, NetConfig
from p2pfl.net import patches
from p2pfl.net.discovery import Neighbourhood
from p2pfl.net.gossip import Gossip, open_gossip
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.peerbook import COOL_OFF, SHORT_LIVED, ConnectionAges, PeerBook, PeerRecord
from tests.net.polling import wait_for
from tests.net.test_gossip import accept_ok, network


@asynccontextmanager
async def gossip_line(count: int) -> AsyncIterator[list[Gossip]]:
    """``count`` gossip instances connected in a line: 0 - 1 - ... - count-1."""
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(open_host(os.urandom(32))) for _ in range(count)]
        nodes = [
            await stack.enter_async_context(
                open_gossip(host, network_id="t", limits=Limits(), validator=accept_ok)
            )
            for host in hosts
        ]
        for left, right in zip(hosts, hosts[1:], strict=False):
            await connect(right, listen_addrs(left)[0], timeout=5)
        await wait_for(lambda: all(len(n.subscribed_peers()) >= 1 for n in nodes))
        await wait_for(lambda: len(nodes[1].subscribed_peers()) == 2)
        yield nodes


async def test_announcements_reach_neighbours_and_go_no_further() -> None:
    async with gossip_line(3) as (a, b, c):
        assert patches.active("neighbour_only")
        await c.publish(b"ok from c")
        with trio.fail_after(5):
            assert (await b.announcements().receive()).data == b"ok from c"
        # b would have forwarded c's message to a before handing it to us; a's next message
        # from b on the same stream is b's own, so nothing of c's came before it.
        await b.publish(b"ok from b")
        with trio.fail_after(5):
            got = await a.announcements().receive()
        assert got.data == b"ok from b"
        assert a.counters.delivered == 1


def test_an_unchanged_signed_record_is_consumed_once() -> None:
    patches.apply()
    assert hasattr(gossipsub.maybe_consume_signed_record, "__wrapped__")  # ours, not the stock one
    assert patches.active("signed_records")
    consumed: list[bytes] = []

    def counting(msg: Any, host: Any, peer_id: ID) -> bool:
        consumed.append(bytes(msg.senderRecord))
        return True

    consume = patches.pubsub._cached_consume(counting)
    peer = ID(b"\x00\x01p")
    first, second = rpc_pb2.RPC(senderRecord=b"record-1"), rpc_pb2.RPC(senderRecord=b"record-2")
    assert all(consume(first, None, peer) for _ in range(5))
    assert consume(second, None, peer)
    assert consume(rpc_pb2.RPC(), None, peer)  # no record: nothing to consume
    assert consumed == [b"record-1", b"record-2"]


def test_a_refused_signed_record_is_not_remembered() -> None:
    calls: list[int] = []

    def refuse(msg: Any, host: Any, peer_id: ID) -> bool:
        calls.append(1)
        return False

    consume = patches.pubsub._cached_consume(refuse)
    message = rpc_pb2.RPC(senderRecord=b"forged")
    assert not consume(message, None, ID(b"\x00\x01p"))
    assert not consume(message, None, ID(b"\x00\x01p"))
    assert len(calls) == 2


async def test_a_neighbour_that_just_moved_a_payload_is_not_probed() -> None:
    async with network(2) as (a, b):
        await wait_for(lambda: len(a.neighbours()) == 1 and len(b.neighbours()) == 1)
        probed: list[str] = []

        async def record(peer: str) -> None:
            probed.append(peer)

        a.neighbourhood._probe = record  # type: ignore[method-assign]
        payload = b"p" * 1000
        digest = hashlib.sha256(payload).digest()
        b.serve(digest, payload)
        await a.fetch(b.peer_id, digest, max_size=2000, timeout=10)
        assert a.pulled_by(digest) == frozenset()
        await wait_for(lambda: b.pulled_by(digest) == {a.peer_id})  # counted once written: maybe after our read
        await a.neighbourhood.maintain()
        assert probed == []
        a.neighbourhood._alive.clear()  # nothing moved since: probed again
        await a.neighbourhood.maintain()
        assert probed == [b.peer_id]


async def test_a_neighbour_moving_a_payload_is_not_probed() -> None:
    async with network(2) as (a, b):
        await wait_for(lambda: len(a.neighbours()) == 1)
        probed: list[str] = []

        async def record(peer: str) -> None:
            probed.append(peer)

        a.neighbourhood._probe = record  # type: ignore[method-assign]
        a.neighbourhood._alive.clear()
        a.neighbourhood.busy = lambda: {b.peer_id}  # a pull in progress: bytes are flowing
        await a.neighbourhood.maintain()
        assert probed == []
        a.neighbourhood.busy = set
        await a.neighbourhood.maintain()
        assert probed == [b.peer_id]


def stand_in_hood(current: list[str], **config: int) -> tuple[Neighbourhood, list[str]]:
    """A Neighbourhood with only what trimming needs: stand-in neighbours ``current`` that
    a disconnect removes; returns it and the list of peers it disconnected."""
    hood = object.__new__(Neighbourhood)
    hood.config = NetConfig(**config)
    hood.ages = ConnectionAges()
    hood.book = PeerBook(me="me", capacity=16, max_backoff=4.0)
    dropped: list[str] = []

    async def disconnect(peer: str) -> None:
        dropped.append(peer)
        current.remove(peer)

    hood.neighbours = lambda: tuple(current)  # type: ignore[method-assign]
    hood.disconnect = disconnect  # type: ignore[method-assign]
    return hood, dropped


async def test_trimming_drops_idle_neighbours_before_busy_ones() -> None:
    hood, dropped = stand_in_hood(["a", "b", "c", "d"], max_neighbours=2)
    await hood._trim({"a", "b", "c"})
    assert dropped[0] == "d"  # the idle one first, then one busy one: down to the cap
    assert len(dropped) == 2
    assert dropped[1] in {"a", "b", "c"}
    await hood._trim(set())
    assert len(dropped) == 2  # nothing more to trim


async def test_trimming_cuts_the_youngest_busy_neighbour_not_an_established_one() -> None:
    # A hub over its cap, every neighbour pulling: the peer that just dialled it goes, not
    # one halfway through a pull (cut at random, a hub churned its neighbours every pass).
    current = ["mid", "new", "old1", "old2"]  # "new" connected since the last pass
    hood, dropped = stand_in_hood(current, max_neighbours=3)
    hood.ages.update({"old1", "old2", "mid"}, now=0.0)
    hood.ages.update({"old1", "old2", "mid"}, now=50.0)
    await hood._trim(set(current))
    assert dropped == ["new"]


async def test_trimming_lets_a_newcomer_in_when_a_neighbour_has_neighbours_to_spare() -> None:
    # Youngest-first alone locked a node that lost its neighbours out of a full network:
    # a neighbour that said (peer exchange) it has more than the target is cut first.
    current = ["new", "old1", "old2", "spare"]
    hood, dropped = stand_in_hood(current, max_neighbours=3, target_neighbours=3)
    hood.ages.update({"old1", "old2", "spare"}, now=0.0)
    hood.ages.degree.update({"old1": 3, "old2": 2, "spare": 4})  # us included
    await hood._trim(set(current))
    assert dropped == ["spare"]  # it keeps 3 without us; "new" is in
    await hood._trim(set(current))
    assert dropped == ["spare"]


def test_a_peer_that_cut_us_soon_rests_but_an_old_neighbour_lost_does_not() -> None:
    ages, book = ConnectionAges(), PeerBook(me="me", capacity=16, max_backoff=4.0)
    for peer in ("hub", "old"):
        book.peers[peer] = PeerRecord(addrs=[f"/ip4/10.0.0.1/tcp/1/p2p/{peer}"], confirmed=True)
    assert ages.update({"old"}, now=0.0) == []
    assert ages.update({"old", "hub"}, now=100.0) == []
    gone = ages.update(set(), now=100.0 + SHORT_LIVED / 2)  # "hub" trimmed us at once
    assert gone == ["hub"]
    for peer in gone:
        book.cool(peer, 100.0 + COOL_OFF)
    assert book.candidates(101.0, exclude=set()) == ["old"]
    assert set(book.candidates(100.0 + COOL_OFF, exclude=set())) == {"hub", "old"}
    assert book.peers["hub"].failures == 0  # resting, not failing


def test_a_peer_we_cut_ourselves_is_not_rested() -> None:
    # A gossip reconnect or a trim of ours: the next pass may dial it again at once.
    ages = ConnectionAges()
    ages.update({"b"}, now=0.0)
    ages.ours.add("b")
    assert ages.update(set(), now=1.0) == []
    ages.update({"b"}, now=2.0)
    assert ages.update(set(), now=3.0) == ["b"]  # this time it cut us
