"""Where a node's model and batches live: ``[train] device``.

``auto`` picks a CUDA GPU when torch sees one, then Apple's MPS, else the CPU. What goes
on the wire and into checkpoints is always on the CPU (the learner copies it there), so
CPU and GPU nodes mix in one network.
"""

from __future__ import annotations

import re

import torch

from p2pfl.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str) -> str:
    """Return the torch device ``name`` means here (``auto`` resolved); ConfigError if absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if name == "cpu":
        return name
    if name == "mps":
        _require(_mps_available(), name, "torch sees no Apple MPS device")
        return name
    match = _CUDA.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(f"[train] device: unknown device {name!r}; choose one of {' | '.join(DEVICES)}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _require(count > 0, name, "torch sees no CUDA GPU (a CPU-only torch, or no driver)")
    index = int(match.group(1) or 0)
    _require(index < count, name, f"torch sees {count} CUDA GPU(s): cuda:0..cuda:{count - 1}")
    return name


def _require(condition: bool, name: str, why: str) -> None:
    if not condition:
        raise ConfigError(f"[train] device: {name!r} but {why}; use device = \"cpu\" or \"auto\"")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


__all__ = ["DEVICES", "resolve_device"]
