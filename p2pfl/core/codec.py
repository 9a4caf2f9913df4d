"""Encode a model state (name -> tensor) to bytes and back, without pickle; the codec registry.

The signed update header names the payload's codec (its ``codec`` field). :data:`CODECS`
maps that name to a :class:`Codec`; a header naming any other codec is refused when it is
parsed (:class:`~p2pfl.errors.UnknownCodec`), and :func:`decode_payload` dispatches on the
name: ``raw`` (the layout below) and the lossy ``fp16``, ``bf16``, ``int8`` and ``topk``
of :mod:`.lossy`, which frame their parts with it. A new codec (fp16, int8, top-k)
registers a :class:`Codec` whose ``decode`` keeps the contract of :func:`decode_state`:
every size checked against :class:`~p2pfl.config.Limits` before allocating, tensors
out that are fresh or read-only views of immutable input (see :func:`view_state`),
:class:`~p2pfl.errors.DecodeError` and nothing else on bad input
(``tests/core/test_codec_hostile.py`` fuzzes every registered codec).

The ``raw`` codec
-----------------

Byte layout, version 1 (all integers little-endian)::

    offset  size  field
    0       4     magic  b"P2FT"
    4       1     version  0x01
    5       4     M: manifest length in bytes (uint32)
    9       M     manifest: canonical CBOR  [[name, dtype, shape], ...]
    9+M     D     tensor data: each tensor's raw little-endian bytes, row-major (C order),
                  concatenated in manifest order with no padding; D is exactly
                  sum(numel * itemsize) over the manifest, nothing may follow it.

Manifest rules (the decoder enforces every one; it parses this CBOR subset itself):

- an array of entries; each entry an array of exactly three items:
  ``name`` (text string, valid UTF-8), ``dtype`` (text string from the allow-list
  float32, float16, bfloat16, float64, int8, int16, int32, int64, uint8, bool; bool is
  one byte, 0 or 1) and ``shape`` (array of unsigned integers, ``[]`` for a 0-d tensor);
- entries sorted by name (code point order, which equals UTF-8 byte order), names
  unique; so the encoding is canonical: a state has exactly one encoding whatever
  its key order, and decoding returns the keys in sorted order;
- canonical CBOR only: definite lengths, shortest-form heads; no tags, maps, byte
  strings, negative integers, floats, booleans, null or other simple values;
- the product of the non-zero dimensions is at most ``max_payload_bytes`` (an empty
  tensor cannot declare an absurd shape).

Decoding checks every field and size against :class:`~p2pfl.config.Limits` before
allocating and raises :class:`~p2pfl.errors.DecodeError` naming the problem for any
malformed input; nothing else escapes. :func:`decode_state` copies each tensor exactly
once out of the input (outputs never alias it). The registered ``raw`` codec decodes with
:func:`view_state` instead: the same checks, but on a little-endian host the tensors of an
immutable ``bytes`` input are views of it, no copy (a node keeps a pulled payload to
serve it anyway, so a copy would hold the model twice). Nobody may write into a decoded
tensor: the aggregation rules, the harm check and the attacks only read their inputs
(``tests/node/test_node_memory.py`` checks that a served payload's sha256 survives rounds). Encoding copies each tensor once into the output (plus one
copy for non-contiguous inputs); tensors are detached and must be on the CPU.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import cbor2
import numpy as np
import torch

from p2pfl.config import Limits
from p2pfl.core.cbor import StrictReader
from p2pfl.core.state import State
from p2pfl.errors import DecodeError, UnknownCodec

MAGIC = b"P2FT"
VERSION = 1
_PREFIX_BYTES = len(MAGIC) + 1 + 4

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_DTYPE_NAME_BYTES = 16

# The wire is little-endian; on a big-endian host every element's bytes are reversed
# on the way out and on the way in.
_BIG_ENDIAN_HOST = sys.byteorder == "big"

_DEFAULT_LIMITS = Limits()

# view_state hands torch an immutable buffer on purpose (see the module docstring); torch
# says once per process that it cannot mark tensors read-only.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


# ---------------------------------------------------------------- encode


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Encode ``state`` into the canonical byte layout described in the module docstring.

    Raises:
        TypeError: a key is not a str or a value is not a tensor (a caller bug).
        ValueError: a tensor's dtype is not in the allow-list, or it is not a dense CPU tensor.
    """
    entries = sorted(_checked_entries(state), key=lambda entry: entry[0])
    manifest = cbor2.dumps(
        [[name, _DTYPE_NAMES[t.dtype], list(t.shape)] for name, t in entries], canonical=True
    )
    prefix = MAGIC + bytes([VERSION]) + len(manifest).to_bytes(4, "little")
    # join() allocates the result once and copies each zero-copy tensor view into it.
    return b"".join([prefix, manifest, *(_wire_bytes(t) for _, t in entries)])


def _checked_entries(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Return ``state``'s items after checking keys, types, dtypes and devices."""
    entries = []
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state key {name!r} is not a str")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"state[{name!r}] has dtype {tensor.dtype}, not in the allow-list")
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            raise ValueError(f"state[{name!r}] must be a dense CPU tensor")
        entries.append((name, tensor))
    return entries


def _wire_bytes(tensor: torch.Tensor) -> memoryview:
    """Return a little-endian uint8 view of ``tensor``'s elements in C order (no copy if contiguous)."""
    # reshape copies only when the input is not contiguous (transposed, strided slice).
    flat = tensor.detach().resolve_neg().reshape(-1).view(torch.uint8)
    if _BIG_ENDIAN_HOST and tensor.element_size() > 1:
        flat = swap_bytes(flat, tensor.element_size())
    return flat.numpy().data


def swap_bytes(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Reverse the byte order of every ``itemsize``-byte element of a flat uint8 tensor."""
    return raw.view(-1, itemsize).flip(1).reshape(-1)  # (numel, itemsize) -> flat


# ---------------------------------------------------------------- decode


def decode_state(
    data: bytes | bytearray | memoryview, *, limits: Limits = _DEFAULT_LIMITS
) -> State:
    """Decode bytes made by :func:`encode_state` into fresh CPU tensors, name-sorted.

    Raises:
        DecodeError: ``data`` is not a valid encoding within ``limits``; the message
            names the problem.
    """
    return _decode_state(data, limits, share=False)


def view_state(data: bytes | bytearray | memoryview, *, limits: Limits = _DEFAULT_LIMITS) -> State:
    """Decode like :func:`decode_state`, but into views of ``data`` where that is safe.

    Views only when ``data`` is ``bytes`` (nobody can change it under the tensors) and
    the host is little-endian; fresh tensors otherwise. The caller must not write into
    the tensors: they are the very bytes a node serves to others.

    Raises:
        DecodeError: as :func:`decode_state`.
    """
    return _decode_state(data, limits, share=isinstance(data, bytes) and not _BIG_ENDIAN_HOST)


def _decode_state(data: bytes | bytearray | memoryview, limits: Limits, *, share: bool) -> State:
    view = _byte_view(data)
    if len(view) > limits.max_payload_bytes:
        raise DecodeError(f"payload too large: {len(view)} > {limits.max_payload_bytes} bytes")
    manifest_end = _check_prefix(view, limits)
    entries = parse_manifest(bytes(view[_PREFIX_BYTES:manifest_end]), limits)
    data_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in entries)
    available = len(view) - manifest_end
    if available < data_bytes:
        raise DecodeError(f"truncated tensor data: {available} of {data_bytes} bytes")
    if available > data_bytes:
        raise DecodeError(f"trailing bytes: {available - data_bytes} after the tensor data")
    state: State = {}
    offset = manifest_end
    build = _view_tensor if share else _build_tensor
    for name, dtype, shape in entries:
        state[name] = build(view, offset, dtype, shape)
        offset += _nbytes(dtype, shape)
    return state


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """Return ``data`` as a flat memoryview of bytes."""
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"input is not a contiguous bytes-like object: {exc}") from None


def _check_prefix(view: memoryview, limits: Limits) -> int:
    """Check magic, version and manifest length; return the offset where the manifest ends."""
    if len(view) == 0:
        raise DecodeError("empty input")
    if not MAGIC.startswith(view[: len(MAGIC)]):
        raise DecodeError(f"bad magic {bytes(view[: len(MAGIC)])!r}, expected {MAGIC!r}")
    if len(view) < _PREFIX_BYTES:
        raise DecodeError(f"truncated prefix: {len(view)} < {_PREFIX_BYTES} bytes")
    if view[len(MAGIC)] != VERSION:
        raise DecodeError(f"unsupported codec version {view[len(MAGIC)]}, expected {VERSION}")
    manifest_bytes = int.from_bytes(view[len(MAGIC) + 1 : _PREFIX_BYTES], "little")
    if manifest_bytes > limits.max_manifest_bytes:
        raise DecodeError(
            f"manifest too large: {manifest_bytes} > {limits.max_manifest_bytes} bytes"
        )
    if _PREFIX_BYTES + manifest_bytes > len(view):
        raise DecodeError(f"truncated manifest: declares {manifest_bytes} bytes")
    return _PREFIX_BYTES + manifest_bytes


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


def _build_tensor(
    view: memoryview, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """Copy one tensor's bytes out of ``view`` into a new tensor of ``shape``."""
    nbytes = _nbytes(dtype, shape)
    flat = torch.empty(nbytes // dtype.itemsize, dtype=dtype)
    if nbytes:
        raw = flat.view(torch.uint8)
        # numpy reads from read-only buffers without copying; torch.frombuffer would warn.
        raw.numpy()[:] = np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=offset)
        if _BIG_ENDIAN_HOST and dtype.itemsize > 1:
            raw.copy_(swap_bytes(raw, dtype.itemsize))
        if dtype == torch.bool and bool((raw > 1).any()):
            raise DecodeError("invalid bool tensor data: bytes other than 0 and 1")
    return flat.reshape(shape)


def _view_tensor(
    view: memoryview, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """Return one tensor of ``shape`` over ``view``'s bytes (little-endian host only)."""
    nbytes = _nbytes(dtype, shape)
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    # Any offset: torch's CPU kernels load unaligned (tests/core/test_codec.py checks).
    flat = torch.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
    if dtype == torch.bool and bool((flat.view(torch.uint8) > 1).any()):
        raise DecodeError("invalid bool tensor data: bytes other than 0 and 1")
    return flat.reshape(shape)


# ---------------------------------------------------------------- manifest

Entry = tuple[str, torch.dtype, tuple[int, ...]]

def parse_manifest(manifest: bytes, limits: Limits = _DEFAULT_LIMITS) -> list[Entry]:
    """Parse and check a manifest (the strict canonical CBOR subset in the module docstring)."""
    reader = StrictReader(manifest, "manifest")
    count = reader.array("manifest", limits.max_tensors, "tensors")
    entries: list[Entry] = []
    for _ in range(count):
        entries.append(_parse_entry(reader, limits))
        if len(entries) > 1 and entries[-1][0] <= entries[-2][0]:
            problem = "duplicate" if entries[-1][0] == entries[-2][0] else "unsorted"
            raise DecodeError(f"manifest: {problem} tensor name {entries[-1][0]!r}")
    reader.finish()
    return entries


def _parse_entry(reader: StrictReader, limits: Limits) -> Entry:
    if (fields := reader.array("manifest entry", 3, "fields")) != 3:
        raise DecodeError(f"manifest entry: expected 3 fields, found {fields}")
    name = reader.text("tensor name", limits.max_name_bytes)
    dtype_name = reader.text("dtype", _MAX_DTYPE_NAME_BYTES)
    if dtype_name not in DTYPES:
        raise DecodeError(f"manifest: unknown dtype {dtype_name!r} for {name!r}")
    ndim = reader.array("shape", limits.max_ndim, "dimensions")
    shape = tuple(reader.uint("dimension") for _ in range(ndim))
    nonzero_product = 1
    for dim in shape:
        nonzero_product *= max(dim, 1)
        if nonzero_product > limits.max_payload_bytes:
            raise DecodeError(f"manifest: shape {shape} of {name!r} is too large")
    return name, DTYPES[dtype_name], shape


# ---------------------------------------------------------------- registry

Encoder = Callable[[Mapping[str, torch.Tensor]], bytes]
Decoder = Callable[..., State]  # (data, *, limits: Limits) -> State


@dataclass(frozen=True, slots=True)
class Codec:
    """A payload encoding, registered under the name the signed header carries."""

    name: str
    encode: Encoder  # state -> bytes
    # (bytes, *, limits) -> CPU tensors, which may be views of immutable ``bytes`` input
    # (never to be written into); DecodeError on bad input
    decode: Decoder
    delta: bool = False  # decode also takes base=(payload digest -> model or None)


CODECS: dict[str, Codec] = {}
DEFAULT_CODEC = "raw"


def register_codec(codec: Codec) -> Codec:
    """Add ``codec`` to :data:`CODECS` (a name is registered once)."""
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is already registered")
    CODECS[codec.name] = codec
    return codec


def codec_named(name: str) -> Codec:
    """Return the registered codec ``name``.

    Raises:
        UnknownCodec: no codec of that name (the message names it and the known ones).
    """
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(CODECS))
        raise UnknownCodec(f"unknown codec {str(name)[:32]!r}; this node decodes {known}") from None


def decode_payload(
    codec: str,
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits = _DEFAULT_LIMITS,
    base: Callable[[bytes], Mapping[str, torch.Tensor] | None] | None = None,
) -> State:
    """Decode ``data`` with the codec its header names.

    ``base`` resolves the payload digest a delta codec names to the model it was taken
    against (the sender's previous update, as this node reconstructed it).

    Raises:
        UnknownCodec: ``codec`` is not registered.
        MissingBase: a delta against a model ``base`` does not know.
        DecodeError: ``data`` is not a valid encoding within ``limits``.
    """
    found = codec_named(codec)
    if found.delta:
        return found.decode(data, limits=limits, base=base)
    return found.decode(data, limits=limits)


RAW = register_codec(Codec("raw", encode_state, view_state))

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "DTYPES",
    "MAGIC",
    "RAW",
    "VERSION",
    "Codec",
    "State",
    "codec_named",
    "decode_payload",
    "decode_state",
    "encode_state",
    "parse_manifest",
    "register_codec",
    "view_state",
]
