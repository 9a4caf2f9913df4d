"""Opt-in mDNS discovery pinned to one interface: records, bounds, config, and live on lo."""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio.testing
from zeroconf import ServiceInfo, Zeroconf

from p2pfl.config import Limits, NetConfig
from p2pfl.errors import ConfigError
from p2pfl.net.host import key_pair_from_secret
from p2pfl.net.libp2p_transport import Libp2pTransport, open_libp2p_transport
from p2pfl.net.mdns import (
    SERVICE_TYPE,
    Admission,
    ChannelHandoff,
    MdnsListener,
    RateWindow,
    advertised_addrs,
    build_properties,
    network_tag,
    parse_record,
    pinned_zeroconf,
)


def new_peer() -> str:
    from libp2p.peer.id import ID

    return ID.from_pubkey(key_pair_from_secret(os.urandom(32)).public_key).to_string()


def addr(peer: str, port: int = 4001) -> str:
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"


def echo_validator(origin: str, data: bytes) -> bytes:
    return data


# ------------------------------------------------------------------------- records


def test_record_round_trips_for_our_network() -> None:
    peer = new_peer()
    addrs = [addr(peer, 4001), addr(peer, 4002)]
    assert parse_record(build_properties("demo", addrs), network_tag("demo")) == (peer, addrs)


def test_record_of_another_network_is_ignored() -> None:
    peer = new_peer()
    assert parse_record(build_properties("other", [addr(peer)]), network_tag("demo")) is None


def test_tag_is_bounded_whatever_the_network_id() -> None:
    assert len(network_tag("x" * 10_000)) == 32


HOSTILE: list[Mapping[bytes, bytes | None]] = [
    {},
    {b"v": b"1"},
    {b"v": b"2", b"net": network_tag("demo").encode(), b"addr1": addr(new_peer()).encode()},
    {b"v": b"1", b"net": network_tag("demo").encode()},  # no address
    {b"v": b"1", b"net": network_tag("demo").encode(), b"addr1": None},
    {b"v": b"1", b"net": network_tag("demo").encode(), b"addr1": b"\xff\xfe"},
    {b"v": b"1", b"net": network_tag("demo").encode(), b"addr1": b"/ip4/1.2.3.4/tcp/1"},
    {b"v": b"1", b"net": network_tag("demo").encode(), b"addr1": b"/p2p/" + b"A" * 5000},
    {b"v": b"1", b"net": network_tag("demo").encode(),  # two different peers
     b"addr1": addr(new_peer()).encode(), b"addr2": addr(new_peer()).encode()},
]


@pytest.mark.parametrize("properties", HOSTILE)
def test_malformed_records_are_ignored(properties: Mapping[bytes, bytes | None]) -> None:
    assert parse_record(properties, network_tag("demo")) is None


def test_record_whose_accessor_raises_is_ignored() -> None:
    class Exploding(dict[bytes, bytes | None]):
        def get(self, *args: object) -> bytes | None:  # type: ignore[override]
            raise KeyError("boom")

    assert parse_record(Exploding(), network_tag("demo")) is None


def test_only_addresses_on_the_interface_are_advertised() -> None:
    peer = new_peer()
    listen = [f"/ip4/0.0.0.0/tcp/5/p2p/{peer}", f"/ip4/10.0.0.9/tcp/6/p2p/{peer}"]
    assert advertised_addrs(listen, "192.168.1.7") == [f"/ip4/192.168.1.7/tcp/5/p2p/{peer}"]


# ------------------------------------------------------------------------- bounds


def test_rate_window_caps_events_per_window() -> None:
    window = RateWindow(2, window=60.0)
    assert [window.allow(0.0), window.allow(1.0), window.allow(2.0)] == [True, True, False]
    assert window.allow(60.5)  # the first event left the window


def test_admission_caps_new_peers_per_minute_but_not_repeats() -> None:
    admission = Admission(limit=2, window=60.0)
    assert admission.admit("a", 0.0)
    assert admission.admit("b", 1.0)
    assert not admission.admit("c", 2.0)
    assert admission.admit("a", 3.0)  # a repeat of an admitted peer
    assert admission.admit("c", 61.5)


# ------------------------------------------------------------- zeroconf callbacks (fake)


class FakeZeroconf:
    """Stands in for zeroconf: returns a canned record or raises, like a hostile LAN."""

    def __init__(self, info: object) -> None:
        self.info = info

    def get_service_info(self, type_: str, name: str, timeout: int) -> object:
        if isinstance(self.info, Exception):
            raise self.info
        return self.info


def info_for(network_id: str, addrs: list[str], peer: str) -> ServiceInfo:
    return ServiceInfo(SERVICE_TYPE, f"{peer}.{SERVICE_TYPE}", port=4001,
                       addresses=[bytes([127, 0, 0, 1])],
                       properties=build_properties(network_id, addrs))


def callback(listener: MdnsListener, fake: FakeZeroconf) -> None:
    listener.add_service(fake, SERVICE_TYPE, "x." + SERVICE_TYPE)  # type: ignore[arg-type]


def test_listener_delivers_ours_and_drops_others_and_garbage() -> None:
    delivered: list[tuple[str, list[str]]] = []
    listener = MdnsListener("demo", delivered.append)
    ours, theirs = new_peer(), new_peer()
    callback(listener, FakeZeroconf(info_for("demo", [addr(ours)], ours)))
    callback(listener, FakeZeroconf(info_for("other", [addr(theirs)], theirs)))
    callback(listener, FakeZeroconf(OSError("socket gone")))
    callback(listener, FakeZeroconf(None))  # lookup timed out
    callback(listener, FakeZeroconf(object()))  # no .properties at all
    garbage = ServiceInfo(SERVICE_TYPE, f"g.{SERVICE_TYPE}", port=1, properties={
        b"v": b"1", b"net": network_tag("demo").encode(), b"addr1": b"\xff"})
    callback(listener, FakeZeroconf(garbage))
    assert delivered == [(ours, [addr(ours)])]


def test_listener_caps_lookups_per_minute() -> None:
    delivered: list[tuple[str, list[str]]] = []
    listener = MdnsListener("demo", delivered.append, lookups_per_minute=3)
    peer = new_peer()
    for _ in range(10):
        callback(listener, FakeZeroconf(info_for("demo", [addr(peer)], peer)))
    assert len(delivered) == 3


async def test_handoff_from_a_thread_is_bounded_and_survives_shutdown() -> None:
    send, receive = trio.open_memory_channel[tuple[str, list[str]]](2)
    handoff = ChannelHandoff(trio.lowlevel.current_trio_token(), send)
    peer = new_peer()

    def offer_five() -> None:
        for _ in range(5):
            handoff((peer, [addr(peer)]))

    await trio.to_thread.run_sync(offer_five)
    await trio.testing.wait_all_tasks_blocked()
    assert [receive.receive_nowait(), receive.receive_nowait()] == [(peer, [addr(peer)])] * 2
    with pytest.raises(trio.WouldBlock):  # the other three were dropped, not queued
        receive.receive_nowait()
    send.close()
    handoff((peer, [addr(peer)]))  # closed channel: dropped quietly
    await trio.testing.wait_all_tasks_blocked()


# ------------------------------------------------------------------------- config


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"enable_mdns": True}, "mdns_interface: is required"),
    ({"enable_mdns": True, "mdns_interface": "eth0"}, "must be an IPv4 address"),
    ({"enable_mdns": True, "mdns_interface": 2130706433}, "is required"),
    ({"enable_mdns": True, "mdns_interface": "0.0.0.0"}, "one interface's own address"),
    ({"enable_mdns": True, "mdns_interface": "127.0.0.1", "listen_host": "127.0.0.2"},
     "listen_host"),
    ({"mdns_interface": "127.0.0.1"}, "only used with enable_mdns"),
])
def test_mdns_config_is_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        NetConfig(**kwargs)  # type: ignore[arg-type]


async def test_mdns_interface_not_on_this_machine_fails_before_anything_starts() -> None:
    config = NetConfig(enable_mdns=True, mdns_interface="203.0.113.77", listen_host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"^net.mdns_interface: 203.0.113.77 is not an address of a local"):
        async with open_libp2p_transport(secret=os.urandom(32), network_id="x", config=config,
                                         limits=Limits(), validator=echo_validator):
            pass


def test_mdns_config_accepts_a_local_interface() -> None:
    assert NetConfig(enable_mdns=True, mdns_interface="127.0.0.1").enable_mdns
    assert not NetConfig().enable_mdns  # opt-in


# ------------------------------------------------------------------ live, on loopback


def test_zeroconf_sends_on_the_one_interface_only() -> None:
    zc = pinned_zeroconf("127.0.0.1")
    try:
        # zeroconf internals (0.150): one sending socket per interface.
        socks = [sender.sock for sender in zc.engine.senders]  # type: ignore[attr-defined]
        assert len(socks) == 1
        multicast_if = socks[0].getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)
        assert socket.inet_ntoa(multicast_if) == "127.0.0.1"
    finally:
        zc.close()


def mdns_transport(network_id: str = "mdns-demo") -> AbstractAsyncContextManager[Libp2pTransport]:
    """A fresh node that finds peers by mDNS on loopback only."""
    config = NetConfig(enable_mdns=True, mdns_interface="127.0.0.1", maintenance_interval=0.5)
    return open_libp2p_transport(secret=os.urandom(32), network_id=network_id, config=config,
                                 limits=Limits(), validator=echo_validator)


async def test_two_transports_find_each_other_by_mdns_alone() -> None:
    started = time.monotonic()
    async with (
        mdns_transport() as a,
        mdns_transport() as b,
        mdns_transport("elsewhere") as other,
    ):
        assert a.neighbours() == ()
        assert b.neighbours() == ()
        with trio.fail_after(8):
            while b.peer_id not in a.neighbours() or a.peer_id not in b.neighbours():
                with trio.move_on_after(0.2):  # b's state changes signal b's event only
                    await a.neighbourhood.changed.wait()
        found_after = time.monotonic() - started
        # The third node's records name another network: never learned, never dialled.
        assert other.peer_id not in a.neighbourhood.book.peers
        assert other.peer_id not in b.neighbourhood.book.peers
        assert other.neighbours() == ()
    assert found_after < 8
    assert time.monotonic() - started < 12  # zeroconf stopped within its close bound


async def test_hostile_record_on_the_lan_does_not_disturb_a_node() -> None:
    peer = new_peer()
    records = [
        {b"v": b"1", b"net": network_tag("mdns-demo").encode(), b"addr1": b"\xff\xfe"},
        {b"v": b"1", b"net": network_tag("mdns-demo").encode(),
         b"addr1": b"/ip4/127.0.0.1/tcp/1/p2p/" + b"Z" * 60},
    ]
    zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=["127.0.0.1"]))
    try:
        for index, properties in enumerate(records):
            info = ServiceInfo(SERVICE_TYPE, f"bad{index}-{peer[-6:]}.{SERVICE_TYPE}",
                               port=1, addresses=[bytes([127, 0, 0, 1])],
                               properties=properties)  # type: ignore[arg-type]
            # Skip conflict probing (1.7 s a record): these names are unique to this test.
            await trio.to_thread.run_sync(
                functools.partial(zc.register_service, info, cooperating_responders=True))
        async with (
            mdns_transport() as a,
            mdns_transport() as b,
        ):
            with trio.fail_after(8):
                while b.peer_id not in a.neighbours():
                    await a.neighbourhood.changed.wait()
            assert set(a.neighbourhood.book.peers) == {b.peer_id}
    finally:
        await trio.to_thread.run_sync(zc.close)
