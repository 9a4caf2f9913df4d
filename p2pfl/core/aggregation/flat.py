"""Models as flat vectors: every floating-point tensor of a state, concatenated in key order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from p2pfl.core.state import State
from p2pfl.errors import AggregationError

Model = Mapping[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class FlatSpec:
    """Where each floating-point tensor of a state lives in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    size: int

    def slices(self) -> list[tuple[str, slice]]:
        """Return each floating tensor's name and its slice of the vector."""
        ends = (*self.offsets[1:], self.size)
        return [(n, slice(a, b)) for n, a, b in zip(self.names, self.offsets, ends, strict=True)]


def flat_spec(state: Model) -> FlatSpec:
    """Describe the floating-point tensors of ``state`` in key order."""
    names, shapes, dtypes, offsets, size = [], [], [], [], 0
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise AggregationError(f"{name!r}: not a tensor ({type(tensor).__name__})")
        if tensor.is_floating_point():
            names.append(name)
            shapes.append(tensor.shape)
            dtypes.append(tensor.dtype)
            offsets.append(size)
            size += tensor.numel()
    return FlatSpec(tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets), size)


def compute_dtype(spec: FlatSpec) -> torch.dtype:
    return torch.float64 if torch.float64 in spec.dtypes else torch.float32


def flatten(state: Model, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, FlatSpec]:
    """Concatenate the floating-point tensors of ``state`` into one new 1-D vector."""
    spec = flat_spec(state)
    vector = torch.empty(spec.size, dtype=dtype or compute_dtype(spec))
    fill_row(vector, state, spec)
    return vector, spec


def fill_row(out: torch.Tensor, state: Model, spec: FlatSpec) -> None:
    for name, where in spec.slices():
        out[where].copy_(state[name].reshape(-1))


def unflatten(vector: torch.Tensor, spec: FlatSpec, like: Model) -> State:
    """Rebuild a state: floating tensors from ``vector``, all others copied from ``like``."""
    floating = set(spec.names)
    state = {name: t if name in floating else t.clone() for name, t in like.items()}
    for (name, where), shape, dtype in zip(spec.slices(), spec.shapes, spec.dtypes, strict=True):
        state[name] = vector[where].to(dtype).reshape(shape).clone()
    return state


__all__ = ["FlatSpec", "Model", "compute_dtype", "fill_row", "flat_spec", "flatten", "unflatten"]
