"""Models as flat vectors: every floating-point tensor of a state, concatenated in key order."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
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


# Bytes of one block of columns over all the rows: what a rule works on at a time instead
# of every model as one (n+1, d) matrix (issue 12: 100 MB models, ~5 copies for a mean).
# Measured with benchmarks/bench_memory.py (100 MB model, clipped_gossip of 2): peak 1.26
# models at 2 MiB, 1.54 at 4, 1.78 at 8 (freed blocks the allocator keeps), and with one
# thread no slower than the whole matrix was.
BLOCK_BYTES = 2 * 2**20


def column_blocks(
    models: Sequence[Model], spec: FlatSpec, dtype: torch.dtype, keep: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(where, rows)`` over the flat vectors of ``models``, a block of columns at a time.

    ``rows`` is a new (len(models), b) tensor of ``dtype`` holding columns ``where``;
    rows whose ``keep`` flag is False are zero. Blocks hold about :data:`BLOCK_BYTES`.
    """
    width = max(1, BLOCK_BYTES // (max(1, len(models)) * dtype.itemsize))
    ends = (*spec.offsets[1:], spec.size)
    # Views of contiguous tensors; a non-contiguous one is copied once here, not per block.
    flats = [[state[name].reshape(-1) for name in spec.names] for state in models]
    for start in range(0, spec.size, width):
        stop = min(start + width, spec.size)
        rows = torch.empty(len(models), stop - start, dtype=dtype)
        # Only the tensors overlapping [start, stop): a model of many tensors in many
        # blocks would otherwise cost blocks x tensors Python steps per pass.
        index = max(0, bisect.bisect_right(spec.offsets, start) - 1)
        while index < len(ends) and spec.offsets[index] < stop:
            first, end = spec.offsets[index], ends[index]
            low, high = max(start, first), min(stop, end)
            if low < high:
                for row, flat in zip(rows, flats, strict=True):
                    row[low - start : high - start].copy_(flat[index][low - first : high - first])
            index += 1
        if keep is not None:
            rows[~keep] = 0
        yield slice(start, stop), rows


def unflatten(vector: torch.Tensor, spec: FlatSpec, like: Model) -> State:
    """Rebuild a state: floating tensors from ``vector``, all others copied from ``like``.

    A tensor of ``vector``'s dtype is a view of it (no second copy of the model); others
    are converted copies.
    """
    floating = set(spec.names)
    state = {name: t if name in floating else t.clone() for name, t in like.items()}
    for (name, where), shape, dtype in zip(spec.slices(), spec.shapes, spec.dtypes, strict=True):
        state[name] = vector[where].to(dtype).reshape(shape)
    return state


__all__ = [
    "BLOCK_BYTES", "FlatSpec", "Model", "column_blocks", "compute_dtype", "fill_row", "flat_spec",
    "flatten", "unflatten",
]
