"""The local status endpoint: content, errors, and hostile clients."""

from __future__ import annotations

import json
import re
import socket

import pytest
import trio
import trio.testing

from p2pfl.cli import http
from p2pfl.cli.http import fetch_status, serve_status
from p2pfl.errors import ConfigError, NetworkError
from p2pfl.node.stats import NodeStatistics, PeerReputation, RoundRecord

PEER = "16Uiu2HAmSelfSelfSelfSelfSelfSelfSelfSelfSelf1"
BAD = "16Uiu2HAmBadBadBadBadBadBadBadBadBadBadBad99"


def sample_stats() -> NodeStatistics:
    return NodeStatistics(
        peer_id=PEER,
        network_id="net-a",
        state="training",
        round=3,
        rounds_target=5,
        accuracy=0.875,
        loss=0.42,
        neighbours=("16Uiu2HAmAAAAAAAA", BAD),
        bytes_in=1234,
        bytes_out=5678,
        accepted=7,
        rejected={"bad_signature": 2, 'we"ird\\': 1},
        reputation=(
            PeerReputation(peer="16Uiu2HAmAAAAAAAA", score=0.9, weight=0.9, banned=False, last_reason="accepted"),
            PeerReputation(peer=BAD, score=0.05, weight=0.0, banned=True, last_reason="bad_signature"),
        ),
        history=(RoundRecord(round=1, accuracy=0.5, loss=1.0, used=2, duration=1.5, bytes_in=10, bytes_out=20),),
    )


async def request(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read the reply until the server closes (bounded by trio's deadline)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
            return reply


def split(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
async def port(nursery: trio.Nursery) -> int:
    return await nursery.start(serve_status, 0, sample_stats)


async def test_status_returns_the_json_document(port: int) -> None:
    code, headers, body = split(await request(port, b"GET /status HTTP/1.0\r\n\r\n"))
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(body) == json.loads(json.dumps(sample_stats().to_json()))


async def test_metrics_are_prometheus_text(port: int) -> None:
    code, headers, body = split(await request(port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    sample = re.compile(r'^[a-z_][a-z0-9_]*(\{([a-z_]+="([^"\\\n]|\\.)*",?)+\})? (NaN|[-+0-9.e]+|[+-]Inf)$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert "p2pfl_round 3" in text
    assert "p2pfl_accuracy 0.875" in text
    assert "p2pfl_neighbours 2" in text
    assert "p2pfl_bytes_in_total 1234" in text
    assert 'p2pfl_updates_rejected_total{reason="bad_signature"} 2' in text
    assert 'p2pfl_updates_rejected_total{reason="we\\"ird\\\\"} 1' in text
    assert f'p2pfl_peer_banned{{peer="{BAD}"}} 1' in text
    assert f'p2pfl_peer_reputation{{peer="{BAD}"}} 0.05' in text
    assert "# TYPE p2pfl_updates_accepted_total counter" in text


async def test_unknown_path_is_404_and_bad_method_405(port: int) -> None:
    assert split(await request(port, b"GET /nope HTTP/1.0\r\n\r\n"))[0] == 404
    assert split(await request(port, b"POST /status HTTP/1.0\r\n\r\n"))[0] == 405


@pytest.mark.parametrize("raw", [b"garbage\r\n\r\n", b"GET status HTTP/1.0\r\n\r\n", b"\xff\xfe /x HTTP/1.0\r\n\r\n"])
async def test_malformed_request_is_400(port: int, raw: bytes) -> None:
    assert split(await request(port, raw))[0] == 400


async def test_oversized_head_is_refused_and_server_survives(port: int) -> None:
    reply = await request(port, b"GET /status HTTP/1.0\r\nX: " + b"a" * 20_000)
    assert split(reply)[0] == 400
    assert split(await request(port, b"GET /status HTTP/1.0\r\n\r\n"))[0] == 200


async def test_stats_failure_is_500_and_server_survives(nursery: trio.Nursery) -> None:
    calls = []

    def flaky() -> NodeStatistics:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return sample_stats()

    port = await nursery.start(serve_status, 0, flaky)
    assert split(await request(port, b"GET /status HTTP/1.0\r\n\r\n"))[0] == 500
    assert split(await request(port, b"GET /status HTTP/1.0\r\n\r\n"))[0] == 200


async def test_connections_beyond_the_limit_get_503(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 1)
    port = await nursery.start(serve_status, 0, sample_stats)
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    await trio.testing.wait_all_tasks_blocked()  # its handler now holds the only slot
    assert split(await request(port, b"GET /status HTTP/1.0\r\n\r\n"))[0] == 503
    await silent.aclose()


async def test_silent_client_is_dropped_at_the_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await nursery.start(serve_status, 0, sample_stats)
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    with trio.fail_after(60):
        assert await silent.receive_some(100) == b""  # the server closed it
    assert trio.current_time() - start == pytest.approx(http.READ_DEADLINE, abs=0.5)
    await silent.aclose()
    assert split(await request(port, b"GET /status HTTP/1.0\r\n\r\n"))[0] == 200


async def test_fetch_status_reads_a_live_node(port: int) -> None:
    document = await trio.to_thread.run_sync(fetch_status, port)
    assert document["peer_id"] == PEER
    assert document["rejected"]["bad_signature"] == 2


def test_fetch_status_raises_network_error_when_nobody_listens() -> None:
    with socket.socket() as bound:  # bound but not listening: connection refused
        bound.bind(("127.0.0.1", 0))
        with pytest.raises(NetworkError, match="no node listening"):
            fetch_status(bound.getsockname()[1], timeout=1.0)


async def test_refuses_non_loopback_host() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        await serve_status(0, sample_stats, host="0.0.0.0")


async def test_port_in_use_is_a_network_error(port: int) -> None:
    with pytest.raises(NetworkError, match="cannot listen"):
        await serve_status(port, sample_stats)
