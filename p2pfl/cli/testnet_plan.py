"""What a test network is made of: the plan, its options, ports, keys and node configs.

:func:`write_configs` writes one key and one TOML config per node under the plan's
output directory; :mod:`p2pfl.cli.testnet` starts and watches the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p2pfl.config import DEFAULT_RULE, require
from p2pfl.errors import ConfigError

NETWORK_ID = "p2pfl-testnet"
HOST = "127.0.0.1"
MAX_NODES = 64  # each node is a Python process with torch loaded (~300 MB)
PARTITIONS = ("iid", "dirichlet", "shards")
SPAN_LOW = 3.0  # --span-check: the span check's threshold measured in docs/RESULTS.md (session 14)
SETTABLE = ("reputation", "harm_check", "limits")  # --set SECTION.KEY=VALUE: these sections
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
    # --attack-param KEY=VALUE, written into the attackers' [attack] tables.
    attack_params: tuple[tuple[str, TomlValue], ...] = ()
    rule: str = DEFAULT_RULE
    out: Path = Path("runs/testnet")
    base_port: int | None = None
    seed: int = 0
    timeout: float = 600.0
    epochs: int = 1
    batch_size: int = 32
    neighbours: int | None = None  # target neighbours per node; None: the node's default
    dp_epsilon: float | None = None  # honest nodes train with DP-SGD within this budget
    dashboard: int | None = None  # serve the live page on 127.0.0.1:PORT (0: any free port)
    # A bundled task's name or a factory "package.module:function"; it gets partition,
    # alpha and batch_size as [task] keys.
    task: str = "digits"
    codec: str | None = None  # [net] codec of every node; None: the node's default (raw)
    codec_k: float | None = None  # [net] codec_k (topk)
    # --reference FILE: a public reference set every node checks neighbours on.
    reference: Path | None = None
    span_check: bool = False  # --span-check: every node runs the opt-in span check
    # --set SECTION.KEY=VALUE: a key of every node's config, e.g. reputation.threshold=0.2.
    settings: tuple[tuple[str, str, TomlValue], ...] = ()
    verbose: int = 0  # p2pfl -v / -vv: the node processes log at that verbosity too

    def __post_init__(self) -> None:
        require(2 <= self.nodes <= MAX_NODES, "--nodes", f"must be between 2 and {MAX_NODES}, got {self.nodes}")
        require(self.rounds >= 1, "--rounds", f"must be >= 1, got {self.rounds}")
        require(self.partition in PARTITIONS, "--partition", f"must be one of {', '.join(PARTITIONS)}")
        require(self.alpha > 0, "--alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.byzantine < self.nodes, "--byzantine",
                f"must be between 0 and --nodes - 1 = {self.nodes - 1} (node 0 is honest), got {self.byzantine}")
        require(self.byzantine == 0 or bool(self.attack), "--attack", "is required with --byzantine K > 0")
        require(self.byzantine > 0 or not self.attack, "--attack", "needs --byzantine K > 0 attacker nodes")
        require(bool(self.attack) or not self.attack_params, "--attack-param", "needs --attack")
        require(self.timeout > 0, "--timeout", f"must be > 0 seconds, got {self.timeout}")
        require(self.epochs >= 1, "--epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        require(self.dp_epsilon is None or self.dp_epsilon > 0, "--dp-epsilon", "must be > 0")
        if self.codec is not None:
            from p2pfl.core import lossy  # noqa: F401  (registers the lossy codecs)
            from p2pfl.core.codec import CODECS  # late: torch; `p2pfl --help` stays light

            require(self.codec in CODECS, "--codec", f"must be one of {', '.join(sorted(CODECS))}")
        require(self.codec_k is None or 0 < self.codec_k <= 1, "--codec-k", "must be a fraction in (0, 1]")
        if self.base_port is not None:
            top = 65535 - 2 * self.nodes + 1
            require(1024 <= self.base_port <= top, "--base-port", f"must be between 1024 and {top}")
        if self.dashboard is not None:
            require(0 <= self.dashboard <= 65535, "--dashboard", f"must be a TCP port (0: any free), got {self.dashboard}")

    def is_byzantine(self, index: int) -> bool:
        """Attackers are the last K indices; node 0 (bootstrap) is always honest."""
        return index >= self.nodes - self.byzantine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``p2pfl testnet`` to ``parser``."""
    parser.add_argument("--nodes", type=int, required=True, help="number of node processes")
    parser.add_argument("--rounds", type=int, required=True, help="training rounds per node")
    parser.add_argument("--task", default="digits", metavar="NAME|MODULE:FUNCTION",
                        help="a bundled task (default digits) or your factory, e.g. my_tasks:make_learner")
    parser.add_argument("--partition", choices=PARTITIONS, default="iid", help="data split (default iid)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    parser.add_argument("--byzantine", type=int, default=0, metavar="K", help="make the last K nodes attackers")
    parser.add_argument("--attack", help="attack run by the Byzantine nodes (e.g. alie)")
    parser.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of --attack, e.g. classes=5 (repeatable)")
    parser.add_argument("--rule", default=DEFAULT_RULE, help=f"aggregation rule (default {DEFAULT_RULE})")
    parser.add_argument("--out", type=Path, default=Path("runs/testnet"), help="output directory")
    parser.add_argument("--base-port", type=int, help="first TCP port (default: free ports)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="overall bound in seconds (default 600)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--codec", help="update codec of every node: raw, fp16, bf16, int8, topk (default raw)")
    parser.add_argument("--codec-k", type=float, help="topk: fraction of changes sent (default 0.1)")
    parser.add_argument("--reference", type=Path, metavar="FILE",
                        help="a reference set (p2pfl reference make) every node scores its neighbours on")
    parser.add_argument("--span-check", action="store_true",
                        help=f"every node also runs the opt-in span check ([harm_check] span_low = {SPAN_LOW}; "
                             "docs/DEFENCE.md section 3a)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="settings",
                        help=f"a key of every node's config, e.g. reputation.threshold=0.2 (repeatable; "
                             f"sections: {', '.join(SETTABLE)})")
    parser.add_argument(
        "--neighbours", type=int, help="target neighbours per node (default: min(N-1, 6): small networks mix best densely)"
    )
    parser.add_argument("--dp-epsilon", type=float, metavar="E",
                        help="honest nodes train with DP-SGD spending at most E (docs/PRIVACY.md)")
    parser.add_argument("--dashboard", type=int, metavar="PORT",
                        help="serve a live page of the whole network on http://127.0.0.1:PORT/ (0: any free port)")


def plan_from_args(args: argparse.Namespace) -> TestnetPlan:
    """Validate ``args`` into a plan; raise ConfigError naming the option to change."""
    plan = TestnetPlan(
        nodes=args.nodes, rounds=args.rounds, partition=args.partition, alpha=args.alpha,
        byzantine=args.byzantine, attack=args.attack, attack_params=parse_params(args.attack_param),
        rule=args.rule, out=Path(args.out).resolve(),
        base_port=args.base_port, seed=args.seed, timeout=args.timeout, epochs=args.epochs,
        batch_size=args.batch_size, neighbours=args.neighbours, task=args.task, dp_epsilon=args.dp_epsilon,
        dashboard=getattr(args, "dashboard", None),
        codec=args.codec, codec_k=args.codec_k,
        reference=None if args.reference is None else Path(args.reference).resolve(),
        span_check=args.span_check, verbose=args.verbose,
        settings=parse_settings(getattr(args, "settings", [])),
    )
    _check_names(plan)
    return plan


def parse_params(pairs: Sequence[str], option: str = "--attack-param",
                 form: str = "KEY=VALUE") -> tuple[tuple[str, TomlValue], ...]:
    """Parse ``KEY=VALUE`` options; a value is a TOML scalar (5, 0.5, true) or else a string."""
    params: dict[str, TomlValue] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        require(bool(sep and key), option, f"expected {form}, got {pair!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        params[key.strip()] = value if isinstance(value, bool | int | float | str) else raw
    return tuple(params.items())


def parse_settings(pairs: Sequence[str]) -> tuple[tuple[str, str, TomlValue], ...]:
    """Parse ``--set SECTION.KEY=VALUE`` options and check them as a node would."""
    if not pairs:
        return ()
    from p2pfl.assembly.toml import read_node_config

    tables: dict[str, dict[str, TomlValue]] = {}
    for name, value in parse_params(pairs, option="--set", form="SECTION.KEY=VALUE"):
        section, _, key = name.partition(".")
        require(bool(key), "--set", f"expected SECTION.KEY=VALUE, got {name!r}")
        require(section in SETTABLE, "--set", f"section {section!r} is not one of {', '.join(SETTABLE)}")
        tables.setdefault(section, {})[key] = value
    try:
        read_node_config(tables)
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None
    return tuple((section, key, value) for section, table in tables.items() for key, value in table.items())


def _check_names(plan: TestnetPlan) -> None:
    """Refuse unknown rules and attacks here, not in N node logs a few seconds later."""
    from p2pfl.attacks import ATTACKS, attack_label_map, make_attack
    from p2pfl.config import record_from_table
    from p2pfl.core.aggregation import RULES
    from p2pfl.learners.tasks import task_named

    try:
        options = task_named(plan.task).options  # a factory: imported here, once
        if options is not None:
            record_from_table(options, _task_options(plan), "[task]")
    except ConfigError as exc:
        raise ConfigError(f"--task: {exc}") from None

    require(plan.rule in RULES, "--rule", f"unknown rule {plan.rule!r}; choose one of {', '.join(sorted(RULES))}")
    if plan.attack:
        require(plan.attack in ATTACKS, "--attack",
                f"unknown attack {plan.attack!r}; choose one of {', '.join(sorted(ATTACKS))}")
        try:
            make_attack(plan.attack, **dict(plan.attack_params))
            attack_label_map(plan.attack, **dict(plan.attack_params))
        except ConfigError as exc:
            raise ConfigError(f"--attack-param: {exc}") from None


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


def node_config(plan: TestnetPlan, index: int, peer_ids: Sequence[str], ports: Sequence[int], *,
                reference: tuple[dict[str, TomlValue], int] | None = None) -> dict[str, Any]:
    """Return the TOML document of node ``index``; ``ports`` holds libp2p then HTTP ports.

    ``reference``: :func:`reference_tables` of ``plan.reference``, read once for all nodes
    (default: read here).
    """
    libp2p_port, http_port = ports[index], ports[plan.nodes + index]
    neighbours = plan.neighbours or min(plan.nodes - 1, 6)
    # Node i bootstraps from (i - 1) // 2 and i - 1: connected from the start, and no
    # node is everyone's bootstrap (node 0 was: it kept 9-15 neighbours at 16 nodes, paid
    # 2-3x a node's CPU per round and fell behind; docs/benchmarks/scale_session7.txt).
    seeds = sorted({(index - 1) // 2, index - 1}) if index else []
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
            **({"codec": plan.codec} if plan.codec else {}),
            **({"codec_k": float(plan.codec_k)} if plan.codec_k is not None else {}),
        },
        "task": {"factory" if ":" in plan.task else "name": plan.task, **_task_options(plan)},
        "train": {"node_index": index, "num_nodes": plan.nodes, "seed": plan.seed},
        "aggregation": {"rule": plan.rule},
        # Nodes start over several seconds (torch + libp2p imports); wait for the full
        # neighbourhood so that round 0 is trained together instead of alone.
        "round": {"local_epochs": plan.epochs, "min_neighbours": neighbours, "start_timeout": 60.0},
    }
    if plan.dp_epsilon is not None and not plan.is_byzantine(index):
        document["privacy"] = {"epsilon": float(plan.dp_epsilon)}  # for [node] rounds
    if plan.span_check:
        document["harm_check"] = {"span_low": SPAN_LOW}
    for section, key, value in plan.settings:
        document.setdefault(section, {})[key] = value
    if plan.reference is not None:
        document["reference"], holdout = reference or reference_tables(plan.reference)
        if holdout:  # a digits holdout: its samples leave every node's data
            document["task"]["holdout"] = holdout
    if plan.is_byzantine(index):
        from p2pfl.attacks import network_defaults

        defaults = network_defaults(str(plan.attack), plan.nodes, plan.byzantine)
        # An attack's parameters are keys of [attack] (the one table dumps_toml writes).
        document["attack"] = {"name": str(plan.attack), **defaults, **dict(plan.attack_params)}
    return document


def _task_options(plan: TestnetPlan) -> dict[str, TomlValue]:
    return {"partition": plan.partition, "alpha": float(plan.alpha), "batch_size": plan.batch_size}
def reference_tables(path: Path) -> tuple[dict[str, TomlValue], int]:
    """Return ``[reference]`` for ``path`` and the digits holdout it needs (0: not ours).

    A file made by ``p2pfl reference make --per-class N`` needs ``[task] holdout = N``
    so that its samples are in no node's training data.
    """
    import torch

    from p2pfl.learners.datasets import MAX_HOLDOUT, digits_reference
    from p2pfl.learners.reference import ReferenceSet, read_reference, sha256_of

    reference, digest = read_reference(path)
    counts = torch.bincount(reference.y)
    per_class = int(counts.min())
    held = digits_reference(per_class) if 0 < per_class <= MAX_HOLDOUT else None
    ours = held is not None and sha256_of(ReferenceSet(held.features, held.labels).encode()) == digest
    return {"path": str(path), "sha256": digest}, per_class if ours else 0


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
    reference = reference_tables(plan.reference) if plan.reference is not None else None
    paths = []
    for index in range(plan.nodes):
        path = plan.out / "configs" / f"node{index}.toml"
        path.write_text(dumps_toml(node_config(plan, index, peer_ids, ports, reference=reference)))
        paths.append(path)
    return peer_ids, ports, paths


def plan_meta(plan: TestnetPlan) -> dict[str, Any]:
    """Return the plan as JSON-able report metadata."""
    meta = asdict(plan)
    meta["out"] = str(plan.out)
    meta["network_id"] = NETWORK_ID
    return meta


__all__ = [
    "HOST",
    "NETWORK_ID",
    "TestnetPlan",
    "add_arguments",
    "dumps_toml",
    "node_config",
    "parse_params",
    "pick_ports",
    "plan_from_args",
    "plan_meta",
    "prepare_directory",
    "write_configs",
]
