"""The outbox's encode step: which codec encodes our updates, and the sender's state it needs.

``[net] codec`` names a codec of :data:`p2pfl.core.codec.CODECS`; the outbox signs the
header with that name. Stateless codecs (``raw``, ``fp16``, ``bf16``, ``int8``) encode each
update alone. ``topk`` is a delta codec with error feedback, and its state lives here,
not in the pure codec:

- ``reference``: the model receivers reconstructed from our previous payload; each delta
  is ``state - reference``, of which the ``codec_k`` largest changes per tensor are sent,
  and the reference advances by exactly what was sent (so what was not sent stays in the
  next difference: the error feedback);
- the full model is sent instead of a delta on the first update, every
  ``codec_full_every`` rounds, and whenever a current neighbour does not hold the model
  the delta would be based on (it did not pull our last payload, or missed one delta of
  the chain since the last full model: a new neighbour, one that missed a round): a
  receiver can only apply a delta to the base it holds, and refuses it otherwise
  (:class:`~p2pfl.errors.MissingBase`, not evidence against us).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from p2pfl.config import NetConfig
from p2pfl.core.codec import CODECS, codec_named, encode_state
from p2pfl.core.lossy import BASE, encode_int8, topk_delta
from p2pfl.core.state import State
from p2pfl.errors import ConfigError, UnknownCodec


class Encoder:
    """A stateless codec: every update is encoded alone."""

    def __init__(self, codec: str, *, per_channel: bool = True) -> None:
        self.codec = codec
        self._encode = codec_named(codec).encode
        self._per_channel = per_channel

    @property
    def base(self) -> bytes | None:
        """The payload digest the next update would be a delta against (None: no deltas)."""
        return None

    @property
    def base_is_delta(self) -> bool:
        """Whether the payload named by :attr:`base` was itself a delta."""
        return False

    def encode(self, round: int, state: Mapping[str, torch.Tensor], *, base_held: bool) -> bytes:
        """Encode ``state`` as our update of ``round``."""
        if self.codec == "int8":
            return encode_int8(state, per_channel=self._per_channel)
        return self._encode(state)


class TopKEncoder(Encoder):
    """``topk``: the largest changes against what receivers hold, with error feedback."""

    def __init__(self, *, fraction: float, full_every: int) -> None:
        super().__init__("topk")
        self._fraction, self._full_every = fraction, full_every
        self._reference: State | None = None
        self._base: bytes | None = None
        self._base_is_delta = False
        self._last_full = 0

    @property
    def base(self) -> bytes | None:
        return self._base

    @property
    def base_is_delta(self) -> bool:
        return self._base_is_delta

    def encode(self, round: int, state: Mapping[str, torch.Tensor], *, base_held: bool) -> bytes:
        """Encode a delta if every neighbour holds the base, else the full model."""
        if self._reference is None or not base_held or round - self._last_full >= self._full_every:
            payload = encode_state(state)
            self._reference = {key: t.detach().clone() for key, t in state.items()}
            self._last_full, self._base_is_delta = round, False
        else:
            self._base_is_delta = True
            parts, self._reference = topk_delta(state, self._reference, self._fraction)
            digest = torch.frombuffer(bytearray(self._base or b""), dtype=torch.uint8)
            payload = encode_state({**parts, BASE: digest})
        self._base = hashlib.sha256(payload).digest()
        return payload


def make_encoder(net: NetConfig) -> Encoder:
    """Return the encoder ``[net] codec`` names.

    Raises:
        ConfigError: the codec is not registered.
    """
    try:
        codec_named(net.codec)
    except UnknownCodec:
        raise ConfigError(f"net.codec: must be one of {', '.join(sorted(CODECS))}, got {net.codec!r}") from None
    if net.codec == "topk":
        return TopKEncoder(fraction=net.codec_k, full_every=net.codec_full_every)
    return Encoder(net.codec, per_channel=net.codec_per_channel)


__all__ = ["Encoder", "TopKEncoder", "make_encoder"]
