"""Signed update headers, gossip announcements, strict decoding and the update ledger."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.config import Limits
from p2pfl.core.crypto import Identity
from p2pfl.core.envelope import (
    PROTOCOL_VERSION,
    AnnouncementKind,
    PayloadHasher,
    UpdateHeader,
    VerifiedHeader,
    check_payload,
    encode_announcement,
    parse_announcement,
    sign_update,
    verify_header,
)
from p2pfl.core.ledger import Observation, UpdateLedger
from p2pfl.errors import (
    ConfigError,
    DecodeError,
    DigestMismatch,
    InvalidSignature,
    P2PFLError,
    SignerMismatch,
    UnknownCodec,
    UnsupportedVersion,
    WrongNetwork,
)

NET = "digits-demo"
PAYLOAD = b"\x01\x02tensor bytes" * 50
ALICE = Identity.from_secret(hashlib.sha256(b"alice").digest())
BOB = Identity.from_secret(hashlib.sha256(b"bob").digest())


def signed(identity: Identity = ALICE, **overrides: Any) -> VerifiedHeader:
    args: dict[str, Any] = {
        "network_id": NET,
        "round": 3,
        "payload": PAYLOAD,
        "samples": 120,
        "ts_ms": 1_700_000_000_000,
    }
    args.update(overrides)
    return sign_update(identity, **args)


def header_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "net": NET,
        "from": ALICE.peer_id,
        "round": 3,
        "digest": hashlib.sha256(PAYLOAD).digest(),
        "size": len(PAYLOAD),
        "samples": 120,
        "ts_ms": 5,
        "codec": "raw",
    }
    fields.update(overrides)
    return fields


def sign_bytes(header_bytes: bytes, identity: Identity = ALICE) -> tuple[bytes, bytes]:
    """Sign arbitrary header bytes properly, so only decoding can reject them."""
    return header_bytes, identity.sign(hashlib.sha256(header_bytes).digest())


# --- signing and verification --------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    update = signed()
    verified = verify_header(update.header_bytes, update.signature, network_id=NET)
    assert verified == update
    header = verified.header
    assert (header.version, header.network_id, header.sender) == (1, NET, ALICE.peer_id)
    assert (header.round, header.samples, header.codec) == (3, 120, "raw")
    assert header.digest == hashlib.sha256(PAYLOAD).digest()
    assert header.size == len(PAYLOAD)
    assert verified.header_digest == hashlib.sha256(update.header_bytes).digest()
    check_payload(verified, PAYLOAD)
    check_payload(verified, memoryview(bytearray(PAYLOAD)))


def test_encoding_is_canonical_and_deterministic() -> None:
    first, second = signed(), signed()
    assert first.header_bytes == second.header_bytes
    assert first.signature == second.signature  # RFC 6979: no randomness
    assert first.header_bytes == cbor2.dumps(header_fields(ts_ms=1_700_000_000_000), canonical=True)
    reordered = dict(reversed(list(cbor2.loads(first.header_bytes).items())))
    assert cbor2.dumps(reordered, canonical=True) == first.header_bytes
    assert encode_announcement(AnnouncementKind.UPDATE, first) == encode_announcement(
        AnnouncementKind.UPDATE, second
    )
    assert len(encode_announcement(AnnouncementKind.HOLDS, first)) < 300


def test_check_payload_catches_size_and_digest_mismatch() -> None:
    update = signed()
    with pytest.raises(DigestMismatch, match="bytes"):
        check_payload(update, PAYLOAD + b"\x00")
    flipped = bytearray(PAYLOAD)
    flipped[7] ^= 1
    with pytest.raises(DigestMismatch, match="sha256"):
        check_payload(update, bytes(flipped))


@pytest.mark.parametrize(
    "overrides",
    [
        {"round": -1},
        {"samples": -5},
        {"ts_ms": -1},
        {"round": True},
        {"samples": 1.5},
        {"round": 1 << 64},
        {"network_id": ""},
        {"codec": ""},
        {"network_id": b"net"},
    ],
)
def test_sign_update_rejects_bad_fields(overrides: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        signed(**overrides)


def test_verify_errors_each_have_their_class() -> None:
    update = signed()
    with pytest.raises(WrongNetwork):
        verify_header(update.header_bytes, update.signature, network_id="other-net")
    with pytest.raises(InvalidSignature):
        verify_header(update.header_bytes, signed(round=4).signature, network_id=NET)
    # Bob signs a header that claims to come from Alice.
    forged = sign_bytes(cbor2.dumps(header_fields(), canonical=True), BOB)
    with pytest.raises(InvalidSignature):
        verify_header(*forged, network_id=NET)
    future = sign_bytes(cbor2.dumps(header_fields(v=2, extra="x"), canonical=True))
    with pytest.raises(UnsupportedVersion):
        verify_header(*future, network_id=NET)
    with pytest.raises(InvalidSignature):
        verify_header(update.header_bytes, update.signature[:-1], network_id=NET)


BAD_HEADERS: list[tuple[str, bytes]] = [
    (
        "missing key",
        cbor2.dumps({k: v for k, v in header_fields().items() if k != "codec"}, canonical=True),
    ),
    ("extra key", cbor2.dumps(header_fields(extra=1), canonical=True)),
    (
        "no version",
        cbor2.dumps({k: v for k, v in header_fields().items() if k != "v"}, canonical=True),
    ),
    ("negative round", cbor2.dumps(header_fields(round=-1), canonical=True)),
    ("negative version", cbor2.dumps(header_fields(v=-1), canonical=True)),
    ("round as text", cbor2.dumps(header_fields(round="3"), canonical=True)),
    ("bool samples", cbor2.dumps(header_fields(samples=True), canonical=True)),
    ("null codec", cbor2.dumps(header_fields(codec=None), canonical=True)),
    ("float ts", cbor2.dumps(header_fields(ts_ms=1.0), canonical=True)),
    ("short digest", cbor2.dumps(header_fields(digest=b"\x00" * 31), canonical=True)),
    ("digest as text", cbor2.dumps(header_fields(digest="ab" * 16), canonical=True)),
    ("garbage sender", cbor2.dumps(header_fields(**{"from": "not-a-peer"}), canonical=True)),
    ("sender as bytes", cbor2.dumps(header_fields(**{"from": b"\x00\x25"}), canonical=True)),
    ("tagged bignum", cbor2.dumps(header_fields(size=1 << 70), canonical=True)),
    (
        "datetime tag",
        cbor2.dumps(
            header_fields(ts_ms=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)), canonical=True
        ),
    ),
    ("raw tag", cbor2.dumps(header_fields(round=cbor2.CBORTag(99, 3)), canonical=True)),
    ("nested list", cbor2.dumps(header_fields(codec=["raw"]), canonical=True)),
    ("not a map", cbor2.dumps([1, 2, 3])),
    ("empty", b""),
    ("non-canonical order", cbor2.dumps(dict(reversed(list(header_fields().items()))))),
    ("trailing byte", cbor2.dumps(header_fields(), canonical=True) + b"\x00"),
    ("truncated", cbor2.dumps(header_fields(), canonical=True)[:-1]),
    ("non-text key", cbor2.dumps({**header_fields(), 1: 2}, canonical=True)),
]


def _patched_header(old: bytes, new: bytes) -> bytes:
    data = cbor2.dumps(header_fields(), canonical=True)
    assert data.count(old) == 1
    return data.replace(old, new)


BAD_HEADERS += [
    # map head 0xa9 (9 entries) -> 0xbf (indefinite) + break at the end
    ("indefinite map", b"\xbf" + cbor2.dumps(header_fields(), canonical=True)[1:] + b"\xff"),
    ("non-minimal int", _patched_header(b"\x65round\x03", b"\x65round\x18\x03")),
    ("invalid utf-8", _patched_header(b"\x63raw", b"\x63r\xffw")),
    # 10 entries: the canonical 9 followed by "v": 1 once more
    ("duplicate key", b"\xaa" + cbor2.dumps(header_fields(), canonical=True)[1:] + b"\x61v\x01"),
    ("huge declared length", b"\xa9\x63net\x5b" + (1 << 62).to_bytes(8, "big")),
    ("huge entry count", b"\xbb" + (1 << 62).to_bytes(8, "big")),
]


@pytest.mark.parametrize(("reason", "header_bytes"), BAD_HEADERS, ids=[r for r, _ in BAD_HEADERS])
def test_malformed_header_is_decode_error(reason: str, header_bytes: bytes) -> None:
    with pytest.raises(DecodeError):
        verify_header(*sign_bytes(header_bytes), network_id=NET)


def test_update_header_is_frozen() -> None:
    header = signed().header
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.round = 9  # type: ignore[misc]
    assert isinstance(header, UpdateHeader)


# --- announcements --------------------------------------------------------------------


def test_announcement_round_trip_update_and_holds() -> None:
    update = signed()
    parsed = parse_announcement(
        ALICE.peer_id, encode_announcement(AnnouncementKind.UPDATE, update), network_id=NET
    )
    assert (parsed.kind, parsed.update, parsed.origin) == (
        AnnouncementKind.UPDATE,
        update,
        ALICE.peer_id,
    )
    holds = encode_announcement(AnnouncementKind.HOLDS, update)
    relayed = parse_announcement(BOB.peer_id, holds, network_id=NET)
    assert (relayed.kind, relayed.origin, relayed.update) == (
        AnnouncementKind.HOLDS,
        BOB.peer_id,
        update,
    )
    assert parse_announcement(BOB.peer_id, memoryview(holds), network_id=NET).update == update


def test_update_announced_by_someone_else_is_signer_mismatch() -> None:
    data = encode_announcement(AnnouncementKind.UPDATE, signed())
    with pytest.raises(SignerMismatch):
        parse_announcement(BOB.peer_id, data, network_id=NET)


def test_oversize_announcement_is_refused_before_decoding() -> None:
    data = encode_announcement(AnnouncementKind.UPDATE, signed())
    small = Limits(max_message_bytes=len(data) - 1)
    with pytest.raises(DecodeError, match="bytes >"):
        parse_announcement(ALICE.peer_id, data, network_id=NET, limits=small)
    with pytest.raises(DecodeError, match="bytes >"):
        parse_announcement(ALICE.peer_id, b"\xff" * 4097, network_id=NET)


def test_malformed_announcements_are_decode_errors() -> None:
    update = signed()
    h, s = update.header_bytes, update.signature
    for fields in [
        {"t": 3, "h": h, "s": s},
        {"t": 0, "h": h, "s": s},
        {"t": "1", "h": h, "s": s},
        {"t": 1, "h": h},
        {"t": 1, "h": h, "s": s, "x": 0},
        {"t": 1, "h": h.hex(), "s": s},
        {"t": 1, "h": h, "s": s.hex()},
    ]:
        with pytest.raises(DecodeError):
            parse_announcement(ALICE.peer_id, cbor2.dumps(fields, canonical=True), network_id=NET)
    with pytest.raises(DecodeError, match="canonical"):
        parse_announcement(ALICE.peer_id, cbor2.dumps({"s": s, "h": h, "t": 1}), network_id=NET)


def test_every_flipped_bit_is_caught() -> None:
    data = encode_announcement(AnnouncementKind.UPDATE, signed())
    survivors = []
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            parse_announcement(ALICE.peer_id, bytes(mutated), network_id=NET)
        except P2PFLError:
            continue
        survivors.append(bit)
    assert survivors == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_p2pfl_errors(data: bytes) -> None:
    with pytest.raises(P2PFLError):
        parse_announcement(ALICE.peer_id, data, network_id=NET)


_SCALARS = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.text(max_size=60),
    st.binary(max_size=70),
    st.booleans(),
    st.none(),
    st.floats(),
)
_HOSTILE_HEADER = st.dictionaries(
    st.sampled_from(sorted(header_fields()) + ["x", "t"]),
    st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3)),
    max_size=11,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_HOSTILE_HEADER, st.booleans())
def test_structured_junk_raises_only_p2pfl_errors(fields: dict[str, Any], canonical: bool) -> None:
    header_bytes, signature = sign_bytes(cbor2.dumps(fields, canonical=canonical))
    data = cbor2.dumps({"t": 1, "h": header_bytes, "s": signature}, canonical=True)
    try:
        parse_announcement(ALICE.peer_id, data, network_id=NET)
    except P2PFLError:
        return
    # Only a genuinely well-formed header may pass, and then it must re-encode exactly.
    assert fields.keys() == header_fields().keys()


# --- ledger -------------------------------------------------------------------------


def digest(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(4, "big")).digest()


def test_ledger_new_duplicate_equivocation() -> None:
    ledger = UpdateLedger()
    assert ledger.observe("a", 1, digest(1)) is Observation.NEW
    assert ledger.observe("a", 1, digest(1)) is Observation.DUPLICATE
    assert not ledger.equivocated("a")
    assert ledger.observe("a", 1, digest(2)) is Observation.EQUIVOCATION
    assert ledger.equivocated("a")
    assert ledger.digests("a", 1) == (digest(1), digest(2))
    assert ledger.observe("a", 1, digest(2)) is Observation.DUPLICATE
    assert ledger.observe("b", 1, digest(2)) is Observation.NEW  # senders are independent
    assert ledger.digests("nobody", 1) == ()


def test_ledger_detects_replay_across_rounds() -> None:
    ledger = UpdateLedger()
    assert ledger.observe("a", 1, digest(1)) is Observation.NEW
    assert ledger.observe("a", 2, digest(1)) is Observation.REPLAY
    assert ledger.observe("a", 2, digest(1)) is Observation.REPLAY  # not recorded as the round's
    assert ledger.digests("a", 2) == ()
    assert ledger.observe("a", 2, digest(2)) is Observation.NEW
    assert ledger.observe("a", 0, digest(2)) is Observation.REPLAY


def test_ledger_stale_boundary_and_forgetting() -> None:
    ledger = UpdateLedger(window=3)
    assert ledger.observe("a", 10, digest(10)) is Observation.NEW
    assert ledger.observe("a", 7, digest(7)) is Observation.NEW  # 10 - 3: still covered
    assert ledger.observe("a", 6, digest(6)) is Observation.STALE
    assert ledger.observe("a", 11, digest(11)) is Observation.NEW
    assert ledger.digests("a", 7) == ()  # pruned once round 11 arrived
    assert ledger.observe("a", 7, digest(7)) is Observation.STALE
    assert ledger.observe("a", 20, digest(20)) is Observation.NEW
    assert ledger.observe("a", 21, digest(10)) is Observation.NEW  # forgotten: outside the window


def test_ledger_bounds_senders_least_recently_seen_first() -> None:
    ledger = UpdateLedger(max_senders=3)
    for sender in "abc":
        ledger.observe(sender, 1, digest(1))
    ledger.observe("a", 2, digest(2))  # "a" is now the most recent
    ledger.observe("d", 1, digest(1))
    assert len(ledger) == 3
    assert ledger.digests("b", 1) == ()
    assert ledger.digests("a", 2) == (digest(2),)


def test_ledger_caps_digests_of_an_equivocation_flood() -> None:
    ledger = UpdateLedger()
    results = [ledger.observe("a", 1, digest(n)) for n in range(100)]
    assert results[0] is Observation.NEW
    assert set(results[1:]) == {Observation.EQUIVOCATION}
    assert len(ledger.digests("a", 1)) == 4


@pytest.mark.parametrize(
    ("window", "max_senders"), [(-1, 10), (8, 0), (8, -1), (True, 10), (1.5, 10)]
)
def test_ledger_rejects_bad_settings(window: Any, max_senders: Any) -> None:
    with pytest.raises(ConfigError):
        UpdateLedger(window=window, max_senders=max_senders)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(0, 40), st.integers(0, 6)), max_size=200
    )
)
def test_ledger_memory_stays_bounded(events: list[tuple[str, int, int]]) -> None:
    ledger = UpdateLedger(window=4, max_senders=3)
    for sender, round_, n in events:
        ledger.observe(sender, round_, digest(n))
        assert len(ledger) <= 3
    for sender in "abcde":
        remembered = [r for r in range(41) if ledger.digests(sender, r)]
        assert len(remembered) <= 5
        assert all(len(ledger.digests(sender, r)) <= 4 for r in remembered)


def test_holds_with_a_bad_signature_is_invalid_signature() -> None:
    update = signed()
    forged = VerifiedHeader(update.header, update.header_bytes, signed(round=4).signature)
    data = encode_announcement(AnnouncementKind.HOLDS, forged)
    with pytest.raises(InvalidSignature):
        parse_announcement(BOB.peer_id, data, network_id=NET)


# --- the codec named in the header ---------------------------------------------------


def test_a_header_naming_an_unknown_codec_is_refused_at_parse_time() -> None:
    header_bytes, signature = sign_bytes(cbor2.dumps(header_fields(codec="zstd"), canonical=True))
    with pytest.raises(UnknownCodec, match="'zstd'"):
        verify_header(header_bytes, signature, network_id=NET)
    announcement = cbor2.dumps({"t": 1, "h": header_bytes, "s": signature}, canonical=True)
    with pytest.raises(DecodeError, match="unknown codec 'zstd'"):  # INVALID_FORMAT evidence
        parse_announcement(ALICE.peer_id, announcement, network_id=NET)


def test_an_update_cannot_be_signed_with_an_unknown_codec() -> None:
    with pytest.raises(UnknownCodec, match="this node decodes bf16, fp16, int8, raw, topk"):
        signed(codec="fp8")
    assert signed(codec="raw").header.codec == "raw"


# ---------------------------------------------------------------- assembling a received payload


@pytest.mark.parametrize("size", [0, 5, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 7])
@pytest.mark.parametrize("announced", [True, False])
def test_payload_hasher_assembles_and_hashes_what_arrived(size: int, announced: bool) -> None:
    data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    hasher = PayloadHasher(size=size) if announced else PayloadHasher()
    chunks = [data[i : i + 700_001] for i in range(0, size, 700_001)]
    for chunk in chunks:
        hasher.add(chunk)
    chunks.clear()  # the chunks may go as soon as they are added
    payload = hasher.finish()
    assert type(payload.data) is bytes
    assert payload.data == data
    assert payload.digest == hashlib.sha256(data).digest()
    assert hash(payload.data) == hash(data)
    assert payload.data[1:3] == data[1:3]


def test_payload_hasher_refuses_more_or_fewer_bytes_than_announced() -> None:
    size = 1 << 20
    over = PayloadHasher(size=size)
    over.add(bytes(size))
    with pytest.raises(ValueError, match="exceed"):
        over.add(b"x")
    short = PayloadHasher(size=size)
    short.add(bytes(size - 1))
    with pytest.raises(ValueError, match="expected"):
        short.finish()
