"""Peers from elsewhere: other networks named, plain libp2p bootstraps kept, addresses dialable."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import trio
import trio.testing

from p2pfl.config import Limits, NetConfig
from p2pfl.core.crypto import Identity
from p2pfl.errors import ConfigError
from p2pfl.net.discovery import Neighbourhood, OtherNetwork
from p2pfl.net.host import connect, dial_failure, listen_addrs, open_host, require_listenable
from p2pfl.net.libp2p_transport import open_libp2p_transport
from p2pfl.net.peerbook import PeerBook
from p2pfl.net.reach import MIN_INTERVAL, PUBLIC, REACHED, UNKNOWN, Reachability

PEER = "16Uiu2HAmSwegjeRnVnuDob4gWh5DkD4BUJFvQzsXTpWB7CdbMaun"


async def test_a_peer_of_another_network_is_named_with_both_ids(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2pfl.net.discovery")
    async with open_host(os.urandom(32)) as ours, open_host(os.urandom(32)) as theirs:
        mine = Neighbourhood(ours, network_id="net-a", config=NetConfig())
        Neighbourhood(theirs, network_id="net-b", config=NetConfig())
        peer = await connect(ours, listen_addrs(theirs)[0], timeout=5)
        with pytest.raises(OtherNetwork, match=r"is on network 'net-b', this node on 'net-a'"):
            await mine.exchange(peer)
    assert any("is on network 'net-a', this node on 'net-b'" in r.getMessage() for r in caplog.records)


async def test_a_plain_libp2p_bootstrap_is_kept_as_a_relay_not_redialled() -> None:
    async with open_host(os.urandom(32)) as plain:  # identify and ping only, no peer exchange
        config = NetConfig(bootstrap=tuple(listen_addrs(plain)), maintenance_interval=0.2)
        async with open_libp2p_transport(secret=os.urandom(32), network_id="t", config=config,
                                         limits=Limits(), validator=lambda o, d: d) as ours:
            boot = plain.get_id().to_string()
            record = ours.neighbourhood.book.peers[boot]
            assert record.relay_only
            assert boot in ours.neighbourhood.connected()
            assert ours.neighbours() == ()  # never a neighbour: it cannot send updates
            for _ in range(3):  # maintenance passes, run here rather than waited for
                await ours.neighbourhood.maintain()
            assert boot in ours.neighbourhood.connected()  # not probed away and redialled
            assert record.failures == 0
            assert ours.bootstrap_report() == [f"{listen_addrs(plain)[0]}: {record.last_error}"]
            assert "does not speak /p2pfl/peers/1.0.0" in record.last_error


def test_bootstrap_backoff_doubles_to_the_cap_and_reports_the_last_answer() -> None:
    book = PeerBook(me="me", capacity=8, max_backoff=30.0, jitter=0.0)
    peer = book.learn(f"/ip4/192.0.2.1/tcp/7351/p2p/{PEER}", bootstrap=True)
    assert peer == PEER
    assert book.bootstrap_report(set()) == [f"/ip4/192.0.2.1/tcp/7351/p2p/{PEER}: not tried yet"]
    delays = [book.failed(PEER, 0.0, "connection refused") for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert book.candidates(29.0, exclude=set()) == []
    assert book.candidates(30.0, exclude=set()) == [PEER]  # retried, never dropped
    assert book.bootstrap_report(set()) == [f"/ip4/192.0.2.1/tcp/7351/p2p/{PEER}: connection refused"]
    jittered = PeerBook(me="me", capacity=8, max_backoff=30.0)
    jittered.learn(f"/ip4/192.0.2.1/tcp/7351/p2p/{PEER}", bootstrap=True)
    assert 0.25 <= jittered.failed(PEER, 0.0) <= 0.5


async def test_addresses_announce_and_unspecified_listeners() -> None:
    async with open_host(os.urandom(32), listen_host="0.0.0.0") as host:
        me = host.get_id().to_string()
        addrs = listen_addrs(host)
        assert addrs
        assert not any("/0.0.0.0/" in a for a in addrs)
        # Loopback only when it is all there is: elsewhere, 127.0.0.1 is the dialler itself.
        assert all("/127.0.0.1/" not in a for a in addrs) or len(addrs) == 1
        assert all(a.endswith(f"/p2p/{me}") for a in addrs)
        announced = listen_addrs(host, ("/ip4/203.0.113.5/tcp/17351",))
        assert announced == [f"/ip4/203.0.113.5/tcp/17351/p2p/{me}"]


def test_port_checks_and_dial_failures_in_a_few_words() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"\[net\] port: cannot listen on 127.0.0.1:{port}"):
            require_listenable("127.0.0.1", port)
    require_listenable("127.0.0.1", 0)  # ephemeral: nothing to check
    refused = ConnectionRefusedError(111, "Connection refused")
    wrapped = RuntimeError("unable to connect, no addresses established a connection")
    wrapped.__cause__ = ExceptionGroup("attempts", [OSError("all attempts failed")])
    wrapped.__cause__.exceptions[0].__cause__ = refused
    assert dial_failure(wrapped) == "connection refused"


class _DialBackPeers:
    """A host whose peers in ``answering`` say "reached" and whose others never answer
    (plain libp2p bootstraps without our dial-back protocol)."""

    def __init__(self, answering: set[str]) -> None:
        self.answering = answering
        self.asked: list[str] = []

    def set_stream_handler(self, protocol: object, handler: object) -> None:
        return None

    async def new_stream(self, peer: object, protocols: object) -> object:
        self.asked.append(str(peer))
        if str(peer) not in self.answering:
            await trio.sleep_forever()  # until the asker's deadline
        return _Reached()


class _Reached:
    async def write(self, data: bytes) -> None:
        return None

    async def read(self, n: int) -> bytes:
        return bytes([REACHED])

    async def reset(self) -> None:
        return None


async def test_peers_that_never_answer_a_dial_back_are_not_asked_again_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    silent = [Identity.generate().peer_id for _ in range(2)]
    answering = Identity.generate().peer_id
    host = _DialBackPeers({answering})
    reach = Reachability(host, port=7351, dial_timeout=2.0)  # type: ignore[arg-type]
    peers = [*silent, answering]  # the silent bootstraps come first, every pass
    await reach.check(peers)
    assert (sorted(host.asked), reach.state) == (sorted(silent), UNKNOWN)
    await reach.check(peers)  # the next pass moves on
    assert (host.asked[2:], reach.state) == ([answering], PUBLIC)
    await reach.check(peers)
    assert len(host.asked) == 3  # all asked within MIN_INTERVAL: nobody
    await trio.sleep(MIN_INTERVAL)
    await reach.check(peers)
    assert sorted(host.asked[3:]) == sorted(silent)  # asked again later: they may have changed


async def test_own_addresses_are_looked_up_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pfl.net import discovery

    calls: list[int] = []
    monkeypatch.setattr(discovery, "listen_addrs", lambda host, announce: calls.append(1) or ["/ip4/1.2.3.4/tcp/1"])
    async with open_host(os.urandom(32)) as host:
        neighbourhood = Neighbourhood(host, network_id="n", config=NetConfig())
        assert neighbourhood.own_addrs() == neighbourhood.own_addrs() == ["/ip4/1.2.3.4/tcp/1"]
        assert len(calls) == 1  # every peer exchange, both ends, needs them: py-libp2p rebuilds them
        neighbourhood._listen = (trio.current_time() - discovery.OWN_ADDRS_SECONDS, ["old"])
        assert neighbourhood.own_addrs() == ["/ip4/1.2.3.4/tcp/1"]
        assert len(calls) == 2
