"""`p2pfl` command line: keygen, node run/status, testnet, sim, reference.

The only place that reads argv and configures logging. Errors of the p2pfl tree are
printed as one line (what is wrong and what to change), exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from p2pfl.errors import P2PFLError


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from p2pfl.cli import reference, status, testnet, testnet_plan
    from p2pfl.sim import cli as sim_cli

    parser = argparse.ArgumentParser(prog="p2pfl", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
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
    run.set_defaults(func=_run_node)
    show = node_commands.add_parser("status", help="show a running node's status")
    status.add_arguments(show)
    show.set_defaults(func=status.status_command)

    net = commands.add_parser("testnet", help="launch a local test network of node processes")
    testnet_plan.add_arguments(net)
    net.set_defaults(func=testnet.testnet_command)

    ref = commands.add_parser("reference", help="make a public reference set (opt-in per network)")
    reference.add_arguments(ref)

    sim = commands.add_parser("sim", help="simulate many nodes in one process (attack/defence grids)")
    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.sim_command)
    return parser


def _run_node(args: argparse.Namespace) -> int:
    from p2pfl.cli.daemon import run_command

    return run_command(args)


def configure_logging(verbosity: int) -> None:
    """Log to stderr; libp2p's own chatter only at -vv."""
    level = logging.DEBUG if verbosity >= 2 else logging.INFO
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbosity < 2:
        for noisy in ("libp2p", "multiaddr", "async_service", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return int(args.func(args))
    except P2PFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
