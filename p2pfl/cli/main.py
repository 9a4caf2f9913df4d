"""`p2pfl` command line: keygen, node run/status, testnet, sim, export, reference.

The only place that reads argv and configures logging. Errors of the p2pfl tree are
printed as one line (what is wrong and what to change), exit code 2 -- also when trio
wraps them in exception groups, at any point of start-up. Exit code 3: no neighbour
connected within ``[round] start_timeout`` (:class:`~p2pfl.errors.NoNeighbours`).

Fast start: ``p2pfl --help``, ``keygen`` and ``node status`` import neither torch nor
libp2p (tests/cli/test_fast_cli.py); each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from p2pfl.errors import NoNeighbours, P2PFLError


def keygen_command(args: argparse.Namespace) -> int:
    """Write a new node key (PEM, mode 0600) and print its PeerId."""
    from p2pfl.core.crypto import Identity

    path = Path(args.out)
    if path.exists() and not args.force:
        print(f"error: {path} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if args.insecure_demo_seed is not None:
        # Public, reproducible keys so that example configs can name their bootstrap peer.
        secret = hashlib.sha256(f"p2pfl-demo-key/{args.insecure_demo_seed}".encode()).digest()
        identity = Identity.from_secret(secret)
    else:
        identity = Identity.generate()
    identity.save(path)
    print(identity.peer_id)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every sub-command (``sim``'s options only when ``command`` is sim)."""
    from p2pfl.cli import export, reference, status, testnet_plan

    parser = argparse.ArgumentParser(prog="p2pfl", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging: -v p2pfl's debug lines (each round's mixing), -vv libp2p's too"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="create a node key file")
    keygen.add_argument("--out", default="node.pem", help="key file to write (default node.pem)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.add_argument(
        "--insecure-demo-seed",
        type=int,
        metavar="N",
        help="derive a PUBLIC key from N (examples/configs only; anyone can impersonate it)",
    )
    keygen.set_defaults(func=keygen_command)

    node = commands.add_parser("node", help="run or inspect a node daemon")
    node_commands = node.add_subparsers(dest="node_command", required=True)
    run = node_commands.add_parser("run", help="run a node from a TOML config")
    run.add_argument(
        "--config",
        required=True,
        action="append",
        help="node TOML file (see examples/configs); repeat to run several nodes in one "
        "process (a test network's colluding sybils)",
    )
    run.set_defaults(func=_run_node, exit_at_once=True)
    show = node_commands.add_parser("status", help="show a running node's status")
    status.add_arguments(show)
    show.set_defaults(func=status.status_command)

    net = commands.add_parser("testnet", help="launch a local test network of node processes")
    testnet_plan.add_arguments(net)
    net.set_defaults(func=_later("p2pfl.cli.testnet", "testnet_command"))

    ref = commands.add_parser("reference", help="make a public reference set (opt-in per network)")
    reference.add_arguments(ref)

    sim = commands.add_parser("sim", help="simulate many nodes in one process (attack/defence grids)")
    if command == "sim":  # importing the simulator costs torch: only when it runs
        from p2pfl.sim import cli as sim_cli

        sim_cli.add_arguments(sim)
        sim.set_defaults(func=sim_cli.sim_command)

    out = commands.add_parser("export", help="write a node's model to a .safetensors file")
    export.add_arguments(out)
    out.set_defaults(func=export.export_command)
    return parser


def _later(module: str, name: str) -> Callable[[argparse.Namespace], Any]:
    """Return a command that imports ``module`` only when it runs."""

    def command(args: argparse.Namespace) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return command


def _command_of(argv: Sequence[str]) -> str | None:
    """Return the sub-command named in ``argv`` (the first word that is no option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _run_node(args: argparse.Namespace) -> int:
    from p2pfl.cli.daemon import run_command

    return run_command(args)


def configure_logging(verbosity: int) -> None:
    """Log to stderr: p2pfl's debug lines from -v, everybody's (libp2p's chatter) only at -vv."""
    logging.basicConfig(
        level=logging.DEBUG if verbosity >= 2 else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("p2pfl").setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)
    if verbosity < 2:
        for noisy in ("libp2p", "multiaddr", "async_service", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Failed dials and streams, as errors (some multi-line, once per attempt): p2pfl
        # logs its own one line per peer with the retry delay (net.discovery).
        # (An unreachable peer cost ~5 lines per second off loopback.)
        for chatty in ("libp2p.transport.tcp", "libp2p.host.basic_host", "libp2p.network.swarm",
                       "libp2p.protocol_muxer.multiselect_client"):
            logging.getLogger(chatty).setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code.

    Called as the process's entry (``argv`` None), a node daemon exits the moment its
    command returns (:func:`exit_at_once`): it has stopped in order by then.
    """
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    configure_logging(args.verbose)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    code = _command(args)
    if entry and getattr(args, "exit_at_once", False):
        exit_at_once(code)
    return code


def exit_at_once(code: int) -> NoReturn:
    """Flush the logs and standard streams, then end the process without finalising the
    interpreter.

    Finalising one with torch loaded costs ~0.7 CPU-seconds (measured: 2.15 vs 1.45 s of
    user time for an import and exit): 32 daemons stopping together on 2 cores spent more
    than their 10 s stop grace on it and were killed. A stopped daemon has nothing left
    to finalise: its checkpoint is on disk and its connections are closed.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _command(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except BaseException as exc:
        error, rest = split_errors(exc)
        if error is None:
            raise
        if isinstance(error, P2PFLError):
            print(f"error: {error}", file=sys.stderr)
        if rest is not None:  # a bug beside it: its traceback, not silence
            raise rest from None
        if isinstance(error, KeyboardInterrupt):
            return 130
        return 3 if isinstance(error, NoNeighbours) else 2


def split_errors(error: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """Return the first P2PFLError (or KeyboardInterrupt) inside nested exception groups,
    and everything else (None if nothing else).

    Trio nurseries wrap a failing task's error in groups, which print as 40-150 lines of
    traceback; the one line inside is what the user needs. Any other exception is a bug:
    it comes back (in its groups) to be raised, even beside one of ours.
    """
    ours = (P2PFLError, KeyboardInterrupt)
    if not isinstance(error, BaseExceptionGroup):
        return (error, None) if isinstance(error, ours) else (None, error)
    matched, rest = error.split(ours)
    if matched is None:
        return None, error  # as raised, tracebacks and all
    return _first_leaf(matched), rest


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
