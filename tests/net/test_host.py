"""The libp2p host: identity from the secret, Noise + Yamux only, dialling and its errors."""

from __future__ import annotations

import contextlib
import os
import socket

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2pfl.errors import ConfigError, PeerUnreachable
from p2pfl.net.host import (
    connect,
    connection_config,
    key_pair_from_secret,
    listen_addrs,
    open_host,
    peer_id_of,
    run_host,
)
from p2pfl.net.patches import streams

SECRET = bytes(range(1, 33))


def test_identity_is_a_pure_function_of_the_secret() -> None:
    first = key_pair_from_secret(SECRET).public_key.serialize()
    second = key_pair_from_secret(SECRET).public_key.serialize()
    other = key_pair_from_secret(os.urandom(32)).public_key.serialize()
    assert first == second != other


@pytest.mark.parametrize("secret", [b"short", bytes(32)])
def test_bad_secret_is_a_config_error(secret: bytes) -> None:
    with pytest.raises(ConfigError, match="secret"):
        key_pair_from_secret(secret)


async def test_host_listens_is_hardened_and_peer_id_is_secp256k1() -> None:
    async with open_host(SECRET) as host:
        (address,) = listen_addrs(host)
        assert address.startswith("/ip4/127.0.0.1/tcp/")
        assert peer_id_of(address) == host.get_id().to_string()
        assert host.get_id().to_string().startswith("16Uiu2")
        assert streams.is_guarded(host)


async def test_two_hosts_connect_both_ways_see_each_other() -> None:
    async with open_host(os.urandom(32)) as a, open_host(os.urandom(32)) as b:
        peer = await connect(b, listen_addrs(a)[0], timeout=5)
        assert peer == a.get_id().to_string()
        for _ in range(500):  # bounded: the inbound side registers the connection async
            if b.get_id() in a.get_connected_peers():
                break
            await trio.sleep(0.01)
        assert b.get_id() in a.get_connected_peers()
        # A second connect reuses the one connection (max_connections_per_peer=1).
        await connect(b, listen_addrs(a)[0], timeout=5)
        assert len(b.get_network().get_connections(a.get_id())) == 1


async def test_dialling_nobody_raises_peer_unreachable_within_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    async with open_host(os.urandom(32)) as a, open_host(os.urandom(32)) as b:
        gone = listen_addrs(a)[0].replace(f"/tcp/{a.get_addrs()[0].value_for_protocol('tcp')}/",
                                          f"/tcp/{free_port}/")
        with trio.fail_after(3), pytest.raises(PeerUnreachable):
            await connect(b, gone, timeout=2)
        # Trap 11: without unblock_peer the next dial would be refused for 60 s.
        with pytest.raises(PeerUnreachable):
            await connect(b, gone, timeout=2)


async def test_connect_rejects_non_p2p_address_and_self() -> None:
    async with open_host(os.urandom(32)) as a:
        with pytest.raises(ConfigError):
            await connect(a, "/ip4/127.0.0.1/tcp/1", timeout=1)
        with pytest.raises(PeerUnreachable):
            await connect(a, listen_addrs(a)[0], timeout=1)


def _foreign_host(*, plaintext: bool, mplex: bool):  # type: ignore[no-untyped-def]
    """Build a host speaking what p2pfl refuses (plaintext security or Mplex only)."""
    key_pair = key_pair_from_secret(os.urandom(32))
    if plaintext:
        sec = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)}
    else:
        from libp2p.crypto import x25519

        noise_key = x25519.create_new_key_pair().private_key
        sec = {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=noise_key)}
    muxer = {MPLEX_PROTOCOL_ID: Mplex} if mplex else {YAMUX_PROTOCOL_ID: Yamux}
    return new_host(
        key_pair=key_pair,
        sec_opt=sec,
        muxer_opt=muxer,
        connection_config=connection_config(dial_timeout=2, auto_connect=False),
    )


@pytest.mark.parametrize(("plaintext", "mplex"), [(True, False), (False, True)])
async def test_plaintext_or_mplex_only_dialer_is_refused(plaintext: bool, mplex: bool) -> None:
    async with open_host(os.urandom(32)) as ours:
        foreign = _foreign_host(plaintext=plaintext, mplex=mplex)
        async with run_host(foreign, listen_host="127.0.0.1", port=0):
            info = info_from_p2p_addr(multiaddr.Multiaddr(listen_addrs(ours)[0]))
            with trio.move_on_after(4):
                with contextlib.suppress(Exception):
                    await foreign.connect(info)
            assert foreign.get_id() not in ours.get_connected_peers()
            assert ours.get_id() not in foreign.get_connected_peers()
            # ... and ours cannot dial it either.
            with pytest.raises(PeerUnreachable):
                await connect(ours, listen_addrs(foreign)[0], timeout=3)


async def test_fixed_port_is_honoured() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with open_host(os.urandom(32), port=port) as host:
        assert f"/tcp/{port}/" in listen_addrs(host)[0]


def test_shutdown_noise_is_swallowed_only_when_the_body_succeeded() -> None:
    from p2pfl.net.host import _BodyOutcome, _quiet_shutdown

    noise = RuntimeError("Nursery is closed to new arrivals")
    with _quiet_shutdown(_BodyOutcome()):
        raise ExceptionGroup("shutdown", [noise])
    failed = _BodyOutcome()
    failed.failed = True
    with pytest.raises(ExceptionGroup), _quiet_shutdown(failed):
        raise ExceptionGroup("shutdown", [noise])
    with pytest.raises(ExceptionGroup) as caught, _quiet_shutdown(_BodyOutcome()):
        raise ExceptionGroup("shutdown", [noise, KeyError("real")])
    assert [type(e) for e in caught.value.exceptions] == [KeyError]


async def test_host_peer_id_is_the_identity_peer_id() -> None:
    from p2pfl.core.crypto import Identity

    identity = Identity.generate()
    async with open_host(identity.secret_bytes()) as host:
        assert host.get_id().to_string() == identity.peer_id
