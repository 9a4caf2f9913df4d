"""Signed update headers and gossip announcements (replay/equivocation memory: :mod:`.ledger`).

An update travels as two parts: a small signed header on gossip and the payload on the
data plane. The header is canonical CBOR (sorted keys, definite lengths, minimal ints)::

    {"v": 1, "net": str, "from": PeerId, "round": uint, "digest": sha256(payload),
     "size": uint, "samples": uint, "ts_ms": uint, "codec": str}

and the signature (64 bytes, see :mod:`p2pfl.core.crypto`) is over ``sha256(header)``.
A gossip announcement is the canonical CBOR map ``{"t": kind, "h": header, "s": sig}``.

Bytes from peers are decoded by the strict reader of :mod:`.cbor` (here: one flat map
of text keys to unsigned/negative ints, byte strings and text strings); tags, floats,
simple values, nested containers, indefinite lengths and duplicate keys are
rejected before ``cbor2`` sees anything, and the result must re-encode to the very same
bytes. So every accepted header has exactly one encoding, and with low-S signatures
exactly one valid signature: ``(header_bytes, signature)`` is a sound deduplication key.

:class:`VerifiedHeader` is only returned by :func:`verify_header` and :func:`sign_update`;
code that holds one need not check it again.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
from dataclasses import dataclass
from typing import Any

import cbor2

from p2pfl.config import Limits
from p2pfl.core import lossy as _lossy  # noqa: F401  (registers fp16, bf16, int8, topk)
from p2pfl.core.cbor import MAP, Scalar, StrictReader
from p2pfl.core.codec import DEFAULT_CODEC, codec_named
from p2pfl.core.crypto import DIGEST_BYTES, Identity, public_key_from_peer_id, verify_by_peer_id
from p2pfl.errors import (
    DecodeError,
    DigestMismatch,
    SignerMismatch,
    UnsupportedVersion,
    WrongNetwork,
)

PROTOCOL_VERSION = 1

_UINT_LIMIT = 1 << 64  # CBOR major type 0 without bignum tags
_HEADER_KEYS = frozenset(
    {"v", "net", "from", "round", "digest", "size", "samples", "ts_ms", "codec"}
)
_ANNOUNCEMENT_KEYS = frozenset({"t", "h", "s"})
_DEFAULT_LIMITS = Limits()

_Value = Scalar


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _UINT_LIMIT


def _is_text(value: object) -> bool:
    return isinstance(value, str) and len(value) > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateHeader:
    """What a sender claims about one update; signed as canonical CBOR.

    Raises:
        DecodeError: a field has the wrong type or range (from a peer, or from a caller
            of :func:`sign_update`); :class:`~p2pfl.errors.UnknownCodec` if ``codec``
            is not in :data:`~p2pfl.core.codec.CODECS`.
    """

    version: int
    network_id: str
    sender: str  # the signer's PeerId: its key verifies the signature
    round: int
    digest: bytes  # sha256 of the payload
    size: int  # payload bytes
    samples: int  # claimed number of training samples (a claim, not a fact)
    ts_ms: int  # sender's wall clock in milliseconds; informative only
    codec: str  # how the payload is encoded: a name in the codec registry

    def __post_init__(self) -> None:
        for name in ("version", "round", "size", "samples", "ts_ms"):
            if not _is_uint(getattr(self, name)):
                raise DecodeError(f"header field {name!r} must be an unsigned 64-bit integer")
        for name in ("network_id", "sender", "codec"):
            if not _is_text(getattr(self, name)):
                raise DecodeError(f"header field {name!r} must be a non-empty string")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_BYTES:
            raise DecodeError(f"header field 'digest' must be {DIGEST_BYTES} bytes")
        codec_named(self.codec)  # UnknownCodec: a payload we could not decode is refused here
        public_key_from_peer_id(self.sender)  # DecodeError unless a secp256k1 PeerId

    def encode(self) -> bytes:
        """Return the canonical CBOR encoding (the bytes that get signed)."""
        return cbor2.dumps(
            {
                "v": self.version,
                "net": self.network_id,
                "from": self.sender,
                "round": self.round,
                "digest": self.digest,
                "size": self.size,
                "samples": self.samples,
                "ts_ms": self.ts_ms,
                "codec": self.codec,
            },
            canonical=True,
        )


@dataclass(frozen=True, slots=True)
class VerifiedHeader:
    """A header whose signature by ``header.sender`` has been checked.

    Only :func:`verify_header` and :func:`sign_update` construct it; its type is the
    proof that the check happened.
    """

    header: UpdateHeader
    header_bytes: bytes
    signature: bytes

    @property
    def header_digest(self) -> bytes:
        """The signed digest ``sha256(header_bytes)``: a unique id for this announcement."""
        return hashlib.sha256(self.header_bytes).digest()


class AnnouncementKind(enum.IntEnum):
    """Why a peer publishes a header on gossip."""

    UPDATE = 1  # the author announces its own update
    HOLDS = 2  # any peer that verified the payload offers to serve it


_KINDS = frozenset(int(kind) for kind in AnnouncementKind)


@dataclass(frozen=True, slots=True)
class ParsedAnnouncement:
    """A gossip announcement that passed :func:`parse_announcement`."""

    kind: AnnouncementKind
    update: VerifiedHeader
    origin: str  # PeerId of the gossip peer that published it


def sign_update(
    identity: Identity,
    *,
    network_id: str,
    round: int,
    payload: bytes | memoryview,
    samples: int,
    ts_ms: int,
    codec: str = DEFAULT_CODEC,
) -> VerifiedHeader:
    """Build and sign the header for ``payload`` (its digest and size are computed here).

    Raises:
        DecodeError: a field is out of range (negative round, empty network id, ...).
    """
    view = memoryview(payload)
    header = UpdateHeader(
        version=PROTOCOL_VERSION,
        network_id=network_id,
        sender=identity.peer_id,
        round=round,
        digest=hashlib.sha256(view).digest(),
        size=view.nbytes,
        samples=samples,
        ts_ms=ts_ms,
        codec=codec,
    )
    header_bytes = header.encode()
    signature = identity.sign(hashlib.sha256(header_bytes).digest())
    return VerifiedHeader(header, header_bytes, signature)


def verify_header(header_bytes: bytes, signature: bytes, *, network_id: str) -> VerifiedHeader:
    """Decode and check a signed header received from a peer.

    Cheap checks run before the signature check so that junk costs little.

    Raises:
        DecodeError: not a canonical header (types, keys, ranges, bad PeerId);
            :class:`~p2pfl.errors.UnknownCodec` if it names a codec not in the registry.
        UnsupportedVersion: the header speaks another protocol version.
        WrongNetwork: the header is bound to another network id.
        InvalidSignature: the signature does not verify under the ``from`` PeerId's key.
            (With 64-byte ECDSA signatures and no recovery id, "signed by another key"
            cannot be told apart from "forged", so both raise this.)
    """
    header = _decode_header(bytes(header_bytes), network_id)
    return _check_signature(header, bytes(header_bytes), bytes(signature))


def _decode_header(header_bytes: bytes, network_id: str) -> UpdateHeader:
    """Decode a header and check version and network; the signature is not checked yet."""
    fields = _decode_flat_map(header_bytes, "header")
    version = fields.get("v")
    if not _is_uint(version):
        raise DecodeError("header has no unsigned integer version 'v'")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"header version {version!r}, this node speaks {PROTOCOL_VERSION}")
    _require_keys(fields, _HEADER_KEYS, "header")
    values: dict[str, Any] = fields  # UpdateHeader.__post_init__ checks every type
    header = UpdateHeader(
        version=PROTOCOL_VERSION,
        network_id=values["net"],
        sender=values["from"],
        round=values["round"],
        digest=values["digest"],
        size=values["size"],
        samples=values["samples"],
        ts_ms=values["ts_ms"],
        codec=values["codec"],
    )
    if header.network_id != network_id:
        raise WrongNetwork(f"header is for network {header.network_id[:64]!r}, not {network_id!r}")
    return header


def _check_signature(header: UpdateHeader, header_bytes: bytes, signature: bytes) -> VerifiedHeader:
    verify_by_peer_id(header.sender, hashlib.sha256(header_bytes).digest(), signature)
    return VerifiedHeader(header, header_bytes, signature)


def _require_keys(fields: dict[str, _Value], expected: frozenset[str], what: str) -> None:
    """Raise DecodeError naming (a bounded number of) missing and unexpected keys."""
    if fields.keys() != expected:
        missing = sorted(expected - fields.keys())
        extra = sorted(fields.keys() - expected)[:4]
        raise DecodeError(f"{what} keys: missing {missing}, unexpected {str(extra)[:80]}")


def encode_announcement(kind: AnnouncementKind, update: VerifiedHeader) -> bytes:
    """Encode a gossip announcement as canonical CBOR ``{"t", "h", "s"}``."""
    return cbor2.dumps(
        {"t": int(kind), "h": update.header_bytes, "s": update.signature}, canonical=True
    )


def parse_announcement(
    origin: str,
    data: bytes | memoryview,
    *,
    network_id: str,
    limits: Limits = _DEFAULT_LIMITS,
) -> ParsedAnnouncement:
    """Validate a gossip message from ``origin``: the topic validator of the node.

    Raises:
        DecodeError: oversize (checked before decoding) or not a canonical announcement.
        SignerMismatch: an UPDATE announced by someone other than its signer (a peer
            may only announce its own updates; others use HOLDS).
        UpdateRejected: any other reason :func:`verify_header` gives.
    """
    if len(data) > limits.max_message_bytes:
        raise DecodeError(f"announcement of {len(data)} bytes > {limits.max_message_bytes}")
    fields = _decode_flat_map(bytes(data), "announcement")
    _require_keys(fields, _ANNOUNCEMENT_KEYS, "announcement")
    kind, header_bytes, signature = fields["t"], fields["h"], fields["s"]
    if not isinstance(kind, int) or kind not in _KINDS:
        raise DecodeError(f"unknown announcement kind {kind!r}")
    if not isinstance(header_bytes, bytes) or not isinstance(signature, bytes):
        raise DecodeError("announcement 'h' and 's' must be byte strings")
    header = _decode_header(header_bytes, network_id)
    # Before the (costly) signature check: a relayed UPDATE is refused whatever it carries.
    if kind == AnnouncementKind.UPDATE and header.sender != origin:
        raise SignerMismatch("UPDATE announced by a peer other than its signer")
    update = _check_signature(header, header_bytes, signature)
    return ParsedAnnouncement(AnnouncementKind(kind), update, origin)


@dataclass(frozen=True, slots=True)
class CheckedPayload:
    """Payload bytes with their sha256, computed once, where they were received.

    Built only by :func:`hash_payload` and :class:`PayloadHasher`; its type is the proof
    that ``digest`` is the sha256 of ``data``, so :func:`check_payload` compares digests
    instead of hashing the payload a second time.
    """

    data: bytes
    digest: bytes

    def __len__(self) -> int:
        return len(self.data)


def hash_payload(data: bytes) -> CheckedPayload:
    """Hash a payload that arrived whole (one sha256 pass)."""
    return CheckedPayload(data, hashlib.sha256(data).digest())


# CPython's own way to build a bytes object in place: PyBytes_FromStringAndSize(NULL, n)
# returns a new object whose contents the creator fills before anyone else sees it.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes, _new_bytes.restype = (ctypes.c_char_p, ctypes.c_ssize_t), ctypes.py_object
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.argtypes, _bytes_address.restype = (ctypes.py_object,), ctypes.c_void_p
_FILL_FROM_BYTES = 1 << 20  # smaller payloads are joined: one small copy, no ctypes


class PayloadHasher:
    """Hash a payload chunk by chunk as it arrives and assemble it.

    Given the ``size`` to expect (the reply header's length), a payload of 1 MiB or more
    is copied chunk by chunk into one ``bytes`` object allocated up front, so each chunk
    can be freed as soon as it is added: the payload is never held twice (chunks + joined,
    ~2 models at the join of a 100 MB pull). Without it, :meth:`finish` joins the chunks.
    """

    __slots__ = ("_address", "_buffer", "_chunks", "_filled", "_sha")

    def __init__(self, size: int | None = None) -> None:
        self._sha = hashlib.sha256()
        self._chunks: list[bytes] = []
        self._buffer: bytes | None = None
        self._address, self._filled = 0, 0
        if size is not None and size >= _FILL_FROM_BYTES:
            self._buffer = _new_bytes(None, size)  # uninitialised: filled by add()
            self._address = _bytes_address(self._buffer)

    def add(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        if self._buffer is None:
            self._chunks.append(chunk)
            return
        if self._filled + len(chunk) > len(self._buffer):
            raise ValueError(f"chunks exceed the expected {len(self._buffer)} bytes")
        ctypes.memmove(self._address + self._filled, chunk, len(chunk))
        self._filled += len(chunk)

    def finish(self) -> CheckedPayload:
        if self._buffer is None:
            data = b"".join(self._chunks)  # one copy (none for a single chunk)
            self._chunks = []
            return CheckedPayload(data, self._sha.digest())
        data, self._buffer = self._buffer, None
        if self._filled != len(data):
            raise ValueError(f"{self._filled} bytes added, {len(data)} expected")
        return CheckedPayload(data, self._sha.digest())


def check_payload(update: VerifiedHeader, payload: CheckedPayload | bytes | memoryview) -> None:
    """Check that ``payload`` is the one the header signs.

    A :class:`CheckedPayload` (what a transfer returns) is not hashed again; plain bytes
    are hashed here, once.

    Raises:
        DigestMismatch: the size or the sha256 differs from the header's.
    """
    if isinstance(payload, CheckedPayload):
        size, digest = len(payload.data), payload.digest
    else:
        view = memoryview(payload)
        size, digest = view.nbytes, hashlib.sha256(view).digest()
    if size != update.header.size:
        raise DigestMismatch(f"payload is {size} bytes, header says {update.header.size}")
    if digest != update.header.digest:
        raise DigestMismatch("payload sha256 differs from the signed digest")


def _decode_flat_map(data: bytes, what: str) -> dict[str, _Value]:
    """Decode one canonical CBOR map of text keys to scalars, nothing before or after."""
    reader = StrictReader(data, what)
    _, count = reader.head(what, MAP)
    if count > len(data):  # each entry takes at least two bytes: refuse before looping
        raise DecodeError(f"{what} declares more entries than it has bytes")
    result: dict[str, _Value] = {}
    for _ in range(count):
        key = reader.scalar("key")
        if not isinstance(key, str):
            raise DecodeError(f"{what} has a non-text key")
        if key in result:
            raise DecodeError(f"{what} repeats key {key[:32]!r}")
        result[key] = reader.scalar("value")
    reader.finish()
    if cbor2.dumps(result, canonical=True) != data:
        raise DecodeError(f"{what} is not canonical CBOR")
    return result


__all__ = [
    "PROTOCOL_VERSION",
    "AnnouncementKind",
    "CheckedPayload",
    "ParsedAnnouncement",
    "PayloadHasher",
    "UpdateHeader",
    "VerifiedHeader",
    "check_payload",
    "encode_announcement",
    "hash_payload",
    "parse_announcement",
    "sign_update",
    "verify_header",
]
