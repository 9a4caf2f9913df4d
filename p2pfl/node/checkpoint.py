"""Atomic checkpoints: a node killed at any instant resumes from its last finished round.

File layout: one canonical-CBOR map ``{"v": 1, "round": next round, "reputation": book
record, "peers": [...], "history": [[round, accuracy, loss, used, duration, bytes_in,
bytes_out], ...], "state": <encode_state bytes of the learner's checkpoint_state()>}``.
Written to a temporary file, fsynced, renamed over the old one, directory fsynced.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import cbor2
import torch

from p2pfl.config import Limits
from p2pfl.core.codec import decode_state, encode_state
from p2pfl.errors import DecodeError
from p2pfl.learners.base import Learner
from p2pfl.node.standing import Standing
from p2pfl.node.stats import RoundRecord

FILE_NAME = "checkpoint.cbor"
VERSION = 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a node needs to resume."""

    round: int  # the next round to run
    learner_state: Mapping[str, torch.Tensor]
    reputation: Mapping[str, Any]
    peers: tuple[str, ...]
    history: tuple[RoundRecord, ...]


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically into ``directory`` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "v": VERSION,
        "round": checkpoint.round,
        "reputation": dict(checkpoint.reputation),
        "peers": list(checkpoint.peers),
        "history": [list(astuple(entry)) for entry in checkpoint.history],
        "state": encode_state(checkpoint.learner_state),
    }
    path = directory / FILE_NAME
    temp = directory / (FILE_NAME + ".tmp")
    with open(temp, "wb") as handle:
        cbor2.dump(record, handle, canonical=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_directory(directory)
    return path


def load_checkpoint(directory: Path, *, limits: Limits) -> Checkpoint | None:
    """Read the checkpoint in ``directory``; None when there is none yet."""
    path = directory / FILE_NAME
    if not path.exists():
        return None
    try:
        record = cbor2.loads(path.read_bytes())
        return Checkpoint(
            round=_int(record["round"]),
            learner_state=decode_state(record["state"], limits=limits),
            reputation=dict(record["reputation"]),
            peers=tuple(str(peer) for peer in record["peers"]),
            history=tuple(RoundRecord(*entry) for entry in record["history"]),
        )
    except DecodeError as exc:
        raise DecodeError(f"checkpoint {path} is corrupt: {exc}") from exc
    except Exception as exc:  # cbor2 and field errors: name the file, keep the cause
        raise DecodeError(
            f"checkpoint {path} is corrupt ({exc!r}); move it away to start fresh"
        ) from exc


def resume(
    directory: Path, limits: Limits, learner: Learner, standing: Standing
) -> tuple[int, list[RoundRecord]] | None:
    """Restore ``learner`` and ``standing`` from the checkpoint in ``directory``.

    Return the round to run next and the history, or None when there is no checkpoint.
    """
    checkpoint = load_checkpoint(directory, limits=limits)
    if checkpoint is None:
        return None
    learner.restore_checkpoint_state(checkpoint.learner_state)
    standing.restore(checkpoint.reputation)
    return checkpoint.round, list(checkpoint.history)


def snapshot(
    next_round: int, learner: Learner, standing: Standing, peers: Sequence[str],
    history: Sequence[RoundRecord],
) -> Checkpoint:
    """Return what a node must keep to resume at ``next_round``."""
    return Checkpoint(
        round=next_round, learner_state=learner.checkpoint_state(),
        reputation=standing.book.to_record(), peers=tuple(peers), history=tuple(history),
    )


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DecodeError(f"expected a round number, got {value!r}")
    return value


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
