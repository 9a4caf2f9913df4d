"""Lossy update codecs: ``fp16``, ``bf16``, ``int8`` and ``topk``, registered in :data:`.codec.CODECS`.

Every one of them frames its payload with the ``raw`` layout (:func:`.codec.encode_state`),
whose hardened decoder parses it first; the parts of a model tensor ``name`` travel as
tensors named ``name#<part>``, and tensors without a part (integer buffers such as a
batch-norm counter) travel as they are::

    fp16   name#h  float16                       -> float32
    bf16   name#b  bfloat16                      -> float32
    int8   name#q  int8 (the tensor's shape)     -> float32 q * scale
           name#s  float32 [1] (per tensor) or [shape[0]] (per channel, along dim 0)
    topk   full:   name#q, name#s as int8 above (per channel), other tensors as they are
           delta:  #base uint8 [32]   sha256 of the sender's previous payload
                   #i    uint8  the positions of the changes among the base's F
                         floating elements (its floating tensors concatenated in name
                         order, each row-major), Rice-coded: byte 0 is the parameter
                         b <= 24; then the low b bits of every gap (positions skipped
                         before each change), least significant first, packed 8 to a
                         byte, bit i of byte j is bit 8 j + i, zero-padded; then every
                         gap >> b in unary (that many 0 bits, then a 1), packed and
                         zero-padded the same way
                   #q    int8 [changes]  the changes, in position order
                   #s    float32 [floating tensors]  one scale per tensor, finite
                   other (non-floating) tensors as they are
                   -> base[name] + q * s[name] at the positions
           version 1 (still decoded; sent by nodes before the packed delta):
           full = the raw model; delta = #base + per tensor name#m (its own bitmask) and
           name#v float16 [popcount]

Floating tensors (float32, float64, float16, bfloat16) are the lossy ones; they decode to
float32. Decoders check every part against the others (shapes, counts, padding) and
against :class:`~p2pfl.config.Limits`, allocate nothing larger than the dequantised model,
and raise :class:`~p2pfl.errors.DecodeError` (or its subclass
:class:`~p2pfl.errors.MissingBase`) on anything else.

``topk`` deltas are taken against a *base* that sender and receiver share: the model the
receivers reconstructed from the sender's previous payload, so everything not sent —
the changes left out and the int8 rounding of those sent, or of the full model — stays
in the next difference (error feedback). The packed delta costs ~5 bits per position
(at k = 10%, gaps average 9) and 1 byte per change sent: about 0.05 of raw's 4 bytes
per element.
Nodes before version 2 refuse version 2 payloads as malformed: upgrade a network together.
A receiver that does not hold the base refuses the payload with ``MissingBase`` — not the
sender's fault, not evidence; the sending side (:mod:`p2pfl.node.encoding`) sends the full model whenever
a neighbour did not pull the base, and every ``full_every`` rounds anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from p2pfl.config import Limits
from p2pfl.core.codec import Codec, decode_state, encode_state, register_codec
from p2pfl.core.state import State
from p2pfl.errors import DecodeError, MissingBase

BaseLookup = Callable[[bytes], Mapping[str, torch.Tensor] | None]  # payload digest -> model
BASE = "#base"
POSITIONS, VALUES, SCALES = "#i", "#q", "#s"  # a packed topk delta's parts
_MAX_SHIFT = 24  # Rice parameter: gaps up to 2**24 elements cost one unary bit
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DEFAULT_LIMITS = Limits()
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _is_float(tensor: torch.Tensor) -> bool:
    return tensor.dtype in _FLOATS


def _split(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``name#part`` tensors by name (part "" for plain tensors); refuse clashes."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, sep, part = key.rpartition("#")
        if not sep:
            name, part = key, ""
        group = groups.setdefault(name, {})
        if "" in group or (part == "" and group):  # a plain tensor has no parts
            raise DecodeError(f"payload: tensor {name[:64]!r} is sent twice")
        group[part] = tensor
    return groups


def _checked(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Refuse model tensor names with ``#`` (it separates a name from its part)."""
    for key in state:
        if "#" in key:
            raise ValueError(f"tensor name {key!r} contains '#', which lossy codecs reserve")
    return state


# ---------------------------------------------------------------- fp16 / bf16


def _cast_codec(name: str, part: str, dtype: torch.dtype) -> Codec:
    def encode(state: Mapping[str, torch.Tensor]) -> bytes:
        return encode_state({
            (f"{key}#{part}" if _is_float(t) else key): (t.detach().to(dtype) if _is_float(t) else t)
            for key, t in _checked(state).items()
        })

    def decode(data: bytes | bytearray | memoryview, *, limits: Limits = _DEFAULT_LIMITS) -> State:
        out: State = {}
        for key, parts in _split(decode_state(data, limits=limits)).items():
            out[key] = parts[""] if "" in parts else _one_part(key, parts, part, dtype).float()
        return out

    return Codec(name, encode, decode)


def _one_part(key: str, parts: Mapping[str, torch.Tensor], part: str, dtype: torch.dtype) -> torch.Tensor:
    if set(parts) != {part} or parts[part].dtype != dtype:
        raise DecodeError(f"payload: {key[:64]!r} must be one {dtype} tensor #{part}")
    return parts[part]


# ---------------------------------------------------------------- int8


def quantize_int8(tensor: torch.Tensor, *, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int8 q, float32 scale) with ``q * scale`` ~ ``tensor`` (symmetric, round to nearest)."""
    values = tensor.detach().float()
    if per_channel and values.dim() >= 1 and values.shape[0] > 0:
        peak = values.abs().reshape(values.shape[0], -1).amax(dim=1)  # (channels,)
        shape = (values.shape[0],) + (1,) * (values.dim() - 1)
    else:
        peak = values.abs().amax().reshape(1) if values.numel() else torch.zeros(1)
        shape = (1,) * values.dim()
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    q = torch.round(values / scale.reshape(shape)).clamp(-127, 127).to(torch.int8)
    return q, scale


def encode_int8(state: Mapping[str, torch.Tensor], *, per_channel: bool = True) -> bytes:
    """Encode ``state`` with int8 values and float32 scales (per output channel by default)."""
    parts: dict[str, torch.Tensor] = {}
    for key, tensor in _checked(state).items():
        if not _is_float(tensor):
            parts[key] = tensor
            continue
        parts[f"{key}#q"], parts[f"{key}#s"] = quantize_int8(tensor, per_channel=per_channel)
    return encode_state(parts)


def decode_int8(data: bytes | bytearray | memoryview, *, limits: Limits = _DEFAULT_LIMITS) -> State:
    """Decode an ``int8`` payload to float32 tensors."""
    return _dequantize_all(_split(decode_state(data, limits=limits)))


# ---------------------------------------------------------------- topk


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a flat bool tensor into uint8 bytes, element 8 j + i in bit i of byte j."""
    padded = torch.zeros((mask.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask.to(torch.uint8)
    return (padded.reshape(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)  # (bytes, 8) -> bytes


def _bits(packed: torch.Tensor) -> torch.Tensor:
    return (packed.reshape(-1, 1) & _BITS).ne(0).reshape(-1)  # (bytes, 8) -> bits


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Invert :func:`pack_bits` for ``count`` elements; DecodeError if padding bits are set."""
    if packed.dim() != 1 or packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
        raise DecodeError(f"payload: a bitmask of {count} elements must be {(count + 7) // 8} uint8 bytes")
    bits = _bits(packed)
    if bool(bits[count:].any()):
        raise DecodeError("payload: bitmask padding bits are set")
    return bits[:count]


def encode_positions(mask: torch.Tensor) -> torch.Tensor:
    """Rice-code the set positions of a flat bool ``mask`` (see the module docstring)."""
    where = mask.nonzero().reshape(-1)
    gaps = torch.diff(where, prepend=torch.tensor([-1])) - 1  # zeros skipped before each position
    shift = _best_shift(gaps)
    quotients = gaps >> shift
    low = (gaps.reshape(-1, 1) >> torch.arange(shift)) & 1  # (positions, shift), least significant first
    unary = torch.zeros(int((quotients + 1).sum()), dtype=torch.bool)
    unary[torch.cumsum(quotients + 1, 0) - 1] = True  # quotient zeros, then a one
    return torch.cat([torch.tensor([shift], dtype=torch.uint8), pack_bits(low.reshape(-1).bool()), pack_bits(unary)])


def _best_shift(gaps: torch.Tensor) -> int:
    """The Rice parameter that codes ``gaps`` in the fewest bits."""
    if not gaps.numel():
        return 0
    guess = max(0, int(torch.log2(gaps.float().mean() + 1)))
    shifts = range(max(0, guess - 2), min(_MAX_SHIFT, guess + 2) + 1)
    return min(shifts, key=lambda shift: gaps.numel() * (shift + 1) + int((gaps >> shift).sum()))


def decode_positions(stream: torch.Tensor, count: int, total: int) -> torch.Tensor:
    """Invert :func:`encode_positions`: a bool mask of ``total`` with ``count`` positions set.

    Raises:
        DecodeError: the stream does not code exactly ``count`` increasing positions below
            ``total`` (checked before allocating anything larger than the stream or mask).
    """
    if stream.dim() != 1 or stream.dtype != torch.uint8 or stream.numel() < 1:
        raise DecodeError("payload: #i must be a uint8 vector")
    shift = int(stream[0])
    if shift > _MAX_SHIFT:
        raise DecodeError(f"payload: #i Rice parameter {shift} > {_MAX_SHIFT}")
    # The encoder's shift costs count * shift <= ~1.5 total bits; more is hostile (and big).
    if count > total or count * shift > 2 * total + 64:
        raise DecodeError(f"payload: #i cannot code {count} positions of {total} with parameter {shift}")
    low_bytes = (count * shift + 7) // 8
    unary_bytes = stream.numel() - 1 - low_bytes
    if unary_bytes < 0 or unary_bytes > (total + count + 7) // 8 or (count == 0) != (unary_bytes == 0):
        raise DecodeError(f"payload: #i of {stream.numel()} bytes cannot code {count} positions of {total}")
    low_bits = _bits(stream[1 : 1 + low_bytes])
    if bool(low_bits[count * shift :].any()):
        raise DecodeError("payload: #i padding bits are set")
    low = low_bits[: count * shift].reshape(count, shift).long()
    bits = _bits(stream[1 + low_bytes :])
    ends = bits.nonzero().reshape(-1)
    if ends.numel() != count or (count and bits.numel() - int(ends[-1]) > 8):
        raise DecodeError(f"payload: #i codes {ends.numel()} positions, expected {count}")
    gaps = ((torch.diff(ends, prepend=torch.tensor([-1])) - 1) << shift) | (low << torch.arange(shift)).sum(dim=1)
    where = torch.cumsum(gaps + 1, 0) - 1
    if count and int(where[-1]) >= total:
        raise DecodeError(f"payload: #i codes a position beyond {total}")
    mask = torch.zeros(total, dtype=torch.bool)
    mask[where] = True
    return mask


def topk_delta(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], fraction: float
) -> tuple[dict[str, torch.Tensor], State]:
    """Return (delta parts without #base, the model receivers will reconstruct).

    For each floating tensor the ``fraction`` largest changes against ``reference`` (at
    least one element) are sent, quantised to int8 with one scale per tensor (a packed
    delta, see the module docstring). The reconstruction applies exactly the dequantised
    values, so sender and receivers hold the same bits and everything not sent (the
    changes left out *and* the rounding of those sent) stays in the next difference.
    """
    masks, values, scales = [], [], []
    rebuilt: State = {}
    parts: dict[str, torch.Tensor] = {}
    for key in sorted(_checked(state)):
        tensor = state[key]
        if not _is_float(tensor):
            parts[key] = rebuilt[key] = tensor
            continue
        change = (tensor.detach().float() - reference[key].float()).reshape(-1)
        keep = min(change.numel(), max(1, round(fraction * change.numel())))
        mask = torch.zeros(change.numel(), dtype=torch.bool)
        if keep:
            mask[change.abs().topk(keep).indices] = True
        q, scale = quantize_int8(change[mask], per_channel=False)
        rebuilt[key] = apply_changes(reference[key], mask, dequantize(q, scale))
        masks.append(mask)
        values.append(q)
        scales.append(scale)
    parts[POSITIONS] = encode_positions(torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool))
    parts[VALUES] = torch.cat(values) if values else torch.zeros(0, dtype=torch.int8)
    parts[SCALES] = torch.cat(scales) if scales else torch.zeros(0)
    return parts, rebuilt


def topk_full(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], State]:
    """Return (the full model as int8 parts, the model receivers will reconstruct)."""
    parts: dict[str, torch.Tensor] = {}
    rebuilt: State = {}
    for key, tensor in _checked(state).items():
        if not _is_float(tensor):
            parts[key] = rebuilt[key] = tensor
            continue
        q, scale = quantize_int8(tensor, per_channel=True)
        parts[f"{key}#q"], parts[f"{key}#s"] = q, scale
        rebuilt[key] = _dequantize_checked(key, q, scale)
    return parts, rebuilt


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return float32 ``q * scale`` for a flat ``q`` and a one-element ``scale``."""
    return q.float() * scale


def apply_changes(base: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return ``base`` (its dtype) with ``values`` added where ``mask`` is set."""
    flat = base.detach().reshape(-1).clone()
    flat[mask] += values.to(flat.dtype)
    return flat.reshape(base.shape)


def encode_topk_full(state: Mapping[str, torch.Tensor]) -> bytes:
    """The ``topk`` codec's full mode (what the pure codec encodes alone): int8 parts."""
    return encode_state(topk_full(state)[0])


def decode_topk(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits = _DEFAULT_LIMITS,
    base: BaseLookup | None = None,
) -> State:
    """Decode a ``topk`` payload; a delta needs ``base(digest)`` to return the base model.

    Raises:
        MissingBase: a delta whose base this node does not hold.
        DecodeError: anything malformed, or parts that do not fit the base.
    """
    parts = decode_state(data, limits=limits)
    if BASE not in parts:
        if any("#" in key for key in parts):
            return _dequantize_all(_split(parts))  # the int8 full model
        return parts  # version 1's raw full model
    digest = parts.pop(BASE)
    if digest.dtype != torch.uint8 or digest.shape != (32,):
        raise DecodeError("payload: #base must be 32 uint8 bytes")
    held = base(bytes(digest.numpy().tobytes())) if base is not None else None
    if held is None:
        raise MissingBase(f"delta against base {bytes(digest.numpy().tobytes()).hex()[:12]} we do not hold")
    if VALUES in parts or POSITIONS in parts or SCALES in parts:
        return _rebuild_packed(parts, held)
    return _rebuild(_split(parts), held)  # version 1: per tensor #m and float16 #v


def _rebuild_packed(parts: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor]) -> State:
    """Apply a packed int8 delta to ``held`` (floating tensors in name order)."""
    floats = sorted(key for key, tensor in held.items() if _is_float(tensor))
    plain = {key: tensor for key, tensor in parts.items() if key not in (POSITIONS, VALUES, SCALES)}
    if set(plain) | set(floats) != set(held) or set(plain) & set(floats) or any("#" in key for key in plain):
        raise DecodeError("payload: delta names differ from its base's")
    stream, values, scales = parts.get(POSITIONS), parts.get(VALUES), parts.get(SCALES)
    if stream is None or values is None or scales is None:
        raise DecodeError("payload: a packed delta needs #i, #q and #s")
    if values.dtype != torch.int8 or values.dim() != 1:
        raise DecodeError("payload: #q must be an int8 vector")
    sizes = [held[key].numel() for key in floats]
    mask = decode_positions(stream, values.numel(), sum(sizes))
    if scales.dtype != torch.float32 or scales.shape != (len(floats),) or not bool(scales.isfinite().all()):
        raise DecodeError(f"payload: #s needs {len(floats)} finite float32 scales, one per floating tensor")
    out: State = dict(plain)
    start = taken = 0
    for index, (key, size) in enumerate(zip(floats, sizes, strict=True)):
        segment = mask[start : start + size]
        count = int(segment.sum())
        changes = dequantize(values[taken : taken + count], scales[index : index + 1])
        out[key] = apply_changes(held[key], segment, changes)
        start, taken = start + size, taken + count
    return {key: out[key] for key in sorted(out)}


def _dequantize_all(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> State:
    out: State = {}
    for key, parts in groups.items():
        if "" in parts:
            out[key] = parts[""]
            continue
        q, scale = parts.get("q"), parts.get("s")
        if set(parts) != {"q", "s"} or q is None or scale is None:
            raise DecodeError(f"payload: {key[:64]!r} needs exactly #q and #s")
        out[key] = _dequantize_checked(key, q, scale)
    return out


def _dequantize_checked(key: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` with one scale per tensor or per channel (dim 0); DecodeError if they do not fit."""
    if q.dtype != torch.int8 or scale.dtype != torch.float32 or scale.dim() != 1:
        raise DecodeError(f"payload: {key[:64]!r} must be int8 #q with a float32 vector #s")
    channels = q.shape[0] if q.dim() >= 1 else 1
    if scale.shape[0] not in {1, channels}:
        raise DecodeError(f"payload: {key[:64]!r} has {scale.shape[0]} scales for {channels} channels")
    shape = (scale.shape[0],) + (1,) * (q.dim() - 1) if q.dim() else ()
    return q.float() * scale.reshape(shape)


def _rebuild(groups: Mapping[str, Mapping[str, torch.Tensor]], held: Mapping[str, torch.Tensor]) -> State:
    if set(groups) != set(held):
        raise DecodeError("payload: delta names differ from its base's")
    out: State = {}
    for key, parts in groups.items():
        if "" in parts:
            out[key] = parts[""]
            continue
        mask_bytes, values = parts.get("m"), parts.get("v")
        if set(parts) != {"m", "v"} or mask_bytes is None or values is None:
            raise DecodeError(f"payload: {key[:64]!r} needs exactly #m and #v")
        mask = unpack_bits(mask_bytes, held[key].numel())
        if values.dtype != torch.float16 or values.dim() != 1 or values.numel() != int(mask.sum()):
            raise DecodeError(f"payload: {key[:64]!r} needs one float16 value per mask bit")
        out[key] = apply_changes(held[key], mask, values)
    return out


FP16 = register_codec(_cast_codec("fp16", "h", torch.float16))
BF16 = register_codec(_cast_codec("bf16", "b", torch.bfloat16))
INT8 = register_codec(Codec("int8", encode_int8, decode_int8))
TOPK = register_codec(Codec("topk", encode_topk_full, decode_topk, delta=True))

__all__ = [
    "BASE",
    "BF16",
    "FP16",
    "INT8",
    "TOPK",
    "BaseLookup",
    "POSITIONS",
    "SCALES",
    "VALUES",
    "apply_changes",
    "dequantize",
    "decode_int8",
    "decode_positions",
    "decode_topk",
    "encode_int8",
    "encode_positions",
    "encode_topk_full",
    "pack_bits",
    "quantize_int8",
    "topk_delta",
    "topk_full",
    "unpack_bits",
]
