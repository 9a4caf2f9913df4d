"""A public reference set: a small labelled sample a whole network agrees on, and scores on it.

A network may declare one (``[reference] path`` and ``sha256`` in every node's file); a
node then scores its neighbours' models on it class by class (:mod:`p2pfl.node.reference`).
The trust-model cost: the network must agree on a public validation set, fixed by its
hash, so a node refuses to start when the file is missing, malformed or hashes to
anything else.

File format: our own codec (:func:`p2pfl.core.codec.encode_state`, no pickle) of exactly
two tensors, ``x`` float32 ``(n, features)`` and ``y`` int64 ``(n,)`` with labels in
``[0, MAX_CLASSES)``; at most :data:`MAX_SAMPLES` samples and :data:`MAX_FILE_BYTES`.
``p2pfl reference make`` writes one from the digits samples held out of every split
(:func:`p2pfl.learners.datasets.digits_reference`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from p2pfl.config import Limits
from p2pfl.core.codec import decode_state, encode_state
from p2pfl.errors import ConfigError, DecodeError

MAX_SAMPLES = 10_000  # a reference set is small: every node scores every neighbour on it
MAX_FEATURES = 1 << 16
MAX_CLASSES = 1000
MAX_FILE_BYTES = 64 << 20
_LIMITS = Limits(max_payload_bytes=MAX_FILE_BYTES, max_tensors=2, max_ndim=2, max_name_bytes=8,
                 max_manifest_bytes=256)


@dataclass(frozen=True, slots=True)
class ReferenceSet:
    """Features ``x`` float32 ``(n, features)`` and labels ``y`` int64 ``(n,)``."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def num_classes(self) -> int:
        """One more than the largest label."""
        return int(self.y.max()) + 1

    def encode(self) -> bytes:
        """Return the file's bytes."""
        return encode_state({"x": self.x, "y": self.y})


def sha256_of(data: bytes) -> str:
    """Return the lowercase hex sha256 of ``data`` (what ``[reference] sha256`` holds)."""
    return hashlib.sha256(data).hexdigest()


def decode_reference(data: bytes) -> ReferenceSet:
    """Decode and check a reference file's bytes; DecodeError says what is wrong."""
    state = decode_state(data, limits=_LIMITS)
    if set(state) != {"x", "y"}:
        raise DecodeError(f"a reference set holds tensors 'x' and 'y', not {sorted(state)}")
    x, y = state["x"], state["y"]
    if x.dtype != torch.float32 or x.ndim != 2:
        raise DecodeError(f"x must be float32 (n, features), got {x.dtype} {tuple(x.shape)}")
    if y.dtype != torch.int64 or y.ndim != 1:
        raise DecodeError(f"y must be int64 (n,), got {y.dtype} {tuple(y.shape)}")
    n, features = x.shape
    if not (1 <= n <= MAX_SAMPLES and 1 <= features <= MAX_FEATURES and len(y) == n):
        raise DecodeError(f"need 1..{MAX_SAMPLES} samples of 1..{MAX_FEATURES} features and one "
                          f"label each, got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DecodeError("x holds NaN or infinite values")
    if int(y.min()) < 0 or int(y.max()) >= MAX_CLASSES:
        raise DecodeError(f"labels must be in [0, {MAX_CLASSES}), got {int(y.min())}..{int(y.max())}")
    return ReferenceSet(x, y)


def load_reference(path: Path, sha256: str) -> ReferenceSet:
    """Read the reference file at ``path``; ConfigError unless it exists, hashes to ``sha256``
    and decodes.
    """
    reference, actual = read_reference(path)
    if actual != sha256.lower():
        raise ConfigError(f"[reference] sha256: {path} hashes to {actual}, expected {sha256}")
    return reference


def read_reference(path: Path) -> tuple[ReferenceSet, str]:
    """Read the reference file at ``path`` once: return it decoded and its sha256 (hex).

    Raises:
        ConfigError: missing, unreadable, over the size cap, or not a reference set.
    """
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"[reference] path: {path} is {size} bytes, over {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"[reference] path: cannot read {path}: {exc.strerror}") from None
    try:
        return decode_reference(data), sha256_of(data)
    except DecodeError as exc:
        raise ConfigError(f"[reference] path: {path} is not a reference set: {exc}") from None


@dataclass(frozen=True, slots=True)
class ClassScores:
    """A model's mean loss and accuracy on each class of a reference set (NaN: no sample)."""

    loss: tuple[float, ...]
    accuracy: tuple[float, ...]


def class_scores(
    model: nn.Module, states: Iterable[Mapping[str, torch.Tensor]], reference: ReferenceSet
) -> list[ClassScores]:
    """Score each state (run in ``model`` by ``functional_call``) on ``reference``, per class.

    One forward pass per state; ``states`` may be a generator. ``model`` is not modified.
    """
    x, y = reference.x, reference.y
    classes = reference.num_classes
    counts = torch.bincount(y, minlength=classes).double()  # (classes,)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for state in states:
                logits = torch.func.functional_call(model, dict(state), (x,))  # (n, outputs)
                losses = nn.functional.cross_entropy(logits.double(), y, reduction="none")  # (n,)
                hits = (logits.argmax(dim=1) == y).double()  # (n,)
                loss = torch.zeros(classes, dtype=torch.float64).index_add_(0, y, losses) / counts
                accuracy = torch.zeros(classes, dtype=torch.float64).index_add_(0, y, hits) / counts
                out.append(ClassScores(tuple(loss.tolist()), tuple(accuracy.tolist())))
    finally:
        model.train(was_training)
    return out


__all__ = [
    "MAX_FILE_BYTES",
    "MAX_SAMPLES",
    "ClassScores",
    "ReferenceSet",
    "class_scores",
    "decode_reference",
    "load_reference",
    "read_reference",
    "sha256_of",
]
