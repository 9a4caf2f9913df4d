"""``p2pfl testnet``: run N real node processes on loopback, watch them, report.

The launcher writes one key and one TOML config per node, starts every node as its own
process group, polls their ``/status`` endpoints for a live view, stops them with SIGTERM
once all are done, and writes the report. Whatever happens (Ctrl-C, SIGTERM, an error,
the timeout) no node process outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
from p2pfl.cli.term import LiveBlock, fmt_duration, fmt_pct, table
from p2pfl.config import require
from p2pfl.core.crypto import short_id
from p2pfl.errors import ConfigError, P2PFLError

NETWORK_ID = "p2pfl-testnet"
HOST = "127.0.0.1"
MAX_NODES = 64  # each node is a Python process with torch loaded (~300 MB)
PARTITIONS = ("iid", "dirichlet", "shards")
SUBDIRS = ("keys", "configs", "nodes", "logs")  # the only things a rerun deletes
REPORT_FILES = ("report.json", "accuracy.png", "reputation.png", "statuses.json")

TomlValue = str | int | float | bool | list[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class TestnetPlan:
    """Validated parameters of one test network."""

    nodes: int
    rounds: int
    partition: str = "iid"
    alpha: float = 0.5
    byzantine: int = 0
    attack: str | None = None
    rule: str = "clipped_gossip"
    out: Path = Path("runs/testnet")
    base_port: int | None = None
    seed: int = 0
    timeout: float = 600.0
    epochs: int = 1
    batch_size: int = 32
    neighbours: int | None = None  # target neighbours per node; None: the node's default

    def __post_init__(self) -> None:
        require(2 <= self.nodes <= MAX_NODES, "--nodes", f"must be between 2 and {MAX_NODES}, got {self.nodes}")
        require(self.rounds >= 1, "--rounds", f"must be >= 1, got {self.rounds}")
        require(self.partition in PARTITIONS, "--partition", f"must be one of {', '.join(PARTITIONS)}")
        require(self.alpha > 0, "--alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.byzantine < self.nodes, "--byzantine",
                f"must be between 0 and --nodes - 1 = {self.nodes - 1} (node 0 is honest), got {self.byzantine}")
        require(self.byzantine == 0 or bool(self.attack), "--attack", "is required with --byzantine K > 0")
        require(self.byzantine > 0 or not self.attack, "--attack", "needs --byzantine K > 0 attacker nodes")
        require(self.timeout > 0, "--timeout", f"must be > 0 seconds, got {self.timeout}")
        require(self.epochs >= 1, "--epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        if self.base_port is not None:
            top = 65535 - 2 * self.nodes + 1
            require(1024 <= self.base_port <= top, "--base-port", f"must be between 1024 and {top}")

    def is_byzantine(self, index: int) -> bool:
        """Attackers are the last K indices; node 0 (bootstrap) is always honest."""
        return index >= self.nodes - self.byzantine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``p2pfl testnet`` to ``parser``."""
    parser.add_argument("--nodes", type=int, required=True, help="number of node processes")
    parser.add_argument("--rounds", type=int, required=True, help="training rounds per node")
    parser.add_argument("--partition", choices=PARTITIONS, default="iid", help="data split (default iid)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    parser.add_argument("--byzantine", type=int, default=0, metavar="K", help="make the last K nodes attackers")
    parser.add_argument("--attack", help="attack run by the Byzantine nodes (e.g. alie)")
    parser.add_argument("--rule", default="clipped_gossip", help="aggregation rule (default clipped_gossip)")
    parser.add_argument("--out", type=Path, default=Path("runs/testnet"), help="output directory")
    parser.add_argument("--base-port", type=int, help="first TCP port (default: free ports)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="overall bound in seconds (default 600)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--neighbours", type=int, help="target neighbours per node (default: min(N-1, 6): small networks mix best densely)"
    )


def plan_from_args(args: argparse.Namespace) -> TestnetPlan:
    """Validate ``args`` into a plan; raise ConfigError naming the option to change."""
    plan = TestnetPlan(
        nodes=args.nodes, rounds=args.rounds, partition=args.partition, alpha=args.alpha,
        byzantine=args.byzantine, attack=args.attack, rule=args.rule, out=Path(args.out).resolve(),
        base_port=args.base_port, seed=args.seed, timeout=args.timeout, epochs=args.epochs,
        batch_size=args.batch_size, neighbours=args.neighbours,
    )
    _check_names(plan)
    return plan


def _check_names(plan: TestnetPlan) -> None:
    """Refuse unknown rules and attacks here, not in N node logs a few seconds later."""
    from p2pfl.attacks import ATTACKS
    from p2pfl.core.aggregation import RULES

    require(plan.rule in RULES, "--rule", f"unknown rule {plan.rule!r}; choose one of {', '.join(sorted(RULES))}")
    if plan.attack:
        require(plan.attack in ATTACKS, "--attack",
                f"unknown attack {plan.attack!r}; choose one of {', '.join(sorted(ATTACKS))}")


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


# --------------------------------------------------------------------------- ports


def pick_ports(count: int, base: int | None = None, host: str = HOST) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on ``host`` right now.

    With ``base``, the ports are ``base .. base+count-1`` and each must be free;
    otherwise the kernel picks them (all sockets are held open together so no port
    is handed out twice).

    Raises:
        ConfigError: a requested port is in use.
    """
    if base is not None:
        for port in range(base, base + count):
            with socket.socket() as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    raise ConfigError(f"--base-port: port {port} on {host} is in use; pick another base") from None
        return list(range(base, base + count))
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket())
            probe.bind((host, 0))
            ports.append(probe.getsockname()[1])
        return ports


# --------------------------------------------------------------------------- configs


def dumps_toml(document: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """Write tables of scalars and string lists as TOML (all this launcher needs)."""
    lines: list[str] = []
    for name, section in document.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in section.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return "[" + ", ".join(_toml_string(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def node_config(plan: TestnetPlan, index: int, peer_ids: Sequence[str], ports: Sequence[int]) -> dict[str, Any]:
    """Return the TOML document of node ``index``; ``ports`` holds libp2p then HTTP ports."""
    libp2p_port, http_port = ports[index], ports[plan.nodes + index]
    neighbours = plan.neighbours or min(plan.nodes - 1, 6)
    # Node 0 bootstraps everyone; the previous node too, so the graph is no star even
    # before discovery has found more peers.
    seeds = sorted({0, index - 1}) if index > 1 else [0] if index == 1 else []
    bootstrap = [f"/ip4/{HOST}/tcp/{ports[i]}/p2p/{peer_ids[i]}" for i in seeds]
    document: dict[str, dict[str, TomlValue]] = {
        "node": {
            "network_id": NETWORK_ID,
            "key_file": str(plan.out / "keys" / f"node{index}.pem"),
            "data_dir": str(plan.out / "nodes" / f"node{index}"),
            "rounds": plan.rounds,
            "http_port": http_port,
            "exit_when_done": False,  # the launcher stops everyone together
        },
        "net": {
            "listen_host": HOST,
            "port": libp2p_port,
            "bootstrap": bootstrap,
            # Small networks mix best densely (Dirichlet(0.5), 8 nodes: 3 -> 0.85, 7 -> 0.91).
            "target_neighbours": neighbours,
        },
        "train": {
            "task": "digits",
            "partition": plan.partition,
            "alpha": float(plan.alpha),
            "node_index": index,
            "num_nodes": plan.nodes,
            "seed": plan.seed,
            "epochs": plan.epochs,
            "batch_size": plan.batch_size,
        },
        "aggregation": {"rule": plan.rule},
        # Nodes start over several seconds (torch + libp2p imports); wait for the full
        # neighbourhood so that round 0 is trained together instead of alone.
        "round": {"min_neighbours": neighbours, "start_timeout": 60.0},
    }
    if plan.is_byzantine(index):
        from p2pfl.attacks import network_defaults

        defaults = network_defaults(str(plan.attack), plan.nodes, plan.byzantine)
        document["attack"] = {"name": str(plan.attack), **defaults}
    return document


def prepare_directory(plan: TestnetPlan) -> None:
    """Create the output directory and delete what a previous run left in it."""
    if plan.out.exists() and not plan.out.is_dir():
        raise ConfigError(f"--out: {plan.out} exists and is not a directory")
    plan.out.mkdir(parents=True, exist_ok=True)
    for name in SUBDIRS:
        shutil.rmtree(plan.out / name, ignore_errors=True)
    for name in REPORT_FILES:
        (plan.out / name).unlink(missing_ok=True)
    for name in SUBDIRS:
        (plan.out / name).mkdir(mode=0o700)


def write_configs(plan: TestnetPlan) -> tuple[list[str], list[int], list[Path]]:
    """Generate keys, pick ports and write every node's config.

    Returns:
        peer ids, ports (libp2p for nodes 0..N-1, then HTTP), config paths.
    """
    from p2pfl.core.crypto import Identity

    peer_ids = []
    crypto_log = logging.getLogger("p2pfl.core.crypto")
    level = crypto_log.level
    crypto_log.setLevel(logging.WARNING)  # one "wrote key file" line per node is noise here
    try:
        for index in range(plan.nodes):
            identity = Identity.generate()
            identity.save(plan.out / "keys" / f"node{index}.pem")
            peer_ids.append(identity.peer_id)
    finally:
        crypto_log.setLevel(level)
    ports = pick_ports(2 * plan.nodes, plan.base_port)
    paths = []
    for index in range(plan.nodes):
        path = plan.out / "configs" / f"node{index}.toml"
        path.write_text(dumps_toml(node_config(plan, index, peer_ids, ports)))
        paths.append(path)
    return peer_ids, ports, paths


def plan_meta(plan: TestnetPlan) -> dict[str, Any]:
    """Return the plan as JSON-able report metadata."""
    meta = asdict(plan)
    meta["out"] = str(plan.out)
    meta["network_id"] = NETWORK_ID
    return meta


# --------------------------------------------------------------------------- the run

POLL_INTERVAL = 0.5  # seconds between /status sweeps
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
    print(_banner(plan), flush=True)
    started = time.monotonic()
    interrupt_code = 0
    with termination_as_interrupt(), NodeProcesses() as procs:
        try:
            env = node_env()
            for group in _process_groups(plan):
                proc = procs.spawn(node_argv(*(paths[i] for i in group)), views[group[0]].log, env)
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
    code = _finish(plan, views, outcome, time.monotonic() - started)
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


def _finish(plan: TestnetPlan, views: list[NodeView], outcome: str, wall: float) -> int:
    """Write and print the report; return the exit code for ``outcome``."""
    early = {f"n{v.index}": v.exit_code for v in views if v.exit_code is not None}
    meta = plan_meta(plan) | {
        "outcome": outcome, "wall_seconds": round(wall, 2), "exited_early": early,
        "peers": [v.peer_id for v in views],
        "missing_status": [f"n{v.index}" for v in views if v.status is None],
    }
    statuses = [v.status for v in views if v.status is not None]
    if not statuses:
        print(f"no node ever answered on /status; see the logs in {plan.out / 'logs'}", file=sys.stderr)
        return 1
    (plan.out / "statuses.json").write_text(json.dumps(statuses, indent=1) + "\n")
    byzantine = [v.peer_id for v in views if v.role == "byzantine"]
    report = build_report(statuses, byzantine=byzantine, meta=meta)
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

__all__ = [
    "NodeProcesses",
    "TestnetPlan",
    "add_arguments",
    "dumps_toml",
    "node_config",
    "pick_ports",
    "run_testnet",
    "plan_from_args",
    "testnet_command",
]
