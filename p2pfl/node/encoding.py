"""The outbox's encode step: which codec encodes our updates, and the sender's state it needs.

``[net] codec`` names a codec of :data:`p2pfl.core.codec.CODECS`; the outbox signs the
header with that name. Stateless codecs (``raw``, ``fp16``, ``bf16``, ``int8``) encode each
update alone. ``topk`` is a delta codec with error feedback, and its state lives here,
not in the pure codec:

- the references: the models receivers rebuild from our last ``KEEP_BASES`` payloads.
  A delta is ``state - reference`` against the newest of them that every current
  neighbour holds; the ``codec_k`` largest changes per tensor are sent and the new
  reference is exactly the base plus what was sent (so what was not sent stays in the
  next difference: the error feedback). A neighbour holds a payload's model if it pulled
  the payload and held its base's (one missed delta breaks the chain);
- the full model (int8, per channel; its rounding is fed back too) is sent instead on the first update, every ``codec_full_every``
  rounds, and whenever some current neighbour holds none of the references (a new
  neighbour, one that missed rounds): a receiver can only apply a delta to a base it
  holds, and refuses it otherwise (:class:`~p2pfl.errors.MissingBase`, not evidence).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from p2pfl.config import NetConfig
from p2pfl.core import lossy as _lossy  # noqa: F401  (registers fp16, bf16, int8, topk)
from p2pfl.core.codec import CODECS, codec_named, encode_state
from p2pfl.core.lossy import BASE, encode_int8, topk_delta, topk_full
from p2pfl.core.state import State
from p2pfl.errors import ConfigError, UnknownCodec

KEEP_BASES = 2
"""Our last payloads a delta may be taken against (receivers keep as many per sender)."""

HOLDS_MIN_BYTES = 1 << 20
"""A big payload: at least one piece (p2pfl.net.ranged). A node that holds one says
HOLDS (with ``[net] fetch_sources > 1``; a smaller one comes whole from its author, and
the notice would cost every neighbour a signature check for nothing). Its announcement
and every delivery of it are logged at INFO (benchmarks/bench_bigmodel.py reads them);
for a small one those lines are DEBUG (they tripled a test network's logs)."""


def payload_log_level(size: int) -> int:
    """The level of the announce/deliver lines of a ``size``-byte payload (:data:`HOLDS_MIN_BYTES`)."""
    return logging.INFO if size >= HOLDS_MIN_BYTES else logging.DEBUG


class Holding(Protocol):
    """What the encoder asks the transport: who is there, who pulled which payload."""

    def neighbours(self) -> tuple[str, ...]: ...

    def pulled_by(self, digest: bytes) -> frozenset[str]: ...


class Encoder:
    """A stateless codec: every update is encoded alone."""

    def __init__(self, codec: str, *, per_channel: bool = True) -> None:
        self.codec = codec
        self._encode = codec_named(codec).encode
        self._per_channel = per_channel

    def held_bases(self, transport: Holding) -> frozenset[bytes]:
        """Our payloads every current neighbour holds the model of (run on the event loop)."""
        return frozenset()

    def encode(self, round: int, state: Mapping[str, torch.Tensor], *, held: frozenset[bytes]) -> bytes:
        """Encode ``state`` as our update of ``round``; ``held`` is :meth:`held_bases`."""
        if self.codec == "int8":
            return encode_int8(state, per_channel=self._per_channel)
        return self._encode(state)


@dataclass(frozen=True, slots=True)
class _Sent:
    digest: bytes  # sha256 of the payload
    reference: State  # the model receivers rebuild from it
    base: bytes | None  # the payload it was a delta against; None: a full model


class TopKEncoder(Encoder):
    """``topk``: the largest changes against what receivers hold, with error feedback."""

    def __init__(self, *, fraction: float, full_every: int) -> None:
        super().__init__("topk")
        self._fraction, self._full_every = fraction, full_every
        self._sent: list[_Sent] = []  # the last KEEP_BASES payloads, oldest first
        self._holders: dict[bytes, frozenset[str]] = {}  # digest -> peers holding its model
        self._last_full = 0

    def held_bases(self, transport: Holding) -> frozenset[bytes]:
        """A peer holds a payload's model if it pulled it and held the model of its base."""
        holders: dict[bytes, frozenset[str]] = {}
        for sent in self._sent:  # oldest first: a base's holders are known before its delta's
            pulled = transport.pulled_by(sent.digest)
            if sent.base is not None:
                pulled &= holders.get(sent.base, self._holders.get(sent.base, frozenset()))
            holders[sent.digest] = pulled
        self._holders = holders
        neighbours = set(transport.neighbours())
        return frozenset(digest for digest, peers in holders.items() if neighbours <= peers)

    def encode(self, round: int, state: Mapping[str, torch.Tensor], *, held: frozenset[bytes]) -> bytes:
        """A delta against our newest payload every neighbour holds, else the full model."""
        bases = [sent for sent in self._sent if sent.digest in held]
        if not bases or round - self._last_full >= self._full_every:
            parts, rebuilt = topk_full(state)  # int8: the rounding is fed back like a delta's
            payload = encode_state(parts)
            sent = _Sent(b"", rebuilt, None)
            self._last_full = round
        else:
            parts, rebuilt = topk_delta(state, bases[-1].reference, self._fraction)
            digest = torch.frombuffer(bytearray(bases[-1].digest), dtype=torch.uint8)
            payload = encode_state({**parts, BASE: digest})
            sent = _Sent(b"", rebuilt, bases[-1].digest)
        self._sent = [*self._sent, replace(sent, digest=hashlib.sha256(payload).digest())][-KEEP_BASES:]
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


__all__ = ["HOLDS_MIN_BYTES", "Encoder", "TopKEncoder", "make_encoder", "payload_log_level"]
