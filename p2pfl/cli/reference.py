"""`p2pfl reference make`: write a public reference set from the digits held out of every split."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pfl.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``reference`` sub-commands to ``parser``."""
    commands = parser.add_subparsers(dest="reference_command", required=True)
    make = commands.add_parser("make", help="write a reference set file and print its sha256")
    make.add_argument("--per-class", type=int, default=20, metavar="N",
                      help="samples per class (default 20); give nodes [task] holdout = N")
    make.add_argument("--out", required=True, help="file to write (e.g. ref.cbor)")
    make.add_argument("--force", action="store_true", help="overwrite an existing file")
    make.set_defaults(func=make_command)


def make_command(args: argparse.Namespace) -> int:
    """Write the digits samples held out with ``[task] holdout = N``; print the sha256."""
    from p2pfl.learners.datasets import MAX_HOLDOUT, digits_reference
    from p2pfl.learners.reference import ReferenceSet, sha256_of

    if not 1 <= args.per_class <= MAX_HOLDOUT:  # beyond it nodes could not hold the samples out
        raise ConfigError(f"--per-class: must be in [1, {MAX_HOLDOUT}], got {args.per_class}")
    path = Path(args.out)
    if path.exists() and not args.force:
        raise ConfigError(f"--out: {path} exists; pass --force to overwrite it")
    held = digits_reference(args.per_class)
    data = ReferenceSet(held.features.contiguous(), held.labels.contiguous()).encode()
    path.write_bytes(data)
    print(sha256_of(data))
    return 0


__all__ = ["add_arguments", "make_command"]
