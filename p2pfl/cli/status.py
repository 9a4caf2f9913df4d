"""``p2pfl node status``: show what a running node reports on its local endpoint."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p2pfl.core.crypto import short_id
from p2pfl.errors import ConfigError, NetworkError
from p2pfl.term import fmt_bytes, fmt_float, fmt_pct, table

DEFAULT_HTTP_PORT = 7352  # [node] http_port's default
RECENT_ROUNDS = 5  # rounds shown in the history table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``p2pfl node status`` to ``parser``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, help=f"the node's HTTP port (default {DEFAULT_HTTP_PORT})")
    where.add_argument("--config", type=Path, help="read [node] http_port from this node.toml")
    parser.add_argument("--json", action="store_true", help="print the raw /status JSON")


def status_command(args: argparse.Namespace) -> int:
    """Fetch and print a local node's status; return the process exit code."""
    from p2pfl.cli.http import fetch_status  # trio: not for `p2pfl --help`

    try:
        port = _resolve_port(getattr(args, "port", None), getattr(args, "config", None))
        document = fetch_status(port)
    except (ConfigError, NetworkError) as exc:
        print(f"p2pfl node status: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(render_status(document))
    return 0


def _resolve_port(port: int | None, config: Path | str | None) -> int:
    if port is None and config is not None:
        port = _port_from_config(Path(config))
    if port is None:
        return DEFAULT_HTTP_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"--port: {port} is not a TCP port (1-65535)")
    return port


def _port_from_config(path: Path) -> int:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    node = document.get("node", {})
    port = node.get("http_port", DEFAULT_HTTP_PORT) if isinstance(node, dict) else None
    if not isinstance(port, int) or isinstance(port, bool):
        raise ConfigError(f"{path}: [node] http_port must be an integer, got {port!r}")
    return port


# --------------------------------------------------------------------------- rendering


def render_status(status: Mapping[str, Any]) -> str:
    """Render one node's ``/status`` document for a terminal.

    Tolerates missing fields (an older or newer node) by showing '-'.
    """
    sections = [_header(status)]
    history = status.get("history") or []
    if history:
        sections.append("recent rounds\n" + _history_table(history[-RECENT_ROUNDS:]))
    reputation = status.get("reputation") or []
    if reputation:
        sections.append("reputation (highest first)\n" + reputation_table(reputation))
    else:
        sections.append("reputation: no peers scored yet")
    return "\n\n".join(sections)


def _header(status: Mapping[str, Any]) -> str:
    peer = str(status.get("peer_id", "?"))
    target = status.get("rounds_target")
    neighbours = [str(n) for n in status.get("neighbours") or []]
    rejected = status.get("rejected") or {}
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items()))
    rows = [
        ("node", f"{short_id(peer)}  ({peer})"),
        ("network", str(status.get("network_id", "-"))),
        ("state", str(status.get("state", "-"))),
        ("round", f"{status.get('round', '-')}" + (f"/{target}" if target is not None else "")),
        ("accuracy", f"{fmt_pct(status.get('accuracy'))}    loss {fmt_float(status.get('loss'), 4)}"),
        ("traffic", f"in {fmt_bytes(status.get('bytes_in'))}    out {fmt_bytes(status.get('bytes_out'))}"),
        ("updates", f"accepted {status.get('accepted', 0)}    rejected {sum(rejected.values())}"
         + (f" ({reasons})" if reasons else "")),
        ("neighbours", f"{len(neighbours)}" + (": " + " ".join(short_id(n) for n in neighbours) if neighbours else "")),
    ]
    if status.get("epsilon_target") is not None:
        rows.append(("privacy", f"epsilon {fmt_float(status.get('epsilon_spent'), 2)} of {status['epsilon_target']:g} spent"))
    if status.get("byzantine"):
        rows.append(("byzantine", f"this node runs the {status['byzantine']!r} attack"))
    return "\n".join(f"{label:<11} {value}" for label, value in rows)


def _history_table(history: list[Mapping[str, Any]]) -> str:
    rows = [
        [
            str(r.get("round", "-")),
            fmt_pct(r.get("accuracy")),
            fmt_float(r.get("loss"), 4),
            str(r.get("used", "-")),
            fmt_float(r.get("duration"), 1),
            fmt_bytes(r.get("bytes_in")),
            fmt_bytes(r.get("bytes_out")),
        ]
        for r in history
    ]
    return table(["round", "accuracy", "loss", "used", "secs", "in", "out"], rows, align="rrrrrrr")


def reputation_table(reputation: list[Mapping[str, Any]]) -> str:
    """Render reputation entries as a table sorted by score, highest first."""
    entries = sorted(reputation, key=lambda p: (-float(p.get("score") or 0.0), str(p.get("peer"))))
    rows = [
        [
            short_id(str(p.get("peer", "?"))),
            fmt_float(p.get("score")),
            fmt_float(p.get("weight")),
            "BANNED" if p.get("banned") else "",
            str(p.get("last_reason") or ""),
        ]
        for p in entries
    ]
    return table(["peer", "score", "weight", "banned", "last reason"], rows, align="lrrll")


__all__ = ["DEFAULT_HTTP_PORT", "add_arguments", "render_status", "reputation_table", "status_command"]
