"""Lossy codecs: sizes and errors bounded, topk deltas exact on both sides, hostile parts refused."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.config import Limits
from p2pfl.core.codec import CODECS, decode_payload, encode_state
from p2pfl.core.lossy import (
    BASE,
    decode_positions,
    encode_int8,
    encode_positions,
    encode_topk_full,
    pack_bits,
    topk_delta,
    topk_full,
    unpack_bits,
)
from p2pfl.errors import DecodeError, MissingBase

STATE = {"w": torch.randn(64, 32), "b": torch.randn(32), "steps": torch.tensor(7)}
RAW_BYTES = len(encode_state(STATE))


@pytest.mark.parametrize(("codec", "ratio", "error"), [("fp16", 0.51, 1e-3), ("bf16", 0.51, 1e-2), ("int8", 0.31, 0.02)])
def test_quantising_codecs_shrink_and_stay_close(codec: str, ratio: float, error: float) -> None:
    data = CODECS[codec].encode(STATE)
    decoded = decode_payload(codec, data)
    assert len(data) <= ratio * RAW_BYTES
    assert decoded.keys() == STATE.keys()
    assert torch.equal(decoded["steps"], STATE["steps"])  # integers travel as they are
    assert decoded["w"].dtype == torch.float32
    assert all(float((decoded[k] - STATE[k]).abs().max()) <= error * float(STATE[k].abs().max()) for k in ("w", "b"))


def test_int8_per_tensor_sends_one_scale() -> None:
    per_tensor, per_channel = encode_int8(STATE, per_channel=False), encode_int8(STATE)
    assert len(per_tensor) < len(per_channel)
    assert torch.allclose(decode_payload("int8", per_tensor)["w"], STATE["w"], atol=0.05)


def with_base(parts: dict[str, torch.Tensor], digest: bytes) -> bytes:
    return encode_state({**parts, BASE: torch.frombuffer(bytearray(digest), dtype=torch.uint8)})


BASE_DIGEST = hashlib.sha256(b"base").digest()


def lookup(digest: bytes) -> dict[str, torch.Tensor] | None:
    return STATE if digest == BASE_DIGEST else None


def legacy_delta(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A version 1 topk delta (per tensor #m bitmask and float16 #v), as nodes before the packed one sent."""
    parts = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            parts[key] = tensor
            continue
        change = (tensor - reference[key]).reshape(-1)
        mask = torch.zeros(change.numel(), dtype=torch.bool)
        mask[change.abs().topk(max(1, change.numel() // 10)).indices] = True
        parts[f"{key}#m"], parts[f"{key}#v"] = pack_bits(mask), change[mask].half()
    return parts


def test_topk_delta_rebuilds_exactly_what_the_sender_expects_and_feeds_back_the_rest() -> None:
    target = {**STATE, "w": STATE["w"] + torch.randn(64, 32)}
    parts, rebuilt = topk_delta(target, STATE, 0.1)
    data = with_base(parts, BASE_DIGEST)
    # ~5 bits per position and 1 byte per value sent (10%): ~0.05 of 4 bytes per element.
    assert len(data) <= 0.065 * RAW_BYTES
    assert set(parts) == {"#i", "#q", "#s", "steps"}  # one packed delta, whatever the tensor count
    decoded = decode_payload("topk", data, base=lookup)
    assert all(torch.equal(decoded[k], rebuilt[k]) for k in STATE)
    # Error feedback: repeating the delta against the rebuilt model converges on the target,
    # int8 rounding included (it stays in the next difference).
    reference = rebuilt
    for _ in range(30):
        _, reference = topk_delta(target, reference, 0.1)
    assert float((reference["w"] - target["w"]).abs().max()) < 0.01


def test_topk_full_model_is_int8_and_its_rounding_is_fed_back() -> None:
    parts, rebuilt = topk_full(STATE)
    data = encode_topk_full(STATE)
    assert len(data) <= 0.31 * RAW_BYTES
    decoded = decode_payload("topk", data)
    assert all(torch.equal(decoded[k], rebuilt[k]) for k in STATE)  # the sender knows what receivers hold
    assert torch.equal(decoded["steps"], STATE["steps"])
    assert float((decoded["w"] - STATE["w"]).abs().max()) <= 0.01 * float(STATE["w"].abs().max())
    # The next delta starts from the rounded model: the rounding is part of the change.
    delta, _ = topk_delta(STATE, rebuilt, 0.1)
    assert bool(delta["#q"].ne(0).any())


def test_version_1_topk_payloads_still_decode() -> None:
    assert torch.equal(decode_payload("topk", encode_state(STATE))["w"], STATE["w"])  # the raw full model
    target = {**STATE, "w": STATE["w"] + torch.randn(64, 32)}
    decoded = decode_payload("topk", with_base(legacy_delta(target, STATE), BASE_DIGEST), base=lookup)
    changed = decoded["w"].ne(STATE["w"]).sum()
    assert int(changed) == 64 * 32 // 10
    assert float((decoded["w"] - STATE["w"]).abs().max()) > 0


def test_topk_without_the_base_is_a_missing_base_not_junk() -> None:
    parts, _ = topk_delta(STATE, STATE, 0.1)
    with pytest.raises(MissingBase):
        decode_payload("topk", with_base(parts, hashlib.sha256(b"other").digest()), base=lookup)
    with pytest.raises(MissingBase):
        decode_payload("topk", with_base(parts, BASE_DIGEST))  # no lookup at all


@settings(max_examples=200, deadline=None)
@given(bits=st.lists(st.booleans(), max_size=300), density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
def test_positions_round_trip(bits: list[bool], density: float) -> None:
    mask = torch.tensor(bits, dtype=torch.bool) if bits else torch.zeros(0, dtype=torch.bool)
    sparse = torch.rand(5000) < density
    tiny = torch.zeros(100_000, dtype=torch.bool)
    tiny[torch.randint(0, 100_000, (3,))] = True  # a few far-apart changes: the largest Rice parameter
    for each in (mask, sparse, tiny):
        assert torch.equal(decode_positions(encode_positions(each), int(each.sum()), each.numel()), each)


def test_positions_cost_about_half_a_bitmask_at_ten_percent() -> None:
    mask = torch.rand(100_000) < 0.1
    assert len(encode_positions(mask)) <= 0.6 * len(pack_bits(mask))


@pytest.mark.parametrize(
    ("stream", "count", "total", "word"),
    [
        ([2, 0, 0b1111], 3, 100, "codes 4 positions, expected 3"),  # shift 2: 3 x 2 low bits, then unary
        ([2, 0b1000000, 0b111], 3, 100, "padding"),
        ([0, 0b1], 1, 0, "1 positions of 0"),  # a position in an empty mask
        ([0, 0, 0, 0, 0b10000000], 1, 30, "beyond 30"),  # gap 31 in 30 elements
        ([25, 0, 1], 1, 100, "Rice parameter"),
        ([24] + [0] * 300 + [1], 100, 100, "with parameter 24"),  # 2,400 low bits for 100 elements
        ([0, 0b11], 2, 1, "2 positions of 1"),
        ([0, 0b1, 0], 1, 100, "expected 1"),  # trailing zero byte after the last position
        ([0] + [0] * 100 + [1], 1, 100, "cannot code"),  # longer than any gap in 100 elements needs
        ([0], 1, 100, "cannot code"),
        ([], 0, 100, "uint8 vector"),
    ],
)
def test_hostile_positions_are_refused(stream: list[int], count: int, total: int, word: str) -> None:
    with pytest.raises(DecodeError, match=word):
        decode_positions(torch.tensor(stream, dtype=torch.uint8), count, total)


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=64), count=st.integers(0, 200), total=st.integers(0, 400))
def test_random_position_streams_decode_exactly_or_raise_decode_error(stream: bytes, count: int, total: int) -> None:
    try:
        mask = decode_positions(torch.tensor(list(stream), dtype=torch.uint8), count, total)
    except DecodeError:
        return
    assert mask.shape == (total,)
    assert int(mask.sum()) == count


def test_bitmask_round_trips_and_refuses_padding() -> None:
    mask = torch.tensor([True, False, True] * 5)
    assert torch.equal(unpack_bits(pack_bits(mask), 15), mask)
    with pytest.raises(DecodeError, match="padding"):
        unpack_bits(torch.tensor([0, 0x80], dtype=torch.uint8), 15)
    with pytest.raises(DecodeError, match="bitmask"):
        unpack_bits(torch.tensor([0], dtype=torch.uint8), 15)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (lambda p: {**p, "#q": p["#q"][:-1]}, "#i"),
        (lambda p: {**p, "#q": p["#q"].float()}, "int8"),
        (lambda p: {k: v for k, v in p.items() if k != "#s"}, "#i, #q and #s"),
        (lambda p: {**p, "#s": p["#s"][:1]}, "2 finite float32 scales"),
        (lambda p: {**p, "#s": torch.tensor([1.0, float("inf")])}, "finite"),
        (lambda p: {**p, "#s": p["#s"].double()}, "float32"),
        (lambda p: {**p, "extra": torch.zeros(2)}, "names differ"),
        (lambda p: {k: v for k, v in p.items() if k != "steps"}, "names differ"),
        (lambda p: {**p, "b": torch.zeros(2)}, "names differ"),
        (lambda p: {**p, "#i": p["#i"][:-1]}, "#i"),
        (lambda p: {**p, "w#i": p["#i"]}, "names differ"),
    ],
)
def test_hostile_packed_topk_parts_are_refused(change, word: str) -> None:  # type: ignore[no-untyped-def]
    parts, _ = topk_delta({**STATE, "w": STATE["w"] + 1}, STATE, 0.1)
    with pytest.raises(DecodeError, match=word):
        decode_payload("topk", with_base(change(parts), BASE_DIGEST), base=lookup)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (lambda p: {**p, "w#v": p["w#v"][:-1]}, "value per mask bit"),
        (lambda p: {**p, "w#v": p["w#v"].float()}, "float16"),
        (lambda p: {k: v for k, v in p.items() if k != "b#m"}, "#m and #v"),
        (lambda p: {**p, "extra#m": p["b#m"], "extra#v": p["b#v"]}, "names differ"),
        (lambda p: {**p, "w#m": p["w#m"][:-1]}, "bitmask"),
        (lambda p: {**p, "w": torch.zeros(2)}, "twice"),
    ],
)
def test_hostile_version_1_topk_parts_are_refused(change, word: str) -> None:  # type: ignore[no-untyped-def]
    parts = legacy_delta({**STATE, "w": STATE["w"] + 1}, STATE)
    with pytest.raises(DecodeError, match=word):
        decode_payload("topk", with_base(change(parts), BASE_DIGEST), base=lookup)


@pytest.mark.parametrize(
    ("parts", "word"),
    [
        ({"w#q": torch.zeros(4, 2, dtype=torch.int8), "w#s": torch.ones(3)}, "scales"),
        ({"w#q": torch.zeros(4, dtype=torch.int16), "w#s": torch.ones(1)}, "int8"),
        ({"w#q": torch.zeros(4, dtype=torch.int8)}, "#q and #s"),
        ({"w#q": torch.zeros(4, dtype=torch.int8), "w#s": torch.ones(1), "w#x": torch.ones(1)}, "#q and #s"),
    ],
)
@pytest.mark.parametrize("codec", ["int8", "topk"])  # topk's full model is int8 parts
def test_hostile_int8_parts_are_refused(parts: dict[str, torch.Tensor], word: str, codec: str) -> None:
    with pytest.raises(DecodeError, match=word):
        decode_payload(codec, encode_state(parts))


@pytest.mark.parametrize("version", [1, 2])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_topk_deltas_decode_or_raise_decode_error(version: int, data: st.DataObject) -> None:
    target = {**STATE, "w": STATE["w"] * 2}
    parts = legacy_delta(target, STATE) if version == 1 else topk_delta(target, STATE, 0.1)[0]
    blob = bytearray(with_base(parts, BASE_DIGEST))
    at = data.draw(st.integers(0, len(blob) - 1))
    if data.draw(st.booleans()):
        del blob[at:]
    else:
        blob[at] ^= 1 << data.draw(st.integers(0, 7))
    try:
        state = decode_payload("topk", bytes(blob), limits=Limits(max_payload_bytes=1 << 16), base=lookup)
    except DecodeError:
        return
    assert state.keys() == STATE.keys()
    assert all(state[k].shape == STATE[k].shape for k in STATE)
