"""What a state is, and does it fit a model? One check for the aggregation, the learner and the node.

A state is ``name -> tensor``. It fits a reference (a state, or a template of shapes and
dtypes) when it has exactly the reference's keys and, per key, a tensor of the same
shape and dtype; ``cast_floats`` accepts any floating dtype where the reference has one
(the learner casts on load). Each caller raises its own error with the description.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]
"""Named tensors: a model's parameters and buffers (or a checkpoint's). The one definition."""

Template = Mapping[str, tuple[torch.Size, torch.dtype]]


def template_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Return the shapes and dtypes of ``state``: what other states must match."""
    return {name: (tensor.shape, tensor.dtype) for name, tensor in state.items()}


def mismatch(reference: Template, state: Mapping[str, object], *, cast_floats: bool = False) -> str | None:
    """Describe the first way ``state`` does not fit ``reference``; None if it fits."""
    if missing := sorted(reference.keys() - state.keys()):
        return f"missing key {missing[0]!r}"
    if extra := sorted(state.keys() - reference.keys()):
        return f"unexpected (extra) key {extra[0]!r}"
    for name, (shape, dtype) in reference.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            return f"{name!r} is not a tensor ({type(value).__name__})"
        if value.shape != shape:
            return f"{name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        floats = value.dtype.is_floating_point and dtype.is_floating_point
        if value.dtype != dtype and not (cast_floats and floats):
            return f"{name!r} has dtype {value.dtype}, expected {dtype}"
    return None


def nonfinite(state: Mapping[str, torch.Tensor]) -> str | None:
    """Return the first floating tensor's name holding NaN or infinite values, if any."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


__all__ = ["State", "Template", "mismatch", "nonfinite", "template_of"]
