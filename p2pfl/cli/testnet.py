"""``p2pfl testnet``: run N real node processes on loopback, watch them, report.

The launcher writes one key and one TOML config per node (:mod:`p2pfl.cli.testnet_plan`),
starts every node as its own process group, polls their ``/status`` endpoints for a live
view, stops them with SIGTERM once all are done, and writes the report. Whatever happens (Ctrl-C, SIGTERM, an error,
the timeout) no node process outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.cli.dashboard.network import NetworkBoard, dashboard_for
from p2pfl.cli.http import fetch_status
from p2pfl.cli.processes import (
    NodeProcesses,
    Terminated,
    log_tail,
    node_argv,
    node_env,
    termination_as_interrupt,
)
from p2pfl.cli.report import build_report, render_summary, write_report
from p2pfl.cli.testnet_plan import (
    HOST,
    TestnetPlan,
    plan_from_args,
    plan_meta,
    prepare_directory,
    write_configs,
)
from p2pfl.core.crypto import short_id
from p2pfl.errors import ConfigError, P2PFLError
from p2pfl.term import LiveBlock, fmt_duration, fmt_pct, table


def testnet_command(args: argparse.Namespace) -> int:
    """Run a test network as described by ``args``; return the process exit code."""
    try:
        plan = plan_from_args(args)
    except ConfigError as exc:
        print(f"p2pfl testnet: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run_testnet(plan)
    except P2PFLError as exc:
        print(f"p2pfl testnet: error: {exc}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- the run

# Seconds between /status sweeps. Each costs every node an HTTP connection and a full status
# (history included): at 0.5 s that was ~1/7 of a 16-node network's CPU outside learning.
POLL_INTERVAL = 1.0
FETCH_TIMEOUT = 1.0
HEARTBEAT = 30.0  # non-TTY: print a line at least this often even if nothing changed
# Once every honest node is done, attackers get this long to finish before we stop anyway.
BYZANTINE_GRACE = 10.0


@dataclass(slots=True)
class NodeView:
    """What the launcher knows about one node process."""

    index: int
    peer_id: str
    role: str
    http_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    status: dict[str, Any] | None = None
    exit_code: int | None = None

    def completed(self, rounds: int) -> int:
        """Return how many of the ``rounds`` this node is past (caught-up rounds count)."""
        if self.status is None:
            return 0
        if self.status.get("state") == "done":
            return rounds
        # `round` is the next round to run (0-based), i.e. the rounds behind the node;
        # len(history) would undercount a node that caught up and skipped rounds.
        reached = self.status.get("round")
        return min(rounds, reached if isinstance(reached, int) else len(self.status.get("history") or []))

    def finished(self, rounds: int) -> bool:
        """Return True once the node reports state "done" or has reached round ``rounds``."""
        return self.completed(rounds) >= rounds


def run_testnet(plan: TestnetPlan) -> int:
    """Launch, watch, stop and report one test network; return the exit code."""
    prepare_directory(plan)
    peer_ids, ports, paths = write_configs(plan)
    views = [
        NodeView(index=i, peer_id=peer_ids[i], role="byzantine" if plan.is_byzantine(i) else "honest",
                 http_port=ports[plan.nodes + i], log=plan.out / "logs" / f"node{i}.log")
        for i in range(plan.nodes)
    ]
    board = NetworkBoard(plan_meta(plan), views, time.monotonic())
    with dashboard_for(plan.dashboard, board, HOST):  # --dashboard PORT
        return _run(plan, views, paths, board)


def _run(plan: TestnetPlan, views: list[NodeView], paths: list[Path], board: NetworkBoard) -> int:
    print(_banner(plan), flush=True)
    started = time.monotonic()
    interrupt_code = 0
    with termination_as_interrupt(), NodeProcesses() as procs:
        try:
            env = node_env()
            for group in _process_groups(plan):
                proc = procs.spawn(node_argv(*(paths[i] for i in group), verbose=plan.verbose), views[group[0]].log, env)
                for i in group:
                    views[i].proc, views[i].log = proc, views[group[0]].log
            outcome = _watch(plan, views, procs, started)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP via Terminated
            outcome = "interrupted"
            interrupt_code = 128 + exc.signum if isinstance(exc, Terminated) else 130
        print(f"{outcome}: stopping {plan.nodes} nodes (SIGTERM, SIGKILL after {procs.grace:.0f} s) ...", flush=True)
        stopping = time.monotonic()
    killed = f", {procs.killed} needed SIGKILL" if procs.killed else ""
    print(f"all nodes stopped in {time.monotonic() - stopping:.1f} s{killed}", flush=True)
    code = _finish(plan, views, outcome, time.monotonic() - started, board)
    return interrupt_code or code


def _process_groups(plan: TestnetPlan) -> list[list[int]]:
    """Return the node indices of each process: one node each, but sybils share one.

    A sybil attack is one attacker running k identities: its nodes run in one process
    and share one SybilGroup (their ALIE model is computed over everything any of them
    sees).
    """
    byzantine = [i for i in range(plan.nodes) if plan.is_byzantine(i)]
    if plan.attack == "sybil" and byzantine:
        return [[i] for i in range(plan.nodes) if i not in byzantine] + [byzantine]
    return [[i] for i in range(plan.nodes)]


def _banner(plan: TestnetPlan) -> str:
    attack = f", {plan.byzantine} byzantine ({plan.attack})" if plan.byzantine else ""
    return (
        f"testnet: {plan.nodes} nodes{attack}, {plan.rounds} rounds, rule {plan.rule}, "
        f"{plan.partition} data; logs in {plan.out / 'logs'}"
    )


def _watch(plan: TestnetPlan, views: list[NodeView], procs: NodeProcesses, started: float) -> str:
    """Poll until every node is done, all died, or the timeout; return the outcome."""
    progress = _Progress(plan, started)
    honest_done_at: float | None = None
    with ThreadPoolExecutor(max_workers=min(16, len(views))) as pool:
        while True:
            for view in views:
                _check_exit(view, procs, progress)
            alive = [v for v in views if v.exit_code is None]
            list(pool.map(_poll, alive))
            progress.show(views)
            honest = [v for v in alive if v.role == "honest"]
            now = time.monotonic()
            outcome = None
            if not honest:
                outcome = "failed"
            elif all(v.finished(plan.rounds) for v in honest):
                honest_done_at = honest_done_at or now
                if all(v.finished(plan.rounds) for v in alive) or now - honest_done_at >= BYZANTINE_GRACE:
                    outcome = "done"
            if outcome is None and now - started >= plan.timeout:
                outcome = "timeout"
            if outcome is not None:
                progress.show(views, final=True)
                return outcome
            time.sleep(POLL_INTERVAL)


def _poll(view: NodeView) -> None:
    with contextlib.suppress(P2PFLError):  # not up yet, or busy: keep the last status
        view.status = fetch_status(view.http_port, host=HOST, timeout=FETCH_TIMEOUT)


def _check_exit(view: NodeView, procs: NodeProcesses, progress: _Progress) -> None:
    if view.exit_code is not None or view.proc is None:
        return
    code = procs.exited(view.proc)
    if code is None:
        return
    view.exit_code = code
    tail = log_tail(view.log)
    progress.message(
        f"node n{view.index} ({short_id(view.peer_id)}, {view.role}) exited early with code {code}; "
        f"last lines of {view.log}:\n" + _indent(tail or "(empty log)")
    )


def _indent(text: str) -> str:
    return "\n".join("  | " + line for line in text.splitlines())


class _Progress:
    """Live view: a redrawn table on a terminal, sparse summary lines otherwise."""

    def __init__(self, plan: TestnetPlan, started: float) -> None:
        self.plan = plan
        self.started = started
        self.block = LiveBlock(sys.stdout) if sys.stdout.isatty() else None
        self.last_key: tuple[Any, ...] | None = None
        self.last_print = 0.0

    def message(self, text: str) -> None:
        if self.block:
            self.block.clear()
        print(text, flush=True)

    def show(self, views: list[NodeView], *, final: bool = False) -> None:
        if self.block:
            self.block.update(self.table(views))
            return
        now = time.monotonic()
        key = tuple((v.completed(self.plan.rounds), v.status is not None, v.exit_code) for v in views)
        changed = key != self.last_key
        if (changed and (final or now - self.last_print >= 1.0)) or now - self.last_print >= HEARTBEAT:
            print(self.line(views), flush=True)
            self.last_key, self.last_print = key, now

    def elapsed(self) -> str:
        return f"{fmt_duration(time.monotonic() - self.started)} / {fmt_duration(self.plan.timeout)}"

    def table(self, views: list[NodeView]) -> str:
        rows = [
            [f"n{v.index}", short_id(v.peer_id), v.role, _state(v).ljust(11), f"{v.completed(self.plan.rounds)}/{self.plan.rounds}",
             fmt_pct(v.status.get("accuracy") if v.status else None),
             str(len(v.status.get("neighbours") or [])) if v.status else "-"]
            for v in views
        ]
        body = table(["#", "peer", "role", "state", "rounds", "accuracy", "peers"], rows, align="llllrrr")
        return f"elapsed {self.elapsed()}\n{body}\n{_honest_line(views, self.plan.rounds)}"

    def line(self, views: list[NodeView]) -> str:
        done = [v.completed(self.plan.rounds) for v in views if v.exit_code is None]
        rounds = f"{min(done)}-{max(done)}" if done and min(done) != max(done) else str(done[0] if done else 0)
        up = sum(v.status is not None and v.exit_code is None for v in views)
        return f"[{self.elapsed()}] up {up}/{len(views)}  rounds {rounds}/{self.plan.rounds}  {_honest_line(views, self.plan.rounds)}"


def _state(view: NodeView) -> str:
    if view.exit_code is not None:
        return f"exited({view.exit_code})"
    return str(view.status.get("state", "?")) if view.status else "launching"


def _honest_line(views: list[NodeView], rounds: int) -> str:
    accs = [v.status["accuracy"] for v in views if v.role == "honest" and v.status and v.status.get("accuracy") is not None]
    finished = sum(v.finished(rounds) for v in views)
    acc = f"honest accuracy mean {fmt_pct(sum(accs) / len(accs))} min {fmt_pct(min(accs))}" if accs else "honest accuracy -"
    return f"{acc}  finished {finished}/{len(views)}"


def _finish(plan: TestnetPlan, views: list[NodeView], outcome: str, wall: float, board: NetworkBoard) -> int:
    """Write and print the report (and show it on the dashboard); return the exit code."""
    early = {f"n{v.index}": v.exit_code for v in views if v.exit_code is not None}
    meta = plan_meta(plan) | {
        "outcome": outcome, "wall_seconds": round(wall, 2), "exited_early": early,
        "peers": [v.peer_id for v in views],
        "missing_status": [f"n{v.index}" for v in views if v.status is None],
    }
    statuses = [v.status for v in views if v.status is not None]
    board.finish(outcome, None)
    if not statuses:
        print(f"no node ever answered on /status; see the logs in {plan.out / 'logs'}", file=sys.stderr)
        return 1
    (plan.out / "statuses.json").write_text(json.dumps(statuses, indent=1) + "\n")
    byzantine = [v.peer_id for v in views if v.role == "byzantine"]
    report = build_report(statuses, byzantine=byzantine, meta=meta)
    board.finish(outcome, report)
    written = write_report(report, plan.out)
    print()
    print(render_summary(report))
    print()
    if outcome == "timeout":
        print(f"timeout: stopped after {plan.timeout:.0f} s before every node finished {plan.rounds} rounds")
    if early:
        print(f"nodes that exited early: {', '.join(f'{k} (code {c})' for k, c in early.items())}")
    print("report: " + "  ".join(str(p) for p in [*written, plan.out / "statuses.json"]))
    return 0 if outcome == "done" and not early else 1

__all__ = ["run_testnet", "testnet_command"]
