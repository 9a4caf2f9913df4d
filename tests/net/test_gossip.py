"""Gossip announcements, and (in-process) discovery and the composed libp2p transport.

Discovery's address book and the transport live here too because their in-process
tests share these fixtures; real multi-process runs are in tests/real.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID

from p2pfl.config import Limits, NetConfig
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError, NetworkError, PeerUnreachable
from p2pfl.net import gossip as gossip_module
from p2pfl.net import peerpaths
from p2pfl.net.discovery import (
    MAX_REPLY_BYTES,
    PeerBook,
    decode_lines,
    encode_reply,
    encode_request,
    parse_p2p_addr,
)
from p2pfl.net.gossip import (
    UNLISTED_AFTER,
    BoundedCache,
    Gossip,
    TokenBucket,
    open_gossip,
    topic_for,
)
from p2pfl.net.host import connect, key_pair_from_secret, listen_addrs, open_host
from p2pfl.net.libp2p_transport import Libp2pTransport, open_libp2p_transport
from p2pfl.net.transport import Transport
from tests.net.polling import wait_for


def peer_addr(port: int = 4001) -> str:
    from libp2p.peer.id import ID

    peer = ID.from_pubkey(key_pair_from_secret(os.urandom(32)).public_key).to_string()
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"


# ------------------------------------------------------------------------- pure parts


def test_topic_is_bound_to_the_network() -> None:
    assert topic_for("digits-1") == "p2pfl/digits-1/updates/1"


def test_token_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(8.0, burst=8.0, now=0.0)
    assert [bucket.delay(0.0) for _ in range(8)] == [0.0] * 8
    assert bucket.delay(0.0) == pytest.approx(1 / 8)
    assert bucket.delay(10.0) == 0.0  # refilled, capped at the burst


def test_bounded_cache_evicts_least_recently_used() -> None:
    cache = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # refreshes a
    cache.put("c", 3)
    assert "b" not in cache
    assert "a" in cache
    assert "c" in cache


def test_peer_book_backoff_doubles_and_is_capped() -> None:
    book = PeerBook(me="me", capacity=8, max_backoff=2.0, jitter=0.0)
    address = peer_addr()
    peer = book.learn(address, bootstrap=True)
    assert peer is not None
    assert book.candidates(0.0, set()) == [peer]
    retry = []
    for _ in range(4):
        book.failed(peer, 0.0)
        retry.append(book.peers[peer].retry_at)
    assert retry == [0.5, 1.0, 2.0, 2.0]
    assert book.candidates(1.9, set()) == []
    assert book.candidates(2.0, set()) == [peer]
    book.succeeded(peer)
    assert book.peers[peer].failures == 0
    assert book.peers[peer].confirmed


def test_peer_book_is_bounded_and_keeps_bootstrap_and_confirmed() -> None:
    book = PeerBook(me="me", capacity=2, max_backoff=1.0)
    boot = book.learn(peer_addr(1), bootstrap=True)
    first = book.learn(peer_addr(2))
    assert first is not None
    book.succeeded(first)
    assert book.learn(peer_addr(3)) is None  # only bootstrap and confirmed: no room
    assert set(book.peers) == {boot, first}


def test_peer_book_bans_and_rejects_garbage() -> None:
    book = PeerBook(me="me", capacity=8, max_backoff=1.0)
    for bad in ["", "/ip4/1.2.3.4/tcp/1", "\xff" * 10, "/ip4/1.2.3.4/tcp/1/p2p/nope", "x" * 300]:
        assert book.learn(bad) is None
    peer = book.learn(peer_addr())
    assert peer is not None
    book.ban(peer, until=10.0)
    assert book.is_banned(peer, 5.0)
    assert not book.is_banned(peer, 10.0)
    assert book.candidates(5.0, set()) == []


def test_auto_target_is_log2_of_known_peers_at_least_three() -> None:
    book = PeerBook(me="me", capacity=64, max_backoff=1.0)
    assert book.target(None) == 3
    for port in range(1, 32):
        book.learn(peer_addr(port))
    assert book.target(None) == 5  # ceil(log2(32))
    assert book.target(7) == 7


def test_peer_exchange_messages_are_bounded() -> None:
    addrs = [peer_addr(port) for port in range(1, 200)]
    assert len(encode_reply("net", addrs)) <= MAX_REPLY_BYTES
    assert len(decode_lines(encode_reply("net", addrs), max_lines=1000)) <= 33
    request = decode_lines(encode_request("net", addrs[:2]), max_lines=10)
    assert request[0] == "p2pfl-pex/1 net"
    assert request[1:] == addrs[:2]
    assert parse_p2p_addr(addrs[0]) is not None


def test_net_config_validates() -> None:
    with pytest.raises(ConfigError, match="bootstrap"):
        NetConfig(bootstrap=("/ip4/127.0.0.1/tcp/1",))
    with pytest.raises(ConfigError, match="publish_rate"):
        NetConfig(publish_rate=50)
    with pytest.raises(ConfigError, match="target_neighbours"):
        NetConfig(target_neighbours=20, max_neighbours=4)


# ------------------------------------------------------------------------ gossip pairs


def accept_ok(origin: str, data: bytes) -> bytes:
    if not data.startswith(b"ok"):
        raise ValueError("not ok")
    return data.upper()


@asynccontextmanager
async def gossip_pair(
    *, validator_a=accept_ok, validator_b=accept_ok, limits_a=None, buffer_a=256  # type: ignore[no-untyped-def]
) -> AsyncIterator[tuple[Gossip, Gossip]]:
    async with AsyncExitStack() as stack:
        host_a = await stack.enter_async_context(open_host(os.urandom(32)))
        host_b = await stack.enter_async_context(open_host(os.urandom(32)))
        a = await stack.enter_async_context(open_gossip(
            host_a, network_id="t", limits=limits_a or Limits(), validator=validator_a,
            buffer=buffer_a))
        b = await stack.enter_async_context(open_gossip(
            host_b, network_id="t", limits=Limits(), validator=validator_b))
        await connect(host_b, listen_addrs(host_a)[0], timeout=5)
        await wait_for(lambda: bool(a.subscribed_peers()) and bool(b.subscribed_peers()))
        yield a, b


async def test_announcement_is_validated_and_carries_origin_and_value() -> None:
    async with gossip_pair() as (a, b):
        await b.publish(b"ok hello")
        with trio.fail_after(5):
            got = await a.announcements().receive()
        assert (got.origin, got.data, got.value) == (
            b.host.get_id().to_string(), b"ok hello", b"OK HELLO")
        assert a.counters.delivered == 1
        assert b.counters.published == 1


async def test_own_message_reaches_a_subscribed_peer_outside_the_mesh() -> None:
    async with gossip_pair() as (a, b):
        b.router.mesh[b.topic] = set()  # as if a had connected but not been GRAFTed yet
        await b.publish(b"ok flood")
        with trio.fail_after(0.5):  # well before the next heartbeat's IHAVE would bring it
            assert (await a.announcements().receive()).data == b"ok flood"


async def test_reannouncement_is_not_redelivered_and_validator_runs_once() -> None:
    calls: list[bytes] = []

    def counting(origin: str, data: bytes) -> bytes:
        calls.append(data)
        return data

    async with gossip_pair(validator_a=counting) as (a, b):
        for _ in range(3):
            await b.publish(b"ok same")
        await b.publish(b"ok other")
        with trio.fail_after(5):
            assert (await a.announcements().receive()).data == b"ok same"
            assert (await a.announcements().receive()).data == b"ok other"
        await wait_for(lambda: a.counters.duplicates == 2)
        assert calls == [b"ok same", b"ok other"]


async def test_a_dead_stream_to_a_connected_peer_keeps_its_subscriptions() -> None:
    async with gossip_pair() as (a, b):
        peer = b.host.get_id()
        old = a.pubsub.peers[peer]
        await old.reset()  # a's stream to b dies (its connection replaced), b stays connected
        await a.publish(b"ok lost")  # the write fails: pubsub drops the stream, opens another
        await wait_for(lambda: a.pubsub.peers.get(peer) not in (None, old))
        assert a.subscribed_peers() == (peer.to_string(),)  # b never sends them again
        await a.publish(b"ok again")
        with trio.fail_after(5):
            assert (await b.announcements().receive()).data == b"ok again"


async def test_a_neighbour_gossip_does_not_list_for_a_while_is_named(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listed, lost = (Identity.generate().peer_id for _ in range(2))
    topic = topic_for("t")
    conns: dict[str, list[object]] = {listed: [object()], lost: [object()]}
    network = SimpleNamespace(get_connections=lambda peer: conns[peer.to_string()])
    pubsub = SimpleNamespace(peer_topics={topic: {ID.from_base58(listed)}},
                             peers={ID.from_base58(p): object() for p in (listed, lost)})
    gossip = Gossip(SimpleNamespace(get_network=lambda: network), pubsub, None,  # type: ignore[arg-type]
                    topic=topic, limits=Limits(), validator=echo_validator, publish_rate=8.0, buffer=4)
    assert gossip.unlisted([listed, lost]) == []
    await trio.sleep(UNLISTED_AFTER - 0.1)
    assert gossip.unlisted([listed, lost]) == []  # a new connection says hello within this
    await trio.sleep(0.1)
    assert gossip.unlisted([listed, lost]) == [lost]
    conns[lost] = [object()]  # connected anew: the wait starts over
    assert gossip.unlisted([listed, lost]) == []
    await trio.sleep(UNLISTED_AFTER)
    assert gossip.unlisted([listed, lost]) == [lost]
    pubsub.peer_topics[topic].add(ID.from_base58(lost))  # listed again: the wait starts over
    assert gossip.unlisted([listed, lost]) == []
    pubsub.peer_topics[topic].clear()
    assert gossip.unlisted([listed]) == []  # lost is no neighbour now: forgotten
    await trio.sleep(UNLISTED_AFTER)
    assert gossip.unlisted([listed, lost]) == [listed]  # lost counts from this call only


async def test_a_subscribed_neighbour_without_our_stream_for_a_while_is_named(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Pubsub lists the peer as subscribed, but our own stream to it is gone and was not
    # opened again (seen over a relay that stalls stream openings): it hears nothing of ours.
    peer = Identity.generate().peer_id
    topic = topic_for("t")
    conns: dict[str, list[object]] = {peer: [object()]}
    network = SimpleNamespace(get_connections=lambda p: conns[p.to_string()])
    pubsub = SimpleNamespace(peer_topics={topic: {ID.from_base58(peer)}}, peers={ID.from_base58(peer): object()})
    gossip = Gossip(SimpleNamespace(get_network=lambda: network), pubsub, None,  # type: ignore[arg-type]
                    topic=topic, limits=Limits(), validator=echo_validator, publish_rate=8.0, buffer=4)
    await trio.sleep(UNLISTED_AFTER)
    assert gossip.unlisted([peer]) == []  # subscribed, with our stream: fine
    pubsub.peers.clear()  # our stream died and none replaced it
    assert gossip.unlisted([peer]) == []
    await trio.sleep(UNLISTED_AFTER - 0.1)
    assert gossip.unlisted([peer]) == []  # pubsub may yet open another within this
    await trio.sleep(0.1)
    assert gossip.unlisted([peer]) == [peer]
    pubsub.peers[ID.from_base58(peer)] = object()  # a stream again: the wait starts over
    assert gossip.unlisted([peer]) == []


async def test_a_neighbour_gossip_lost_is_reconnected_and_hears_us_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gossip_module, "UNLISTED_AFTER", 0.2)
    async with network(2) as (a, b):
        await wait_for(lambda: a.neighbours() == (b.peer_id,) and b.gossip.subscribed_peers() == (a.peer_id,)
                       and a.gossip.subscribed_peers() == (b.peer_id,))
        a.gossip.pubsub._forget_all_subscriptions(ID.from_base58(b.peer_id))  # lost, whatever the way
        await wait_for(lambda: a.stats().gossip_reconnects == 1)  # a's next pass reconnected b
        await wait_for(lambda: a.gossip.subscribed_peers() == (b.peer_id,))  # both said hello again
        await a.publish(b"after")
        with trio.fail_after(5):
            assert (await b.announcements().receive()).data == b"after"


async def test_own_rejected_or_oversize_publish_raises_and_costs_nothing() -> None:
    async with gossip_pair() as (a, b):
        with pytest.raises(NetworkError, match="own validator"):
            await b.publish(b"forged")
        with pytest.raises(NetworkError, match="max_message_bytes"):
            await b.publish(b"ok" + bytes(Limits().max_message_bytes))
        me = b.host.get_id().to_string()
        assert b.score(me) == 0.0  # our own scorer did not count us as invalid
        await b.publish(b"ok still fine")
        with trio.fail_after(5):
            assert (await a.announcements().receive()).data == b"ok still fine"


async def test_oversize_is_rejected_before_the_validator() -> None:
    seen: list[int] = []

    def recording(origin: str, data: bytes) -> bytes:
        seen.append(len(data))
        return data

    async with gossip_pair(validator_a=recording, validator_b=lambda o, d: d,
                           limits_a=Limits(max_message_bytes=100)) as (a, b):
        await b.publish(bytes(500))
        await b.publish(b"ok small")
        with trio.fail_after(5):
            assert (await a.announcements().receive()).data == b"ok small"
        assert a.counters.oversize == 1
        assert seen == [len(b"ok small")]


async def test_full_channel_drops_and_counts() -> None:
    async with gossip_pair(buffer_a=2) as (a, b):
        for i in range(5):
            await b.publish(b"ok %d" % i)
        await wait_for(lambda: a.counters.delivered + a.counters.dropped_full == 5)
        assert a.counters.delivered == 2
        assert a.counters.dropped_full == 3


async def test_publish_rate_is_limited() -> None:
    async with gossip_pair() as (a, b):
        start = trio.current_time()
        for i in range(12):  # burst of 8, then 4 at 8/s
            await b.publish(b"ok %d" % i)
        assert trio.current_time() - start >= 0.45


# ------------------------------------------------------------------ transport, in-process


def echo_validator(origin: str, data: bytes) -> bytes:
    return data


@asynccontextmanager
async def network(n: int) -> AsyncIterator[list[Libp2pTransport]]:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_libp2p_transport(
            secret=os.urandom(32), network_id="t", config=NetConfig(maintenance_interval=0.3),
            limits=Limits(), validator=echo_validator))
        config = NetConfig(bootstrap=tuple(first.listen_addrs), maintenance_interval=0.3)
        nodes = [first]
        for _ in range(n - 1):
            nodes.append(await stack.enter_async_context(open_libp2p_transport(
                secret=os.urandom(32), network_id="t", config=config, limits=Limits(),
                validator=echo_validator)))
        yield nodes


async def test_transport_forms_neighbours_gossips_and_fetches() -> None:
    async with network(4) as nodes:
        assert all(isinstance(node, Transport) for node in nodes)
        await wait_for(lambda: all(len(n.neighbours()) == 3 for n in nodes))
        payload = os.urandom(1 << 20)
        digest = hashlib.sha256(payload).digest()
        nodes[1].serve(digest, payload)
        await wait_for(lambda: all(len(n.gossip.subscribed_peers()) == 3 for n in nodes))
        await nodes[1].publish(b"holder notice")
        for node in (nodes[0], nodes[2], nodes[3]):
            with trio.fail_after(5):
                assert (await node.announcements().receive()).origin == nodes[1].peer_id
        got = await nodes[3].fetch(nodes[1].peer_id, digest, max_size=2 << 20, timeout=10)
        assert got.data == payload
        assert nodes[3].stats().bytes_in >= len(payload)
        assert nodes[1].stats().bytes_out >= len(payload)


async def test_peer_paths_say_how_each_neighbour_reaches_us() -> None:
    async with network(2) as (a, b):
        await wait_for(lambda: a.neighbours() == (b.peer_id,) and a.gossip.subscribed_peers() == (b.peer_id,))
        await b.publish(b"hello")
        with trio.fail_after(5):
            await a.announcements().receive()
        with pytest.raises(NetworkError):
            await a.fetch(b.peer_id, bytes(32), max_size=10, timeout=5)  # b serves no such payload
        [(peer, line)] = a.stats().peer_paths
        assert peer == b.peer_id
        assert line.startswith("conns direct s")
        for part in ("pubsub out direct q0", "subscribed", "heard 1 (", "pulls failed 1, last"):
            assert part in line, line


async def test_peer_paths_are_rebuilt_at_most_once_a_second(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every round end and every /status poll read the lines; each costs ~10-60 us a neighbour.
    built: list[tuple[str, ...]] = []

    def describe_all(host: object, gossip: object, failures: object, peers: tuple[str, ...]) -> tuple:
        built.append(peers)
        return tuple((p, f"line {len(built)}") for p in peers)

    monkeypatch.setattr(peerpaths, "describe_all", describe_all)
    paths = peerpaths.PeerPaths(host=None, gossip=None)  # type: ignore[arg-type]
    assert paths.lines(lambda: ("a",)) == (("a", "line 1"),)
    await trio.sleep(peerpaths.PATHS_TTL - 0.01)
    assert paths.lines(lambda: ("a", "b")) == (("a", "line 1"),)  # still fresh
    await trio.sleep(0.01)
    assert paths.lines(lambda: ("a", "b")) == (("a", "line 2"), ("b", "line 2"))
    assert built == [("a",), ("a", "b")]


async def test_ban_disconnects_refuses_and_penalises() -> None:
    async with network(3) as (a, b, c):
        await wait_for(lambda: all(len(n.neighbours()) == 2 for n in (a, b, c)))
        a.ban(c.peer_id, seconds=60)
        await wait_for(lambda: c.peer_id not in a.neighbours())
        assert a.gossip.score(c.peer_id) < -100
        with pytest.raises(PeerUnreachable, match="banned"):
            await a.fetch(c.peer_id, bytes(32), max_size=10, timeout=1)
        # c keeps trying (it does not know it is banned) but never becomes a's neighbour.
        await c.neighbourhood.maintain()
        await a.neighbourhood.maintain()
        assert c.peer_id not in a.neighbours()
        assert b.peer_id in a.neighbours()


async def test_peer_of_another_network_is_not_a_neighbour() -> None:
    async with (
        open_libp2p_transport(secret=os.urandom(32), network_id="one", config=NetConfig(),
                              limits=Limits(), validator=echo_validator) as one,
        open_libp2p_transport(secret=os.urandom(32), network_id="two",
                              config=NetConfig(bootstrap=tuple(one.listen_addrs)),
                              limits=Limits(), validator=echo_validator) as two,
    ):
        assert one.neighbours() == ()
        assert two.neighbours() == ()
        assert two.neighbourhood.book.peers[one.peer_id].failures == 1
        await wait_for(lambda: not two.host.get_connected_peers())


def test_mdns_needs_an_interface_to_pin_to() -> None:
    with pytest.raises(ConfigError, match="mdns_interface"):
        NetConfig(enable_mdns=True)
