"""The node's local HTTP endpoint: ``/status`` (JSON), ``/metrics`` (Prometheus), ``/`` (dashboard).

A deliberately tiny, read-only HTTP/1.0 server on trio, bound to loopback only: it carries
no authentication and shows who this node trusts, so it is never exposed. Every client is
treated as hostile: the request head is capped, reading it has a deadline, connections are
bounded, and no client can make the server raise. Only GET and HEAD exist (anything else is
405); a request naming a non-loopback ``Host`` is refused (403), so a web page that rebinds
its DNS name to 127.0.0.1 cannot read the node; every answer carries a strict
Content-Security-Policy. :func:`serve_http` is the server, :func:`serve_status` the node's
routes on it; the test-network launcher serves its own routes with the same server.

:func:`fetch_status` is the matching synchronous client used by ``p2pfl node status`` and
the testnet launcher.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from p2pfl.cli.dashboard.assets import asset
from p2pfl.errors import ConfigError, NetworkError
from p2pfl.node.stats import finite_json

if TYPE_CHECKING:  # importing p2pfl.node loads torch: `p2pfl node status` need not wait
    from p2pfl.node.stats import NodeStatistics

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8 * 1024
READ_DEADLINE = 5.0  # seconds to deliver the whole request head
WRITE_DEADLINE = 5.0  # seconds for a client to take our (small) response
LINGER_SECONDS = 2.0  # after answering, how long to drain a client's leftover input
LINGER_BYTES = 64 * 1024
MAX_CONNECTIONS = 32  # a scraper and a CLI need one or two; the rest is abuse
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # what fetch_status agrees to read

JSON_TYPE = "application/json"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# Scripts, styles, images and fetches from this origin only; nothing inline, no plugins,
# no <base>, no forms, not framed by another site.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    f"Content-Security-Policy: {CONTENT_SECURITY_POLICY}\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: DENY\r\n"
    "Referrer-Policy: no-referrer\r\n"
)

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[str], Response]  # the answer to a GET of a path (query string removed)
NOT_FOUND: Response = (404, "text/plain", b"not found; try /, /status or /metrics\n")


class BadRequest(Exception):
    """The request head is malformed or too long (internal to this module)."""


async def serve_status(
    port: int,
    get_stats: Callable[[], NodeStatistics],
    *,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # mypy 2.4 misses this re-export
) -> None:
    """Serve ``/status``, ``/metrics`` and the dashboard on ``host:port`` until cancelled.

    Args:
        port: TCP port; 0 picks a free one (reported through ``task_status``).
        get_stats: returns the node's current statistics; called once per request.
        host: a loopback address; anything else is refused (the endpoint has no auth).
        task_status: receives the actual port once the socket listens.

    Raises:
        ConfigError: ``host`` is not a loopback address.
        NetworkError: the port cannot be bound (in use, no permission).
    """
    await serve_http(port, status_route(get_stats), host=host, task_status=task_status)


async def serve_http(
    port: int,
    route: Route,
    *,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
) -> None:
    """Answer GET/HEAD requests with ``route(path)`` on ``host:port`` until cancelled.

    Raises:
        ConfigError: ``host`` is not a loopback address.
        NetworkError: the port cannot be bound (in use, no permission).
    """
    _require_loopback(host)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise NetworkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    actual_port = listeners[0].socket.getsockname()[1]
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, route, limiter)

    logger.info("read-only HTTP endpoint on http://%s:%d/", host, actual_port)
    task_status.started(actual_port)
    await trio.serve_listeners(handler, listeners)


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"http host: {host!r} is not a loopback address; use 127.0.0.1")


async def _handle(stream: trio.SocketStream, route: Route, limiter: trio.CapacityLimiter) -> None:
    """Answer one connection; swallow everything a client can cause."""
    try:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await _send(stream, 503, "text/plain", b"too many connections\n")
            return
        try:
            await _serve_one(stream, route)
        finally:
            limiter.release()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to tell it
    except Exception:
        logger.exception("status endpoint: unexpected error while serving a client")
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_one(stream: trio.SocketStream, route: Route) -> None:
    with trio.move_on_after(READ_DEADLINE) as scope:
        try:
            head = await _read_head(stream)
        except BadRequest as exc:
            await _send(stream, 400, "text/plain", f"bad request: {exc}\n".encode())
            return
    if scope.cancelled_caught or head is None:
        return  # too slow or closed early: drop it without a word
    try:
        method, path = _parse_request_line(head)
    except BadRequest as exc:
        await _send(stream, 400, "text/plain", f"bad request: {exc}\n".encode())
        return
    status, content_type, body = _answer(method, path, head, route)
    await _send(stream, status, content_type, body, head_only=method == "HEAD")


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """Read up to the blank line ending the head; None if the client closed first."""
    buffer = bytearray()
    while True:
        end = _head_end(buffer)
        if end is not None:
            return bytes(buffer[:end])
        if len(buffer) >= MAX_HEAD_BYTES:
            raise BadRequest(f"request head over {MAX_HEAD_BYTES} bytes")
        chunk = await stream.receive_some(MAX_HEAD_BYTES + 1 - len(buffer))
        if not chunk:
            return None
        buffer += chunk


def _head_end(buffer: bytearray) -> int | None:
    for terminator in (b"\r\n\r\n", b"\n\n"):
        index = buffer.find(terminator)
        if 0 <= index <= MAX_HEAD_BYTES:
            return index
    return None


def _parse_request_line(head: bytes) -> tuple[str, str]:
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("request line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/") or not parts[1].startswith("/"):
        raise BadRequest("expected 'METHOD /path HTTP/1.x'")
    return parts[0], parts[1].split("?", 1)[0]


def _answer(method: str, path: str, head: bytes, route: Route) -> Response:
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"read-only: only GET and HEAD\n"
    if not _loopback_host(head):
        return 403, "text/plain", b"Host must be 127.0.0.1, localhost or [::1] (use an SSH tunnel)\n"
    try:
        return route(path)
    except Exception:
        logger.exception("status endpoint: building %s failed", path)
        return 500, "text/plain", b"internal error\n"


def _loopback_host(head: bytes) -> bool:
    """Whether the request's Host header (if any) names this machine.

    A browser always sends one; a page whose DNS name was rebound to 127.0.0.1 sends its
    own name, which must not get an answer.
    """
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace").lower()
            host = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            if host == "localhost":
                return True
            try:
                return ipaddress.ip_address(host).is_loopback
            except ValueError:
                return False
    return True


def status_route(get_stats: Callable[[], NodeStatistics]) -> Route:
    """Return the node's routes: ``/status``, ``/metrics`` and the dashboard's files."""

    def route(path: str) -> Response:
        if path == "/status":
            body = json.dumps(finite_json(get_stats().to_json()), separators=(",", ":")).encode()
            return 200, JSON_TYPE, body
        if path == "/metrics":
            return 200, PROMETHEUS_TYPE, render_metrics(get_stats()).encode()
        found = asset(path, index="node.html")
        return NOT_FOUND if found is None else (200, *found)

    return route


async def _send(
    stream: trio.SocketStream, status: int, content_type: str, body: bytes, *, head_only: bool = False
) -> None:
    head = (
        f"HTTP/1.0 {status} {REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Allow: GET, HEAD\r\n" if status == 405 else "")
        + SECURITY_HEADERS
        + "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    # A client that never reads must not hold the connection (and a limiter slot) forever.
    with trio.move_on_after(WRITE_DEADLINE):
        await stream.send_all(head if head_only else head + body)
        await _linger(stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drain what the client sent until it closes too.

    Closing a socket with unread input makes the kernel send a reset, which can destroy
    our response before the client reads it (a refused or oversized request).
    """
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained < LINGER_BYTES and (chunk := await stream.receive_some(4096)):
            drained += len(chunk)



# --------------------------------------------------------------------------- metrics


def render_metrics(stats: NodeStatistics) -> str:
    """Render ``stats`` in the Prometheus text exposition format 0.0.4."""
    out: list[str] = []
    info = {"peer_id": stats.peer_id, "network": stats.network_id, "state": stats.state}
    _metric(out, "p2pfl_info", "gauge", "Node identity and state (value is always 1).", [(info, 1)])
    _metric(out, "p2pfl_round", "gauge", "Round in progress.", [({}, stats.round)])
    if stats.rounds_target is not None:
        _metric(out, "p2pfl_rounds_target", "gauge", "Rounds this node runs.", [({}, stats.rounds_target)])
    _metric(out, "p2pfl_accuracy", "gauge", "Test accuracy after the last finished round.", [({}, stats.accuracy)])
    _metric(out, "p2pfl_loss", "gauge", "Test loss after the last finished round.", [({}, stats.loss)])
    if stats.epsilon_target is not None:
        _metric(out, "p2pfl_epsilon_spent", "gauge", "Differential privacy spent (epsilon).", [({}, stats.epsilon_spent)])
        _metric(out, "p2pfl_epsilon_target", "gauge", "Differential privacy budget (epsilon).", [({}, stats.epsilon_target)])
    _metric(out, "p2pfl_neighbours", "gauge", "Connected neighbours.", [({}, len(stats.neighbours))])
    _metric(out, "p2pfl_bytes_in_total", "counter", "Bytes received from peers.", [({}, stats.bytes_in)])
    _metric(out, "p2pfl_bytes_out_total", "counter", "Bytes sent to peers.", [({}, stats.bytes_out)])
    _metric(out, "p2pfl_payload_bytes_total", "counter", "Of those, model payload bytes (data plane).",
            [({"direction": "in"}, stats.payload_in), ({"direction": "out"}, stats.payload_out)])
    _metric(out, "p2pfl_control_bytes_total", "counter", "Of those, announcement bytes (control).",
            [({"direction": "in"}, stats.bytes_in - stats.payload_in),
             ({"direction": "out"}, stats.bytes_out - stats.payload_out)])
    _metric(out, "p2pfl_updates_accepted_total", "counter", "Neighbour updates accepted.", [({}, stats.accepted)])
    _metric(
        out,
        "p2pfl_updates_rejected_total",
        "counter",
        "Neighbour updates rejected, by reason.",
        [({"reason": reason}, count) for reason, count in sorted(stats.rejected.items())],
    )
    peers = sorted(stats.reputation, key=lambda p: p.peer)
    _metric(out, "p2pfl_peer_reputation", "gauge", "Reputation score in [0, 1] this node holds for a peer.",
            [({"peer": p.peer}, p.score) for p in peers])
    _metric(out, "p2pfl_peer_weight", "gauge", "Aggregation weight this node gives a peer.",
            [({"peer": p.peer}, p.weight) for p in peers])
    _metric(out, "p2pfl_peer_banned", "gauge", "1 if this node bans the peer.",
            [({"peer": p.peer}, int(p.banned)) for p in peers])
    return "\n".join(out) + "\n"


def _metric(
    out: list[str],
    name: str,
    kind: str,
    help_text: str,
    samples: Iterable[tuple[Mapping[str, str], float | int | None]],
) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{_labels(labels)} {_number(value)}")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{key}="{_escape_label(str(value))}"' for key, value in labels.items())
    return "{" + body + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | int | None) -> str:
    if value is None:
        return "NaN"  # Prometheus' own spelling of "no value yet"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


# --------------------------------------------------------------------------- client


def fetch_status(port: int, *, host: str = "127.0.0.1", timeout: float = 2.0) -> dict[str, Any]:
    """GET ``/status`` from a local node and return the decoded document.

    Raises:
        NetworkError: the node is unreachable, too slow, or answered with something
            other than a JSON object.
    """
    where = f"{host}:{port}"
    # http.client, not urllib: urllib honours http_proxy and would send loopback
    # requests to a proxy.
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/status", headers={"Accept": JSON_TYPE})
        response = connection.getresponse()
        body = response.read(MAX_RESPONSE_BYTES + 1)
    except ConnectionRefusedError:
        raise NetworkError(f"no node listening on {where}") from None
    except TimeoutError:
        raise NetworkError(f"node at {where} did not answer within {timeout} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise NetworkError(f"cannot read /status from {where}: {exc}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise NetworkError(f"node at {where} answered HTTP {response.status} {response.reason}")
    if len(body) > MAX_RESPONSE_BYTES:
        raise NetworkError(f"/status from {where} is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError:
        raise NetworkError(f"/status from {where} is not valid JSON") from None
    if not isinstance(document, dict):
        raise NetworkError(f"/status from {where} is not a JSON object")
    return document


__all__ = ["Response", "Route", "fetch_status", "render_metrics", "serve_http", "serve_status", "status_route"]
