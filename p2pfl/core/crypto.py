"""secp256k1 identities, signatures and libp2p PeerIds.

This is the only module in p2pfl that imports ``ecdsa`` or ``coincurve``, so the signature
backends can be swapped in one place: ``ecdsa`` (pure Python) keeps key files and signing,
libsecp256k1 through ``coincurve`` verifies (~0.03 ms against ~2.7 ms: every announcement
every peer forwards is verified on the hot path). ``tests/core/test_crypto_backends.py``
proves both accept and reject exactly the same signatures and keys. A node's libp2p host key is built from the same 32-byte secret
(:meth:`Identity.secret_bytes`), so the PeerId (``16Uiu2...``) embeds the very public key
that signs its updates: verifying an update needs nothing but the sender's PeerId.

Signatures are over 32-byte digests, 64 bytes ``r || s``, deterministic (RFC 6979 with
SHA-256) and low-S normalised; a high-S signature is rejected so that every message has
exactly one valid signature per key (no malleability for deduplication to trip on).

No I/O here: :meth:`Identity.save` and :meth:`Identity.load` hand PEM bytes to
:mod:`p2pfl.keyfile`, which owns the key file (mode checks, atomic writes).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from functools import lru_cache

import coincurve
import ecdsa
from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT
from ecdsa.util import sigencode_string_canonize

from p2pfl.errors import DecodeError, InvalidSignature, KeyFileError
from p2pfl.keyfile import read_key_file, write_key_file

logger = logging.getLogger(__name__)

_CURVE = ecdsa.SECP256k1
_ORDER: int = _CURVE.order
_HALF_ORDER = _ORDER // 2
SECRET_BYTES = 32
PUBLIC_KEY_BYTES = 33
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32

# PeerId = base58btc(identity multihash(protobuf PublicKey{Type=Secp256k1(2), Data=key})).
# multihash: code 0x00 (identity), length 0x25 (= 4 + 33); protobuf: field 1 varint 2,
# field 2 length-delimited 0x21 (= 33) bytes.
_PEER_ID_PREFIX = bytes([0x00, 0x25, 0x08, 0x02, 0x12, 0x21])
_PEER_ID_BYTES = len(_PEER_ID_PREFIX) + PUBLIC_KEY_BYTES
# A 39-byte id is 53 base58 characters; anything much longer is not worth decoding.
_MAX_PEER_ID_CHARS = 64
# Verifying keys for the peers we hear from; parsing a compressed point costs a square root.
_VERIFYING_KEY_CACHE = 4096

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def _b58encode(data: bytes) -> str:
    """Encode bytes in base58btc (Bitcoin alphabet, one ``1`` per leading zero byte)."""
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, rem = divmod(number, 58)
        digits.append(_B58_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(digits))


def _b58decode(text: str) -> bytes:
    """Decode base58btc; raise DecodeError on a character outside the alphabet."""
    number = 0
    for char in text:
        index = _B58_INDEX.get(char)
        if index is None:
            raise DecodeError(f"not base58: character {char!r}")
        number = number * 58 + index
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\0" * zeros + body


@lru_cache(maxsize=_VERIFYING_KEY_CACHE)
def _verifying_key(public_key: bytes) -> coincurve.PublicKey:
    """Parse a 33-byte compressed SEC1 key (cached); raise DecodeError if it is not one."""
    if len(public_key) != PUBLIC_KEY_BYTES or public_key[0] not in (2, 3):
        raise DecodeError("public key is not a 33-byte compressed secp256k1 point")
    try:
        return coincurve.PublicKey(public_key)
    except ValueError as exc:
        raise DecodeError("public key is not a point on secp256k1") from exc


def peer_id_from_public_key(public_key: bytes) -> str:
    """Return the libp2p PeerId string of a 33-byte compressed secp256k1 public key."""
    _verifying_key(bytes(public_key))
    return _b58encode(_PEER_ID_PREFIX + bytes(public_key))


def short_id(peer_id: str) -> str:
    """Return the short form of a PeerId used in logs and tables: its last 8 characters
    (PeerIds of one key type share a long prefix)."""
    return peer_id[-8:]


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Extract the compressed public key embedded in a secp256k1 PeerId.

    Raises:
        DecodeError: ``peer_id`` is not the base58 identity multihash of a valid
            secp256k1 public key (e.g. an Ed25519 or RSA PeerId, or garbage).
    """
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise DecodeError("peer id must be a non-empty string of at most 64 characters")
    return _public_key_of(peer_id)


@lru_cache(maxsize=_VERIFYING_KEY_CACHE)  # every announcement names its signer: decode it once
def _public_key_of(peer_id: str) -> bytes:
    raw = _b58decode(peer_id)
    if len(raw) != _PEER_ID_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise DecodeError(f"not a secp256k1 identity PeerId: {peer_id[:16]!r}")
    public_key = raw[len(_PEER_ID_PREFIX) :]
    _verifying_key(public_key)
    return public_key


def verify_signature(public_key: bytes, digest: bytes, signature: bytes) -> None:
    """Check a 64-byte low-S ``r || s`` signature over a 32-byte digest.

    Raises:
        InvalidSignature: the signature does not verify, is malformed or high-S, the
            digest is not 32 bytes, or the public key is not a valid point.
    """
    if len(digest) != DIGEST_BYTES or len(signature) != SIGNATURE_BYTES:
        raise InvalidSignature("signature must be 64 bytes over a 32-byte digest")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < _ORDER and 0 < s <= _HALF_ORDER):
        raise InvalidSignature("signature scalars out of range (or high-S)")
    try:
        key = _verifying_key(bytes(public_key))
    except DecodeError as exc:
        raise InvalidSignature(f"cannot verify: {exc}") from exc
    parsed = ffi.new("secp256k1_ecdsa_signature *")
    # Scalars are in range (checked above), so parsing cannot fail; libsecp256k1 also
    # rejects high-S itself, which the check above already did.
    ctx = GLOBAL_CONTEXT.ctx
    if not lib.secp256k1_ecdsa_signature_parse_compact(ctx, parsed, bytes(signature)):
        raise InvalidSignature("signature is not a valid compact signature")
    if not lib.secp256k1_ecdsa_verify(ctx, parsed, bytes(digest), key.public_key):
        raise InvalidSignature("signature does not verify")


def verify_by_peer_id(peer_id: str, digest: bytes, signature: bytes) -> None:
    """Check a signature against the key embedded in ``peer_id``.

    Raises:
        DecodeError: ``peer_id`` is not a secp256k1 PeerId.
        InvalidSignature: the signature does not verify under that key.
    """
    verify_signature(public_key_from_peer_id(peer_id), digest, signature)


class Identity:
    """A node's secp256k1 key pair: signs updates and names the node on libp2p."""

    __slots__ = ("_peer_id", "_public_key", "_signing_key")

    def __init__(self, signing_key: ecdsa.SigningKey) -> None:
        """Wrap an ecdsa secp256k1 key; use :meth:`generate`, :meth:`from_secret` or :meth:`load`."""
        self._signing_key = signing_key
        self._public_key: bytes = signing_key.get_verifying_key().to_string("compressed")
        self._peer_id = peer_id_from_public_key(self._public_key)

    @classmethod
    def generate(cls, entropy: Callable[[int], bytes] = os.urandom) -> Identity:
        """Create a new identity from ``entropy(48)`` bytes (FIPS 186-4 B.4.1 reduction)."""
        seed = entropy(48)
        if len(seed) != 48:
            raise KeyFileError(f"entropy source returned {len(seed)} bytes, expected 48")
        # 128 extra bits make the modular bias negligible and need no rejection loop.
        scalar = int.from_bytes(seed, "big") % (_ORDER - 1) + 1
        return cls.from_secret(scalar.to_bytes(SECRET_BYTES, "big"))

    @classmethod
    def from_secret(cls, secret: bytes) -> Identity:
        """Build an identity from a 32-byte big-endian scalar in [1, n-1].

        Raises:
            KeyFileError: the secret is not a valid secp256k1 private key.
        """
        if len(secret) != SECRET_BYTES:
            raise KeyFileError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
        if not 0 < int.from_bytes(secret, "big") < _ORDER:
            raise KeyFileError("secret is not a scalar in [1, n-1] of secp256k1")
        return cls(
            ecdsa.SigningKey.from_string(bytes(secret), curve=_CURVE, hashfunc=hashlib.sha256)
        )

    def secret_bytes(self) -> bytes:
        """Return the 32-byte secret (the libp2p host key is built from it). Never log it."""
        return self._signing_key.to_string()

    @property
    def public_key(self) -> bytes:
        """The 33-byte compressed SEC1 public key."""
        return self._public_key

    @property
    def peer_id(self) -> str:
        """The libp2p PeerId string (``16Uiu2...``) that embeds the public key."""
        return self._peer_id

    def sign(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest: 64 bytes ``r || s``, RFC 6979, low-S."""
        if len(digest) != DIGEST_BYTES:
            raise DecodeError(f"can only sign a {DIGEST_BYTES}-byte digest, got {len(digest)}")
        return self._signing_key.sign_digest_deterministic(
            bytes(digest), hashfunc=hashlib.sha256, sigencode=sigencode_string_canonize
        )

    def to_pem(self) -> bytes:
        """Return the key as PKCS#8 PEM (what :meth:`save` writes). Never log it."""
        return bytes(self._signing_key.to_pem(format="pkcs8"))

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str = "key") -> Identity:
        """Parse a secp256k1 PEM private key; ``source`` names it in errors.

        Raises:
            KeyFileError: not a PEM private key, or not on secp256k1.
        """
        try:
            signing_key = ecdsa.SigningKey.from_pem(pem.decode("ascii"), hashfunc=hashlib.sha256)
        except Exception as exc:  # ecdsa raises many unrelated types on malformed DER/PEM
            raise KeyFileError(f"{source}: not a PEM private key ({type(exc).__name__})") from None
        if signing_key.curve != _CURVE:
            raise KeyFileError(f"{source}: key is on {signing_key.curve.name}, expected secp256k1")
        return cls(signing_key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file (PEM, mode 0600, atomic): :func:`p2pfl.keyfile.write_key_file`."""
        write_key_file(path, self.to_pem())
        logger.info("wrote key file %s for peer %s", path, self._peer_id)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file written by :meth:`save` (or any secp256k1 PEM key).

        Raises:
            KeyFileError: the file is missing, unreadable, malformed, not secp256k1, or
                readable by group/others (the message names the ``chmod`` that fixes it).
        """
        return cls.from_pem(read_key_file(path), source=str(path))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id!r})"


__all__ = [
    "short_id",
    "DIGEST_BYTES",
    "PUBLIC_KEY_BYTES",
    "SECRET_BYTES",
    "SIGNATURE_BYTES",
    "Identity",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "verify_by_peer_id",
    "verify_signature",
]
