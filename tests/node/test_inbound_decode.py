"""A pulled payload is decoded and checked for NaN/Inf in one call, off the event loop."""

from __future__ import annotations

import pytest
import torch

from p2pfl.config import Limits
from p2pfl.core.codec import encode_state
from p2pfl.errors import DecodeError
from p2pfl.node.inbound import decode_checked


def no_base(digest: bytes) -> None:
    return None


def test_a_finite_model_decodes() -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    got = decode_checked("raw", encode_state(state), limits=Limits(), base=no_base)
    assert torch.equal(got["w"], state["w"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_model_is_refused_by_the_same_call(bad: float) -> None:
    state = {"w": torch.zeros(4), "b": torch.tensor([1.0, bad])}
    with pytest.raises(DecodeError, match="b: non-finite"):
        decode_checked("raw", encode_state(state), limits=Limits(), base=no_base)
