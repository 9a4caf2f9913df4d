"""Hostile input to the codec: every malformed payload raises DecodeError naming the problem."""

from __future__ import annotations

import cbor2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.config import Limits
from p2pfl.core import lossy as _lossy  # noqa: F401  (every codec is fuzzed, whatever runs first)
from p2pfl.core.codec import CODECS, DTYPES, MAGIC, decode_state, encode_state
from p2pfl.errors import DecodeError

VALID = encode_state({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
PREFIX = 9  # magic (4) + version (1) + manifest length (4)


def payload(manifest: bytes | object, data: bytes = b"", *, version: int = 1) -> bytes:
    """Frame ``manifest`` (raw CBOR bytes, or a value to encode) and ``data`` as the codec does."""
    raw = manifest if isinstance(manifest, bytes) else cbor2.dumps(manifest, canonical=True)
    return MAGIC + bytes([version]) + len(raw).to_bytes(4, "little") + raw + data


def entry(name: object = "a", dtype: object = "float32", shape: object = (1,)) -> list:
    return [name, dtype, list(shape) if isinstance(shape, tuple) else shape]


FOUR = b"\x00" * 4
# Hand-written CBOR for items cbor2 would not produce on its own.
ENTRY_HEAD = b"\x83\x61a\x67float32"  # [ "a", "float32", ...
PICKLE_OF_EMPTY_LIST = b"\x80\x04\x95\x04\x00\x00\x00\x00\x00\x00\x00]\x94."

HOSTILE = [
    ("empty", b"", "empty"),
    ("truncated-magic", MAGIC[:2], "truncated"),
    ("truncated-prefix", VALID[:7], "truncated"),
    ("truncated-manifest", VALID[:12], "truncated manifest"),
    ("truncated-data", VALID[:-1], "truncated tensor data"),
    ("trailing-bytes", VALID + b"\x00", "trailing"),
    ("trailing-in-manifest", payload(cbor2.dumps([entry()]) + b"\x00", FOUR), "trailing"),
    ("bad-magic", b"XXXX" + VALID[4:], "magic"),
    ("bad-version", VALID[:4] + b"\x02" + VALID[5:], "version"),
    ("pickle-stream", PICKLE_OF_EMPTY_LIST, "magic"),
    ("torch-save-zip", b"PK\x03\x04" + b"\x00" * 40, "magic"),
    ("unknown-dtype", payload([entry(dtype="complex64")], FOUR * 2), "unknown dtype"),
    ("object-dtype", payload([entry(dtype="object")], FOUR), "unknown dtype"),
    ("dtype-not-text", payload([entry(dtype=4)], FOUR), "dtype"),
    ("shape-longer-than-data", payload([entry(shape=(3,))], FOUR * 2), "truncated tensor data"),
    ("declares-240MB-sends-none", payload([entry(shape=(60_000_000,))]), "truncated tensor"),
    ("shape-shorter-than-data", payload([entry(shape=(1,))], FOUR * 2), "trailing"),
    ("negative-dimension", payload([entry(shape=(-1,))], FOUR), "negative"),
    ("huge-dimension", payload([entry(shape=(2**40,))]), "too large"),
    ("max-uint64-dimension", payload([entry(shape=(2**64 - 1,))]), "too large"),
    ("overflowing-product", payload([entry(shape=(2**20, 2**20, 2**20))]), "too large"),
    ("huge-dims-beside-zero", payload([entry(shape=(0, 2**62, 2**62))]), "too large"),
    ("too-many-tensors", payload(b"\x9a\x00\x01\x00\x00"), "too many tensors"),
    ("uint64-tensor-count", payload(b"\x9b" + b"\xff" * 8), "too many tensors"),
    ("too-many-dims", payload([entry(shape=(1,) * 9)], FOUR), "too many dimensions"),
    ("duplicate-names", payload([entry(), entry()], FOUR * 2), "duplicate"),
    ("unsorted-names", payload([entry("b"), entry("a")], FOUR * 2), "unsorted"),
    ("int-name", payload([entry(name=7)], FOUR), "tensor name"),
    ("bytes-name", payload([entry(name=b"a")], FOUR), "byte string"),
    ("null-name", payload([entry(name=None)], FOUR), "null"),
    ("over-long-name", payload([entry(name="n" * 257)], FOUR), "too long"),
    ("invalid-utf8-name", payload(b"\x81\x83\x61\xff\x67float32\x81\x01", FOUR), "UTF-8"),
    ("self-describe-tag", payload(b"\xd9\xd9\xf7" + cbor2.dumps([entry()]), FOUR), "tag"),
    ("datetime-tag-name", payload(b"\x81\x83\xc0\x61a\x67float32\x81\x01", FOUR), "tag"),
    ("bignum-tag-dim", payload(b"\x81" + ENTRY_HEAD + b"\x81\xc2\x41\x01", FOUR), "tag"),
    ("indefinite-manifest", payload(b"\x9f" + cbor2.dumps(entry()) + b"\xff", FOUR), "indefinite"),
    ("indefinite-name", payload(b"\x81\x83\x7f\x61a\xff\x67float32\x81\x01", FOUR), "indefinite"),
    ("indefinite-shape", payload(b"\x81" + ENTRY_HEAD + b"\x9f\x01\xff", FOUR), "indefinite"),
    ("nested-name", payload([entry(name=["a"])], FOUR), "array"),
    ("nested-dimension", payload([entry(shape=[[1]])], FOUR), "array"),
    ("map-entry", payload([{"name": "a"}], FOUR), "map"),
    ("map-manifest", payload({"a": ["float32", [1]]}, FOUR), "map"),
    ("four-field-entry", payload([[*entry(), 0]], FOUR), "fields"),
    ("two-field-entry", payload([["a", "float32"]], FOUR), "3 fields"),
    ("entry-not-array", payload(["a"], FOUR), "text string"),
    ("float-dimension", payload([entry(shape=[1.0])], FOUR), "float"),
    ("half-float-dimension", payload(b"\x81" + ENTRY_HEAD + b"\x81\xf9\x3c\x00", FOUR), "float"),
    ("bool-dimension", payload([entry(shape=[True])], FOUR), "bool"),
    ("null-dimension", payload([entry(shape=[None])], FOUR), "null"),
    ("overlong-int", payload(b"\x81" + ENTRY_HEAD + b"\x81\x18\x01", FOUR), "non-canonical"),
    ("overlong-length", payload(b"\x98\x01" + cbor2.dumps(entry()), FOUR), "non-canonical"),
    ("reserved-head", payload(b"\x81" + ENTRY_HEAD + b"\x81\x1c", FOUR), "malformed"),
    ("break-as-item", payload(b"\x81" + ENTRY_HEAD + b"\xff", FOUR), "break"),
    ("huge-manifest-length", MAGIC + b"\x01\xff\xff\xff\xff", "manifest too large"),
    ("invalid-bool-data", payload([entry(dtype="bool", shape=(2,))], b"\x01\x02"), "bool"),
]


@pytest.mark.parametrize(("data", "word"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_input_raises_decode_error_naming_the_problem(data: bytes, word: str) -> None:
    with pytest.raises(DecodeError, match=word):
        decode_state(data)


def test_payload_above_the_byte_limit_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="payload too large"):
        decode_state(b"\x00" * 101, limits=Limits(max_payload_bytes=100))


@pytest.mark.parametrize(
    "data", ["text", 12, None, memoryview(b"abcdef")[::2]], ids=["str", "int", "none", "strided"]
)
def test_non_bytes_input_raises_decode_error(data: object) -> None:
    with pytest.raises(DecodeError, match="bytes-like"):
        decode_state(data)  # type: ignore[arg-type]


def test_a_hostile_case_differs_from_a_valid_one_only_where_intended() -> None:
    # Guards the table above: the framing helper builds payloads that do decode.
    assert torch.equal(decode_state(payload([entry()], FOUR))["a"], torch.zeros(1))


# ---------------------------------------------------------------- properties

SAMPLES = [
    encode_state({}),
    VALID,
    encode_state({name: torch.arange(3).to(dtype) for name, dtype in DTYPES.items()}),
    encode_state({"w": torch.randn(4, 2), "b": torch.tensor(1.5), "e": torch.empty(0, 3)}),
]


def check_total(data: bytes) -> None:
    """Decode ``data``: a DecodeError is fine; success must yield the one canonical encoding."""
    try:
        state = decode_state(data, limits=Limits(max_payload_bytes=1 << 16))
    except DecodeError:
        return
    assert all(isinstance(t, torch.Tensor) and t.dtype in DTYPES.values() for t in state.values())
    assert encode_state(state) == data


@settings(max_examples=700, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    check_total(data)


@settings(max_examples=700, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 80))
def test_random_manifests_never_raise_anything_else(body: bytes, declared: int) -> None:
    check_total(MAGIC + b"\x01" + declared.to_bytes(4, "little") + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "cross"]))
    at = draw(st.integers(0, len(data)))
    if kind == "flip" and at < len(data):
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "splice":
        data[at : at + draw(st.integers(0, 16))] = draw(st.binary(max_size=16))
    elif kind == "cross":
        other = draw(st.sampled_from(SAMPLES))
        data[at:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


@settings(max_examples=2000, deadline=None)
@given(mutated())
def test_mutated_payloads_decode_canonically_or_raise_decode_error(data: bytes) -> None:
    check_total(data)


def test_some_mutations_of_tensor_bytes_still_decode() -> None:
    data = bytearray(VALID)
    data[-1] ^= 0x80  # flip the sign of the last float32
    assert decode_state(bytes(data))["a"][1, 2].item() == -5.0


# ---------------------------------------------------------------- every registered codec


@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_registered_codec_refuses_junk_with_a_decode_error(name: str, data: st.DataObject) -> None:
    # A new codec (fp16, int8, topk) gets this for free: mutations of its own output.
    codec = CODECS[name]
    blob = bytearray(codec.encode({"w": torch.randn(4, 3), "b": torch.arange(3), "e": torch.empty(0)}))
    at = data.draw(st.integers(0, len(blob) - 1))
    if data.draw(st.booleans()):
        del blob[at:]
    else:
        blob[at] ^= 1 << data.draw(st.integers(0, 7))
    try:
        state = codec.decode(bytes(blob), limits=Limits(max_payload_bytes=1 << 12))
    except DecodeError:
        return
    assert all(isinstance(t, torch.Tensor) for t in state.values())
