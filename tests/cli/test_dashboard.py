"""The dashboard's server side: pages and files, headers, read-only, Host check, /network."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from p2pfl.cli.dashboard.assets import CONTENT_TYPES, asset
from p2pfl.cli.dashboard.network import NetworkBoard, serve_in_thread
from p2pfl.cli.http import CONTENT_SECURITY_POLICY, Response, serve_status
from p2pfl.cli.testnet_plan import TestnetPlan as Plan
from p2pfl.errors import ConfigError, NetworkError
from tests.cli.test_http import request, sample_stats, split

STATIC = Path(__file__).resolve().parents[2] / "p2pfl" / "cli" / "dashboard" / "static"


@pytest.fixture
async def port(nursery: trio.Nursery) -> int:
    return await nursery.start(serve_status, 0, sample_stats)


async def test_root_is_the_node_page_with_a_strict_policy(port: int) -> None:
    code, headers, body = split(await request(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert code == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'src="/static/node.js"' in body


@pytest.mark.parametrize(("path", "kind"), [
    ("/static/node.js", "text/javascript; charset=utf-8"),
    ("/static/common.js", "text/javascript; charset=utf-8"),
    ("/static/dashboard.css", "text/css; charset=utf-8"),
    ("/favicon.ico", "image/svg+xml"),
])
async def test_static_files_are_served_with_their_type(port: int, path: str, kind: str) -> None:
    code, headers, body = split(await request(port, f"GET {path} HTTP/1.0\r\n\r\n".encode()))
    assert code == 200
    assert headers["Content-Type"] == kind
    assert body


@pytest.mark.parametrize("path", [
    "/static/", "/static/../http.py", "/static/..%2fhttp.py", "/static/%2e%2e/assets.py", "/static//etc/passwd",
    "/static/__init__.py", "/node.html", "/static/NODE.JS",
])
async def test_only_shipped_files_by_exact_name(port: int, path: str) -> None:
    code, headers, _ = split(await request(port, f"GET {path} HTTP/1.0\r\n\r\n".encode()))
    assert code == 404
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
@pytest.mark.parametrize("path", ["/", "/status", "/nope"])
async def test_every_other_method_is_405(port: int, method: str, path: str) -> None:
    code, headers, _ = split(await request(port, f"{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode()))
    assert code == 405
    assert headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("host", ["127.0.0.1:9100", "localhost", "LOCALHOST:1", "[::1]:9100", "127.0.0.2"])
async def test_loopback_host_names_are_answered(port: int, host: str) -> None:
    reply = await request(port, f"GET /status HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert split(reply)[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:9100", "10.0.0.1", "[2001:db8::1]:80", "127.0.0.1.evil.example"])
async def test_a_rebound_dns_name_is_refused(port: int, host: str) -> None:
    code, _, body = split(await request(port, f"GET /status HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))
    assert code == 403
    assert b"SSH tunnel" in body


# --------------------------------------------------------------------------- the files


def test_every_static_file_has_a_type_and_is_found() -> None:
    names = sorted(p.name for p in STATIC.iterdir())
    assert {"node.html", "testnet.html", "common.js", "node.js", "testnet.js", "dashboard.css", "favicon.svg"} <= set(names)
    for name in names:
        assert "." + name.rpartition(".")[2] in CONTENT_TYPES
        assert asset(f"/static/{name}", index="node.html") is not None


def test_pages_reference_only_shipped_files_and_nothing_inline() -> None:
    for page in ("node.html", "testnet.html"):
        html = (STATIC / page).read_text()
        for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert asset(ref, index=page) is not None, f"{page} links {ref}"
        assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [], "inline script"
        assert "<style" not in html, "inline style"
        assert " style=" not in html, "inline style"
        assert "http://" not in html, "nothing from elsewhere"
        assert "https://" not in html, "nothing from elsewhere"


def test_scripts_never_parse_data_as_markup() -> None:
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|setAttribute\(\"on")
    for script in STATIC.glob("*.js"):
        assert sinks.findall(script.read_text()) == [], script.name


# --------------------------------------------------------------------------- /network


def views() -> list[Any]:
    status = sample_stats().to_json()
    return [
        SimpleNamespace(index=0, peer_id=status["peer_id"], role="honest", status=status, exit_code=None),
        SimpleNamespace(index=1, peer_id="16Uiu2HAmLate", role="byzantine", status=None, exit_code=None),
    ]


def get(port: int, path: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def test_network_document_is_the_live_report_until_the_run_finishes() -> None:
    board = NetworkBoard({"nodes": 2, "rounds": 5}, views(), started=0.0)
    live = board.document()
    assert live["final"] is False
    assert [n["state"] for n in live["report"]["nodes"]] == ["training", "launching"]
    assert [n["role"] for n in live["report"]["nodes"]] == ["honest", "byzantine"]
    assert live["statuses"][1] is None

    board.finish("done", {"verdict": {"attackers": 1}})
    final = board.document()
    assert (final["final"], final["outcome"], final["report"]) == (True, "done", {"verdict": {"attackers": 1}})


def test_network_and_page_are_served_from_a_thread() -> None:
    board = NetworkBoard({"nodes": 2}, views(), started=0.0)
    with serve_in_thread(0, board.route) as port:
        code, kind, body = get(port, "/network")
        assert (code, kind) == (200, "application/json")
        assert json.loads(body)["processes"][1]["peer_id"] == "16Uiu2HAmLate"
        code, kind, body = get(port, "/")
        assert (code, kind) == (200, "text/html; charset=utf-8")
        assert b"/static/testnet.js" in body
        assert get(port, "/status")[0] == 404
    with socket.socket() as probe:
        probe.settimeout(2)
        with pytest.raises(OSError):  # refused: stopped with the block
            probe.connect(("127.0.0.1", port))


def test_a_server_that_dies_after_start_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    def fatal(path: str) -> Response:
        raise SystemExit("route gone")  # not an Exception: the server's nursery ends with it

    with serve_in_thread(0, fatal) as port:
        with pytest.raises((OSError, http.client.HTTPException)):
            get(port, "/network")
        for server in [t for t in threading.enumerate() if t.name == "p2pfl-dashboard"]:
            server.join(5)  # it dies while the run goes on (it may have ended already)
        assert not any(t.name == "p2pfl-dashboard" for t in threading.enumerate())
        assert f"dashboard: the server on port {port} stopped" in capsys.readouterr().err
    assert "stopped" not in capsys.readouterr().err  # said once, not again when stopped


def test_dashboard_port_in_use_is_a_network_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(NetworkError, match="cannot listen"), serve_in_thread(taken.getsockname()[1], lambda path: (404, "text/plain", b"")):
            pass


def test_dashboard_flag_must_be_a_port() -> None:
    assert Plan(nodes=2, rounds=1, dashboard=0).dashboard == 0
    with pytest.raises(ConfigError, match="--dashboard"):
        Plan(nodes=2, rounds=1, dashboard=70000)
