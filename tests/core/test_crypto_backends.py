"""libsecp256k1 (coincurve, the hot path) and pure-Python ecdsa agree on every signature and key.

The reference below is the verifier p2pfl used before: ``ecdsa`` over the same 64-byte low-S
``r || s`` format. Hypothesis drives both with valid signatures and every way we know to
spoil one; the property is that they accept and reject exactly the same inputs.
"""

from __future__ import annotations

import hashlib

import ecdsa
import pytest
from ecdsa.util import sigdecode_string, sigencode_der
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.core.crypto import Identity, peer_id_from_public_key, verify_signature
from p2pfl.errors import DecodeError, InvalidSignature

ORDER = ecdsa.SECP256k1.order

secrets = st.integers(min_value=1, max_value=ORDER - 1).map(lambda n: n.to_bytes(32, "big"))
digests = st.binary(min_size=32, max_size=32)


def reference_accepts(public_key: bytes, digest: bytes, signature: bytes) -> bool:
    """The pure-Python verifier: 64-byte low-S r||s over a 32-byte digest."""
    if len(digest) != 32 or len(signature) != 64:
        return False
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (0 < r < ORDER and 0 < s <= ORDER // 2):
        return False
    if len(public_key) != 33 or public_key[0] not in (2, 3):
        return False
    try:
        key = ecdsa.VerifyingKey.from_string(
            public_key, curve=ecdsa.SECP256k1, hashfunc=hashlib.sha256, valid_encodings=("compressed",)
        )
        return bool(key.verify_digest(signature, digest, sigdecode=sigdecode_string))
    except (ecdsa.BadSignatureError, ecdsa.MalformedPointError, ValueError, AssertionError):
        return False


def fast_accepts(public_key: bytes, digest: bytes, signature: bytes) -> bool:
    try:
        verify_signature(public_key, digest, signature)
    except InvalidSignature:
        return False
    return True


def scalars(r: int, s: int) -> bytes:
    return (r % 2**256).to_bytes(32, "big") + (s % 2**256).to_bytes(32, "big")


def variants(signature: bytes, digest: bytes, bit: int) -> list[tuple[str, bytes, bytes]]:
    """(name, digest, signature) for the valid signature and spoiled ones."""
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    flipped = bytearray(signature)
    flipped[bit // 8 % 64] ^= 1 << (bit % 8)
    tampered = bytearray(digest)
    tampered[bit // 8 % 32] ^= 1 << (bit % 8)
    return [
        ("valid", digest, signature),
        ("tampered message", bytes(tampered), signature),
        ("bit flip", digest, bytes(flipped)),
        ("high-S twin", digest, scalars(r, ORDER - s)),
        ("r + n", digest, scalars(r + ORDER, s)),
        ("s + n", digest, scalars(r, s + ORDER)),
        ("r = 0", digest, scalars(0, s)),
        ("s = 0", digest, scalars(r, 0)),
        ("swapped", digest, signature[32:] + signature[:32]),
        ("DER", digest, sigencode_der(r, s, ORDER)),
        ("truncated", digest, signature[:63]),
        ("padded", digest, signature + b"\0"),
        ("short digest", digest[:31], signature),
    ]


@settings(max_examples=60, deadline=None)
@given(secret=secrets, other=secrets, digest=digests, bit=st.integers(0, 511))
def test_backends_agree_on_signatures(secret: bytes, other: bytes, digest: bytes, bit: int) -> None:
    signer, stranger = Identity.from_secret(secret), Identity.from_secret(other)
    signature = signer.sign(digest)
    for name, message, candidate in variants(signature, digest, bit):
        for key in (signer.public_key, stranger.public_key):
            expected = reference_accepts(key, message, candidate)
            assert fast_accepts(key, message, candidate) == expected, name
    assert fast_accepts(signer.public_key, digest, signature)
    assert not fast_accepts(signer.public_key, digest, scalars(0, 1))


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from([2, 3, 4, 0]), x=st.binary(min_size=32, max_size=32), digest=digests)
def test_backends_agree_on_keys(prefix: int, x: bytes, digest: bytes) -> None:
    signature = Identity.from_secret(hashlib.sha256(x).digest()).sign(digest)
    key = bytes([prefix]) + x
    assert fast_accepts(key, digest, signature) == reference_accepts(key, digest, signature)


def test_a_coordinate_beyond_the_field_is_no_peer_id() -> None:
    not_on_curve = bytes([2]) + (2**256 - 1).to_bytes(32, "big")  # x >= p
    with pytest.raises(DecodeError):
        peer_id_from_public_key(not_on_curve)
