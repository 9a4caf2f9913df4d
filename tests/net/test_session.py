"""``/p2pfl/update/1.2.0`` over real libp2p hosts on loopback: reuse, fallback, hostile peers.

Hosts run in this trio process with real time (the network is real); deadlines are
small so hostile cases finish fast. No sleeps to synchronise: waits are on what a peer
did (its handler's state), bounded by ``polling.wait_for``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF

from p2pfl.config import Limits, MiB
from p2pfl.errors import ProtocolViolation, TamperedPayload, TransferError, TransferTimeout
from p2pfl.net.host import connect, listen_addrs, open_host
from p2pfl.net.session import (
    SESSION_PROTOCOL_ID,
    SESSIONS_PER_PEER,
    Sessions,
    SessionServer,
    install_session_protocol,
)
from p2pfl.net.transfer import PayloadStore, fetch_payload, install_update_protocol
from tests.net.polling import wait_for
from tests.net.test_transfer import STOCK_PEER, TextLines

SERVER_IDLE = 0.5  # the servers' idle close in these tests
TIMEOUT = 10.0  # honest pulls: generous, they finish in milliseconds
HOSTILE_TIMEOUT = 0.5
REQUEST = struct.Struct(">B32sQ")
REPLY = struct.Struct(">BQ")
PAYLOAD = os.urandom(50_000)
DIGEST = hashlib.sha256(PAYLOAD).digest()

Handler = Callable[[Any], Awaitable[None]]


class Net:
    """A client with a session pool; a full server; a 1.0.0-only one; a rogue."""

    def __init__(self, client: Any, server: Any, old: Any, rogue: Any, sessions: SessionServer) -> None:
        self.client, self.server, self.old, self.rogue = client, server, old, rogue
        self.server_sessions = sessions
        self.pool = Sessions(client)
        self.served: list[int] = []

    def id(self, host: Any) -> str:
        return str(host.get_id().to_string())

    async def pull(self, host: Any, *, timeout: float = TIMEOUT) -> bytes:
        return (await self.pool.fetch(self.id(host), DIGEST, max_size=MiB, timeout=timeout)).data


@contextlib.asynccontextmanager
async def open_net() -> AsyncIterator[Net]:
    async with contextlib.AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(open_host(bytes([i + 11]) * 32)) for i in range(4)]
        client, server, old, rogue = hosts
        store = PayloadStore(max_total_bytes=MiB)
        store.put(DIGEST, PAYLOAD)
        served: list[int] = []
        v1 = install_update_protocol(server, store, limits=Limits(), serve_timeout=2.0,
                                     on_served=lambda peer, digest, n: served.append(n))
        net = Net(client, server, old, rogue, install_session_protocol(server, v1, idle=SERVER_IDLE))
        net.served = served
        install_update_protocol(old, store, limits=Limits())  # speaks 1.0.0 only
        for target in (server, old, rogue):
            await connect(client, listen_addrs(target)[0], timeout=5)
        yield net


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    async with open_net() as n:
        yield n


# ---------------------------------------------------------------------------- honest


async def test_many_pulls_ride_one_session(net: Net) -> None:
    for _ in range(5):
        assert await net.pull(net.server) == PAYLOAD
    assert net.pool.opened == 1
    await wait_for(lambda: net.served == [len(PAYLOAD)] * 5)  # every reply counted once written
    assert net.server_sessions.open[net.id(net.client)] == 1


async def test_a_one_shot_client_still_pulls_from_a_session_server(net: Net) -> None:
    got = await fetch_payload(net.client, net.id(net.server), DIGEST, max_size=MiB, timeout=TIMEOUT)
    assert got == PAYLOAD


async def test_a_1_0_0_only_peer_is_pulled_from_over_1_0_0(net: Net) -> None:
    assert await net.pull(net.old) == PAYLOAD
    assert await net.pull(net.old) == PAYLOAD
    assert net.pool.opened == 0
    assert net.pool.idle_peers() == ()


async def test_not_found_keeps_the_session(net: Net) -> None:
    assert await net.pull(net.server) == PAYLOAD
    with pytest.raises(TransferError):
        await net.pool.fetch(net.id(net.server), b"\x01" * 32, max_size=MiB, timeout=TIMEOUT)
    assert await net.pull(net.server) == PAYLOAD
    assert net.pool.opened == 1


async def test_concurrent_pulls_to_one_peer_keep_one_idle_session(net: Net) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(net.pull, net.server)
    assert net.pool.idle_peers() == (net.id(net.server),)
    await wait_for(lambda: net.server_sessions.open[net.id(net.client)] == 1)  # the others closed


async def test_a_session_the_server_closed_while_idle_is_replaced_unblamed(net: Net) -> None:
    assert await net.pull(net.server) == PAYLOAD
    await wait_for(lambda: not net.server_sessions.open)  # its idle deadline passed: FIN
    assert await net.pull(net.server) == PAYLOAD
    assert net.pool.opened == 2


async def test_the_client_closes_idle_sessions_and_the_server_lets_go(net: Net) -> None:
    assert await net.pull(net.server) == PAYLOAD
    await net.pool.close_idle()
    assert net.pool.idle_peers() == ()
    await wait_for(lambda: not net.server_sessions.open)


async def test_sessions_beyond_the_per_peer_cap_serve_one_pull_each(net: Net) -> None:
    pools = [Sessions(net.client) for _ in range(SESSIONS_PER_PEER + 1)]
    for pool in pools:
        await pool.fetch(net.id(net.server), DIGEST, max_size=MiB, timeout=TIMEOUT)
    await wait_for(lambda: net.server_sessions.open[net.id(net.client)] == SESSIONS_PER_PEER)
    got = await pools[-1].fetch(net.id(net.server), DIGEST, max_size=MiB, timeout=TIMEOUT)
    assert got.data == PAYLOAD
    assert pools[-1].opened == 2  # the extra one was closed: a fresh one


async def test_stock_1_0_0_peer_both_ways() -> None:
    # A child with stock libp2p (no patch) speaking 1.0.0 only: our pool pulls from it over
    # 1.0.0 after its multistream refuses 1.2.0 (the request pipelined into the refused
    # negotiation), and it pulls from our session-serving host over 1.0.0.
    async with open_net() as net:
        child = await trio.lowlevel.open_process(
            [sys.executable, "-c", STOCK_PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("PY_YAMUX_")})
        try:
            assert child.stdin is not None
            assert child.stdout is not None
            lines = TextLines(child.stdout)
            with trio.fail_after(30):
                addr, digest, knobs = (await lines.next()).split()
                assert knobs == "stock"
                peer = await connect(net.client, addr, timeout=10)
                for _ in range(2):
                    got = await net.pool.fetch(peer, bytes.fromhex(digest), max_size=20 * MiB, timeout=20)
                    assert got.digest.hex() == digest
                assert net.pool.opened == 0
                await connect(net.server, addr, timeout=10)
                line = f"{listen_addrs(net.server)[0]} {DIGEST.hex()} {len(PAYLOAD)}\n"
                await child.stdin.send_all(line.encode())
                assert await lines.next() == f"stock pulled {len(PAYLOAD)}"
                await child.stdin.send_all(b"bye\n")
                assert await child.wait() == 0
        finally:
            if child.returncode is None:
                child.kill()
                with trio.CancelScope(shield=True):
                    await child.wait()


# ---------------------------------------------------------------------------- hostile servers


async def _read_request(stream: Any) -> bytes:
    data = b""
    while len(data) < REQUEST.size:
        data += await stream.read(REQUEST.size - len(data))
    return data


async def _honest_reply(stream: Any) -> None:
    await _read_request(stream)
    await stream.write(REPLY.pack(0, len(PAYLOAD)) + PAYLOAD)


def _honest_then(second: Handler) -> Handler:
    """A session that answers its first request honestly and its second with ``second``."""

    async def handler(stream: Any) -> None:
        await _honest_reply(stream)
        await _read_request(stream)
        await second(stream)
        await trio.sleep_forever()

    return handler


async def _garbage(stream: Any) -> None:
    await stream.write(b"\xfe" + os.urandom(40))


async def _reset_mid_body(stream: Any) -> None:
    await stream.write(REPLY.pack(0, len(PAYLOAD)) + PAYLOAD[:1000])
    await stream.reset()


async def _reset_before_reply(stream: Any) -> None:
    await stream.reset()


async def _wrong_body(stream: Any) -> None:
    await stream.write(REPLY.pack(0, len(PAYLOAD)) + os.urandom(len(PAYLOAD)))


async def _stall(stream: Any) -> None:
    await trio.sleep_forever()


async def _trailing(stream: Any) -> None:
    await stream.write(REPLY.pack(0, len(PAYLOAD)) + PAYLOAD + b"extra")


HOSTILE = {
    "garbage_status": (_garbage, ProtocolViolation),
    "reset_mid_body": (_reset_mid_body, ProtocolViolation),
    "reset_before_reply": (_reset_before_reply, ProtocolViolation),
    "sha256_mismatch": (_wrong_body, TamperedPayload),
    "stall": (_stall, TransferTimeout),
    "bytes_after_the_reply": (_trailing, ProtocolViolation),  # found on the next take
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_a_bad_second_reply_fails_that_pull_and_the_next_opens_afresh(net: Net, case: str) -> None:
    second, expected = HOSTILE[case]
    net.rogue.set_stream_handler(SESSION_PROTOCOL_ID, _honest_then(second))
    assert await net.pull(net.rogue) == PAYLOAD
    with trio.fail_after(HOSTILE_TIMEOUT + 3), pytest.raises(expected):
        await _pull_twice(net)  # bytes after a reply surface when the session is taken again
    assert net.pool.idle_peers() == ()  # dropped, not kept
    assert await net.pull(net.rogue) == PAYLOAD  # a fresh session
    assert net.pool.opened == 2


async def _pull_twice(net: Net) -> None:
    for _ in range(2):
        await net.pull(net.rogue, timeout=HOSTILE_TIMEOUT)


# ---------------------------------------------------------------------------- hostile clients


async def _open(net: Net) -> Any:
    return await net.client.new_stream(net.server.get_id(), [SESSION_PROTOCOL_ID])


async def _reply_of(stream: Any) -> bytes:
    head = b""
    while len(head) < REPLY.size:
        head += await stream.read(REPLY.size - len(head))
    return head


@pytest.mark.parametrize("request_bytes", [REQUEST.pack(1, DIGEST, MiB), b"\x03" + DIGEST])
async def test_a_malformed_request_resets_the_session(net: Net, request_bytes: bytes) -> None:
    stream = await _open(net)
    await stream.write(REQUEST.pack(3, DIGEST, MiB))
    assert REPLY.unpack(await _reply_of(stream)) == (0, len(PAYLOAD))
    await stream.read(len(PAYLOAD))  # whatever arrived of the body: not checked here
    await stream.write(request_bytes)  # another version, or short and then silent
    await wait_for(lambda: not net.server_sessions.open, timeout=5)
    assert await net.pull(net.server) == PAYLOAD  # the server serves on


async def test_a_silent_opener_is_closed_at_the_request_deadline(net: Net) -> None:
    stream = await _open(net)
    await wait_for(lambda: net.server_sessions.open[net.id(net.client)] == 1)
    await wait_for(lambda: not net.server_sessions.open, timeout=5)
    with trio.fail_after(5):
        try:
            data = await stream.read(1)
        except StreamEOF:
            data = b""
    assert data == b""  # closed (FIN), not reset
