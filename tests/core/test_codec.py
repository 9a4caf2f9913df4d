"""Round trips, canonical layout, determinism and limits of the tensor codec."""

from __future__ import annotations

import cbor2
import pytest
import torch

from p2pfl.config import Limits
from p2pfl.core.codec import (
    CODECS,
    DEFAULT_CODEC,
    DTYPES,
    MAGIC,
    VERSION,
    Codec,
    codec_named,
    decode_payload,
    decode_state,
    encode_state,
    parse_manifest,
    register_codec,
    swap_bytes,
    view_state,
)
from p2pfl.errors import DecodeError, UnknownCodec


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Return a tensor whose bytes are arbitrary (NaN payloads, subnormals, extremes)."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Compare dtype, shape and every byte, so NaNs and -0.0 count too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = a.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(as_bytes, b.contiguous().reshape(-1).view(torch.uint8))


def assert_round_trip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    decoded = decode_state(encode_state(state))
    assert sorted(decoded) == sorted(state)
    for name, tensor in state.items():
        assert same_bits(decoded[name], tensor.detach()), name
    return decoded


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_round_trip_is_bit_exact_for_every_dtype(dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    assert_round_trip({"w": random_tensor(dtype, (7, 5), seed=1), "b": random_tensor(dtype, (3,))})


def test_special_float_values_survive() -> None:
    values = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45, 3.4e38]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert_round_trip({"x": torch.tensor(values).to(dtype)})


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(3.5),
        torch.tensor(True),
        torch.empty(0),
        torch.empty(0, 4, dtype=torch.int16),
        torch.empty(5, 0, 2, dtype=torch.bfloat16),
        torch.arange(24.0).reshape(2, 3, 4),
        torch.arange(1.0, 2.0).reshape(1, 1, 1, 1, 1, 1, 1, 1),
    ],
    ids=["0d", "0d-bool", "empty", "empty-2d", "empty-middle", "3d", "8d"],
)
def test_special_shapes_round_trip(tensor: torch.Tensor) -> None:
    assert_round_trip({"t": tensor})


def test_non_contiguous_inputs_round_trip() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "offset": base[3:],
        "expanded": torch.tensor([1, 2], dtype=torch.int64).expand(3, 2),
        "bf16_t": base.to(torch.bfloat16).t(),
    }
    assert not state["transposed"].is_contiguous()
    assert_round_trip(state)


def test_tensors_requiring_grad_are_detached() -> None:
    param = torch.nn.Parameter(torch.randn(4, 3))
    decoded = assert_round_trip({"p": param, "y": param * 2})
    assert not decoded["p"].requires_grad
    assert type(decoded["p"]) is torch.Tensor


def test_empty_state_round_trips() -> None:
    assert decode_state(encode_state({})) == {}


def test_decode_accepts_bytes_bytearray_and_memoryview() -> None:
    data = encode_state({"a": torch.arange(5)})
    for form in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))):
        assert torch.equal(decode_state(form)["a"], torch.arange(5))


def test_decoded_tensors_do_not_alias_the_input() -> None:
    data = bytearray(encode_state({"a": torch.zeros(4)}))
    decoded = decode_state(data)
    data[-4:] = b"\xff" * 4
    decoded["a"] += 1  # writable, and independent of the buffer
    assert torch.equal(decoded["a"], torch.ones(4))


def _inside(tensor: torch.Tensor, data: bytes) -> bool:
    """Whether ``tensor``'s elements lie in ``data``'s own memory."""
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    return start <= tensor.data_ptr() < start + len(data)


def test_view_state_aliases_immutable_bytes_and_copies_the_rest() -> None:
    data = encode_state({"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(0)})
    viewed = view_state(data)
    assert _inside(viewed["a"], data)
    assert torch.equal(viewed["a"], torch.arange(6.0).reshape(2, 3))
    assert viewed["b"].shape == (0,)
    buffer = bytearray(data)  # mutable: a view could change under the checks made on it
    copied = view_state(buffer)
    buffer[-4:] = b"\xff" * 4
    assert torch.equal(copied["a"], torch.arange(6.0).reshape(2, 3))


def test_a_view_keeps_its_payload_alive() -> None:
    viewed = view_state(encode_state({"a": torch.arange(1000.0)}))  # no other reference
    garbage = [bytes(8000) for _ in range(100)]  # reuse freed memory, if any
    assert torch.equal(viewed["a"], torch.arange(1000.0))
    assert garbage


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("pad", range(4))
def test_views_at_any_offset_equal_copies_and_compute_alike(name: str, pad: int) -> None:
    # Name lengths shift the data's offset: views of float32 at every alignment mod 4.
    state = {"k" * (1 + pad): random_tensor(DTYPES[name], (3, 5), seed=pad)}
    data = encode_state(state)
    viewed, copied = view_state(data), decode_state(data)
    key = next(iter(state))
    assert same_bits(viewed[key], copied[key])
    assert _inside(viewed[key], data)
    if DTYPES[name] == torch.float32:
        values = torch.randn(3, 5, generator=torch.Generator().manual_seed(pad))
        aligned = view_state(encode_state({key: values}))[key]
        assert torch.equal(aligned @ aligned.T, values @ values.T)
        assert torch.equal(aligned.sort(dim=0).values, values.sort(dim=0).values)
        assert torch.equal(torch.linalg.vector_norm(aligned, dim=1), torch.linalg.vector_norm(values, dim=1))


def test_view_state_refuses_what_decode_state_refuses() -> None:
    data = bytearray(encode_state({"m": torch.tensor([True, False])}))
    data[-1] = 2
    with pytest.raises(DecodeError, match="invalid bool"):
        view_state(bytes(data))
    with pytest.raises(DecodeError, match="trailing bytes"):
        view_state(encode_state({"a": torch.ones(2)}) + b"\0")


def test_encoding_is_deterministic_and_independent_of_key_order() -> None:
    a, b = torch.randn(3, 3), torch.arange(4)
    first = encode_state({"layer.weight": a, "bias": b})
    assert first == encode_state({"layer.weight": a.clone(), "bias": b.clone()})
    assert first == encode_state({"bias": b, "layer.weight": a})
    assert list(decode_state(first)) == ["bias", "layer.weight"]


def test_byte_layout_matches_the_documentation() -> None:
    state = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[7]], dtype=torch.int16)}
    data = encode_state(state)
    assert data[:4] == MAGIC
    assert data[4] == VERSION
    manifest_len = int.from_bytes(data[5:9], "little")
    manifest = data[9 : 9 + manifest_len]
    assert cbor2.loads(manifest) == [["a", "int16", [1, 1]], ["b", "float32", [2]]]
    assert manifest == cbor2.dumps(cbor2.loads(manifest), canonical=True)
    # int16 7 then float32 1.0, 2.0, all little-endian, no padding.
    assert data[9 + manifest_len :] == b"\x07\x00" + b"\x00\x00\x80\x3f" + b"\x00\x00\x00\x40"


def test_unicode_names_sort_and_round_trip() -> None:
    state = {"é": torch.ones(1), "z": torch.ones(1), "日本": torch.ones(1), "": torch.ones(1)}
    decoded = assert_round_trip(state)
    assert list(decoded) == ["", "z", "é", "日本"]


def test_manifest_parser_agrees_with_cbor2() -> None:
    manifest = cbor2.dumps([["a", "bool", []], ["b", "int8", [300, 70000, 5_000_000_000]]])
    assert parse_manifest(manifest, Limits(max_payload_bytes=1 << 62)) == [
        ("a", torch.bool, ()),
        ("b", torch.int8, (300, 70000, 5_000_000_000)),
    ]


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        ({"x": torch.zeros(2, dtype=torch.complex64)}, ValueError),
        ({"x": torch.zeros(2, dtype=torch.uint16)}, ValueError),
        ({"x": [1.0, 2.0]}, TypeError),
        ({3: torch.zeros(2)}, TypeError),
    ],
    ids=["complex", "uint16", "list", "int-key"],
)
def test_encode_rejects_what_it_cannot_represent(value: dict, bad: type[Exception]) -> None:
    with pytest.raises(bad):
        encode_state(value)


def test_swap_bytes_reverses_each_element() -> None:
    raw = torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.uint8)
    assert swap_bytes(raw, 2).tolist() == [2, 1, 4, 3, 6, 5]
    assert swap_bytes(raw[:4], 4).tolist() == [4, 3, 2, 1]


# ---------------------------------------------------------------- limits

STATE = {"a": torch.zeros(2, 3), "bb": torch.zeros(4, dtype=torch.int8)}
DATA = encode_state(STATE)
MANIFEST_BYTES = int.from_bytes(DATA[5:9], "little")


@pytest.mark.parametrize(
    ("field", "fits", "word"),
    [
        ("max_payload_bytes", len(DATA), "payload too large"),
        ("max_tensors", 2, "too many tensors"),
        ("max_ndim", 2, "too many dimensions"),
        ("max_name_bytes", 2, "tensor name too long"),
        ("max_manifest_bytes", MANIFEST_BYTES, "manifest too large"),
    ],
)
def test_each_limit_admits_its_bound_and_rejects_one_less(field: str, fits: int, word: str) -> None:
    assert sorted(decode_state(DATA, limits=Limits(**{field: fits}))) == ["a", "bb"]
    with pytest.raises(DecodeError, match=word):
        decode_state(DATA, limits=Limits(**{field: fits - 1}))


def test_shape_product_is_bounded_by_the_payload_limit() -> None:
    data = encode_state({"e": torch.empty(0, 1000, 1000)})
    assert decode_state(data)["e"].shape == (0, 1000, 1000)
    with pytest.raises(DecodeError, match="too large"):
        decode_state(data, limits=Limits(max_payload_bytes=999_999))


# ---------------------------------------------------------------- registry


def test_raw_round_trips_through_the_registry() -> None:
    state = {"w": torch.randn(3, 2), "n": torch.tensor(7)}
    data = CODECS[DEFAULT_CODEC].encode(state)
    assert data == encode_state(state)
    for decoded in (CODECS["raw"].decode(data, limits=Limits()), decode_payload("raw", data)):
        assert decoded.keys() == state.keys()
        assert all(torch.equal(decoded[k], state[k]) for k in state)


def test_an_unknown_codec_is_refused_by_name() -> None:
    with pytest.raises(UnknownCodec, match="unknown codec 'zstd'; this node decodes bf16, fp16, int8, raw, topk"):
        decode_payload("zstd", encode_state({}))
    with pytest.raises(DecodeError):  # an UnknownCodec is a DecodeError: INVALID_FORMAT evidence
        codec_named("x" * 1000)


def test_a_codec_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_codec(Codec("raw", encode_state, decode_state))
    assert CODECS["raw"].decode is view_state
