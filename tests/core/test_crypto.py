"""Identities, signatures and PeerIds: agreement with py-libp2p, key files, rejection."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import ecdsa
import pytest
from ecdsa.util import sigdecode_der, sigencode_der
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from libp2p.crypto.secp256k1 import Secp256k1PublicKey, create_new_key_pair
from libp2p.peer.id import ID

from p2pfl.core import crypto
from p2pfl.core.crypto import (
    Identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_by_peer_id,
    verify_signature,
)
from p2pfl.errors import DecodeError, InvalidSignature, KeyFileError

ORDER = ecdsa.SECP256k1.order
DIGEST = hashlib.sha256(b"header bytes").digest()
SECRETS = [
    (1).to_bytes(32, "big"),
    (ORDER - 1).to_bytes(32, "big"),
    bytes(range(32)),
    hashlib.sha256(b"node-a").digest(),
    hashlib.sha256(b"node-b").digest(),
]


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.from_secret(hashlib.sha256(b"fixture").digest())


@pytest.mark.parametrize("secret", SECRETS)
def test_peer_id_matches_py_libp2p(secret: bytes) -> None:
    ours = Identity.from_secret(secret)
    key_pair = create_new_key_pair(secret)
    assert ours.peer_id == ID.from_pubkey(key_pair.public_key).to_base58()
    assert ours.public_key == key_pair.public_key.to_bytes()
    assert ours.peer_id.startswith("16Uiu2")
    assert ID.from_base58(ours.peer_id).to_bytes()[-33:] == ours.public_key


@pytest.mark.parametrize("secret", SECRETS)
def test_signatures_agree_with_py_libp2p_both_ways(secret: bytes) -> None:
    ours = Identity.from_secret(secret)
    key_pair = create_new_key_pair(secret)
    data = b"some header bytes" + secret
    digest = hashlib.sha256(data).digest()
    # libp2p (libsecp256k1) signs sha256(data) with RFC 6979 and low-S, DER-encoded.
    r, s = sigdecode_der(key_pair.private_key.sign(data), ORDER)
    theirs = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    signature = ours.sign(digest)
    assert signature == theirs
    verify_signature(ours.public_key, digest, theirs)
    der = sigencode_der(*ecdsa.util.sigdecode_string(signature, ORDER), ORDER)
    assert Secp256k1PublicKey.from_bytes(ours.public_key).verify(data, der)


def test_sign_is_deterministic_64_bytes_and_low_s(identity: Identity) -> None:
    signatures = {identity.sign(hashlib.sha256(bytes([i])).digest()) for i in range(20)}
    assert len(signatures) == 20
    assert identity.sign(DIGEST) == identity.sign(DIGEST)
    for signature in signatures:
        assert len(signature) == 64
        assert int.from_bytes(signature[32:], "big") <= ORDER // 2


def test_verify_round_trip_and_by_peer_id(identity: Identity) -> None:
    signature = identity.sign(DIGEST)
    verify_signature(identity.public_key, DIGEST, signature)
    verify_by_peer_id(identity.peer_id, DIGEST, signature)


def test_high_s_twin_is_rejected(identity: Identity) -> None:
    signature = identity.sign(DIGEST)
    s = int.from_bytes(signature[32:], "big")
    twin = signature[:32] + (ORDER - s).to_bytes(32, "big")  # mathematically valid too
    with pytest.raises(InvalidSignature, match="high-S"):
        verify_signature(identity.public_key, DIGEST, twin)


def test_invalid_signatures_raise_invalid_signature(identity: Identity) -> None:
    signature = identity.sign(DIGEST)
    other = Identity.from_secret(SECRETS[3])
    bad_point = b"\x02" + b"\xff" * 32  # x >= field prime: not a point
    cases = [
        (identity.public_key, hashlib.sha256(b"other").digest(), signature),
        (other.public_key, DIGEST, signature),
        (identity.public_key, DIGEST, signature[:63]),
        (identity.public_key, DIGEST[:31], signature),
        (identity.public_key, DIGEST, bytes(32) + signature[32:]),  # r = 0
        (identity.public_key, DIGEST, signature[:32] + bytes(32)),  # s = 0
        (identity.public_key, DIGEST, ORDER.to_bytes(32, "big") + signature[32:]),  # r = n
        (bad_point, DIGEST, signature),
        (identity.public_key[1:], DIGEST, signature),
        (b"\x04" + identity.public_key[1:], DIGEST, signature),
    ]
    for public_key, digest, sig in cases:
        with pytest.raises(InvalidSignature):
            verify_signature(public_key, digest, sig)


def test_public_key_peer_id_round_trip(identity: Identity) -> None:
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id


def test_public_key_from_peer_id_rejects_non_secp256k1_ids(identity: Identity) -> None:
    ed25519_id = ID.from_pubkey(ed25519_key_pair(b"\x01" * 32).public_key).to_base58()
    bad_point_id = crypto._b58encode(crypto._PEER_ID_PREFIX + b"\x02" + b"\xff" * 32)
    for peer_id in [
        ed25519_id,
        bad_point_id,
        "",
        "0OIl",  # outside the base58 alphabet
        identity.peer_id[:-1],
        identity.peer_id + "1",
        "1" + identity.peer_id,
        identity.peer_id * 2,
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash id
    ]:
        with pytest.raises(DecodeError):
            public_key_from_peer_id(peer_id)
    with pytest.raises(DecodeError):
        verify_by_peer_id(ed25519_id, DIGEST, identity.sign(DIGEST))


def test_base58_matches_reference_vectors() -> None:
    assert crypto._b58encode(b"") == ""
    assert crypto._b58encode(b"\0\0\x01") == "112"
    assert crypto._b58encode(b"hello world") == "StV1DL6CwTryKyV"
    for data in [b"", b"\0", b"\0\0abc", os.urandom(39)]:
        assert crypto._b58decode(crypto._b58encode(data)) == data


def test_verifying_keys_are_cached_and_bounded(identity: Identity) -> None:
    signature = identity.sign(DIGEST)
    verify_by_peer_id(identity.peer_id, DIGEST, signature)
    hits = crypto._verifying_key.cache_info().hits
    verify_by_peer_id(identity.peer_id, DIGEST, signature)
    assert crypto._verifying_key.cache_info().hits > hits
    assert crypto._verifying_key.cache_info().maxsize == 4096


def test_generate_uses_the_given_entropy() -> None:
    def fixed(n: int) -> bytes:
        return b"\x07" * n

    assert Identity.generate(fixed).peer_id == Identity.generate(fixed).peer_id
    assert Identity.generate().peer_id != Identity.generate().peer_id
    # Extremes of the 48-byte input still map into [1, n-1].
    for byte in (b"\x00", b"\xff"):
        secret = Identity.generate(lambda n, b=byte: b * n).secret_bytes()
        assert 0 < int.from_bytes(secret, "big") < ORDER
    with pytest.raises(KeyFileError, match="expected 48"):
        Identity.generate(lambda n: b"\x01" * (n - 1))


def test_from_secret_round_trip_and_rejects_bad_scalars() -> None:
    assert Identity.from_secret(SECRETS[2]).secret_bytes() == SECRETS[2]
    for secret in [bytes(32), ORDER.to_bytes(32, "big"), b"\xff" * 32, b"\x01" * 31, b"\x01" * 33]:
        with pytest.raises(KeyFileError):
            Identity.from_secret(secret)


def test_sign_rejects_non_digest(identity: Identity) -> None:
    with pytest.raises(DecodeError):
        identity.sign(b"not a digest")


def test_repr_shows_peer_id_only(identity: Identity) -> None:
    secret = identity.secret_bytes()
    text = repr(identity) + str(identity)
    assert identity.peer_id in text
    assert secret.hex() not in text
    assert secret.hex().upper() not in text
    assert str(int.from_bytes(secret, "big")) not in text


def test_save_writes_0600_pem_atomically_and_loads_back(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "deep" / "er" / "node.key"
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert Identity.load(path).secret_bytes() == identity.secret_bytes()
    other = Identity.from_secret(SECRETS[4])
    other.save(str(path))  # overwrite in place
    assert Identity.load(str(path)).peer_id == other.peer_id
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.key"]  # no temp left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_refuses_key_readable_by_others(tmp_path: Path, identity: Identity, mode: int) -> None:
    path = tmp_path / "node.key"
    identity.save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=r"chmod 600"):
        Identity.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        Identity.load(tmp_path / "absent.key")


def _private_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x00\xff\xfe binary",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN EC PRIVATE KEY-----\n!!!!\n-----END EC PRIVATE KEY-----\n",
        b"A" * (65 * 1024),
    ],
)
def test_load_garbage_raises_key_file_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(KeyFileError):
        Identity.load(_private_file(tmp_path / "node.key", data))


def test_load_refuses_other_curves_and_directories(tmp_path: Path) -> None:
    nist = ecdsa.SigningKey.generate(curve=ecdsa.NIST256p).to_pem()
    with pytest.raises(KeyFileError, match="secp256k1"):
        Identity.load(_private_file(tmp_path / "nist.key", nist))
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        Identity.load(directory)


def test_save_into_unwritable_place_raises_key_file_error(
    tmp_path: Path, identity: Identity
) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(KeyFileError, match="cannot write"):
        identity.save(blocker / "node.key")  # parent is a regular file


def test_load_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "node.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        Identity.load(fifo)
