"""The test network's dashboard: one JSON document for every node, served from the launcher.

The launcher already polls every node's ``/status``; :class:`NetworkBoard` turns what it
last saw into ``/network`` (the same report the run ends with, built live, plus the raw
statuses), and :func:`dashboard_for` serves it and ``testnet.html`` on 127.0.0.1 from a
background thread while the synchronous launcher carries on.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import trio

from p2pfl.cli.dashboard.assets import asset
from p2pfl.cli.http import JSON_TYPE, NOT_FOUND, Response, Route, serve_http
from p2pfl.cli.report import build_report
from p2pfl.errors import NetworkError
from p2pfl.node.stats import finite_json

NETWORK_PATH = "/network"
LINGER = 5.0  # seconds the final state stays served after a run: open pages poll it once more
START_DEADLINE = 10.0  # seconds for the server thread to bind its port
STOP_DEADLINE = 5.0


class NodeProcess(Protocol):
    """What the board reads of a launcher's node view."""

    index: int
    peer_id: str
    role: str
    status: dict[str, Any] | None
    exit_code: int | None


class NetworkBoard:
    """What ``/network`` shows: the run's plan, every node's last status, the report."""

    def __init__(self, meta: Mapping[str, Any], views: Sequence[NodeProcess], started: float) -> None:
        """Watch ``views`` (the launcher keeps updating them) of a run started at ``started``."""
        self.meta = dict(meta)
        self.views = list(views)
        self.started = started  # time.monotonic()
        self.outcome: str | None = None
        self.report: dict[str, Any] | None = None

    def finish(self, outcome: str, report: dict[str, Any] | None) -> None:
        """Freeze the board on the run's outcome and final report."""
        self.report, self.outcome = report, outcome

    def document(self) -> dict[str, Any]:
        """Return the ``/network`` document (plain JSON data)."""
        views = list(self.views)
        report = self.report
        if report is None:  # live: the same report as at the end, from what we have so far
            statuses = [v.status or {"peer_id": v.peer_id, "state": "launching"} for v in views]
            byzantine = [v.peer_id for v in views if v.role == "byzantine"]
            report = build_report(statuses, byzantine=byzantine, meta=self.meta)
        return {
            "meta": self.meta,
            "elapsed": round(time.monotonic() - self.started, 1),
            "final": self.outcome is not None,
            "outcome": self.outcome,
            "processes": [
                {"index": v.index, "peer_id": v.peer_id, "role": v.role, "exit_code": v.exit_code}
                for v in views
            ],
            "statuses": [v.status for v in views],
            "report": report,
        }

    def route(self, path: str) -> Response:
        """Answer ``/network`` and the page's files."""
        if path == NETWORK_PATH:
            body = json.dumps(finite_json(self.document()), separators=(",", ":")).encode()
            return 200, JSON_TYPE, body
        found = asset(path, index="testnet.html")
        return NOT_FOUND if found is None else (200, *found)


@contextlib.contextmanager
def serve_in_thread(port: int, route: Route) -> Iterator[int]:
    """Serve ``route`` on 127.0.0.1:``port`` from a thread (0: any free); yield the bound port.

    For synchronous callers (the launcher, browser tests); the server is stopped on exit.
    A server that dies while the block runs says so on stderr at once.

    Raises:
        NetworkError: the port cannot be bound.
    """
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            state["port"] = await nursery.start(serve_http, port, route)
            state["token"], state["scope"] = trio.lowlevel.current_trio_token(), nursery.cancel_scope
            ready.set()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # handed to the launcher's thread below
            state["error"] = _single(exc)
        finally:
            ready.set()
        if "port" in state and not state.get("stopping"):  # died after start: nobody waits on it
            print(f"dashboard: the server on port {state['port']} stopped ({state.get('error')!r}); "
                  "the run goes on without it", file=sys.stderr, flush=True)

    thread = threading.Thread(target=run, name="p2pfl-dashboard", daemon=True)
    thread.start()
    if not ready.wait(START_DEADLINE) or "port" not in state:
        raise state.get("error") or NetworkError(f"dashboard did not start within {START_DEADLINE} s")
    try:
        yield state["port"]
    finally:
        state["stopping"] = True
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
        thread.join(STOP_DEADLINE)


@contextlib.contextmanager
def dashboard_for(port: int | None, board: NetworkBoard, host: str = "127.0.0.1") -> Iterator[None]:
    """Serve ``board`` while the block runs when ``port`` is set (0: any free port).

    After a block that ends normally, the final state is served :data:`LINGER` seconds
    more so that an open page shows the verdict.
    """
    if port is None:
        yield
        return
    with serve_in_thread(port, board.route) as bound:
        url = f"http://{host}:{bound}/"
        print(f"dashboard: {url}  (read-only; from another machine: ssh -L {bound}:{host}:{bound} THIS_HOST)",
              flush=True)
        yield
        print(f"dashboard: the final state stays at {url} for {LINGER:.0f} s", flush=True)
        time.sleep(LINGER)


def _single(exc: BaseException) -> BaseException:
    """Unwrap the exception groups trio's nurseries put around one error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


__all__ = ["LINGER", "NETWORK_PATH", "NetworkBoard", "dashboard_for", "serve_in_thread"]
