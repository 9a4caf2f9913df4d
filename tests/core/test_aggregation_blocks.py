"""Rules read the models a block of columns at a time: same results as one block, bounded blocks."""

from __future__ import annotations

import pytest
import torch

import p2pfl.core.aggregation.flat as flat
from p2pfl.core.aggregation import RULES, Aggregate, aggregate, flat_spec, flatten
from p2pfl.core.aggregation.flat import column_blocks


def _state(gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "a.weight": (scale * torch.randn(7, 5, generator=gen)).to(dtype),
        "b.bias": scale * torch.randn(3, generator=gen),
        "c.weight": (scale * torch.randn(4, 6, generator=gen)).t(),  # not contiguous
        "d.count": torch.tensor(3),
    }


def _cloud(seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[float]]:
    """Own model, neighbours (one far, one with a NaN, one at weight 0) and weights."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if seed % 2 else torch.float32
    own = _state(gen, dtype)
    neighbours = []
    for _ in range(5):
        noise = _state(gen, dtype, 0.3)
        neighbours.append({k: v + noise[k] if v.is_floating_point() else v for k, v in own.items()})
    neighbours.append(_state(gen, dtype, 40.0))
    neighbours[1]["a.weight"][2, 3] = float("nan")
    weights = (torch.rand(6, generator=gen) + 0.2).tolist()
    weights[2] = 0.0
    return own, neighbours, weights


def _run(name: str, seed: int) -> Aggregate:
    own, neighbours, weights = _cloud(seed)
    extra = {"own_step": 0.8, "vetted": [j % 2 == 0 for j in range(6)]} if RULES[name].clipping else {}
    return aggregate(name, own, neighbours, weights, **extra)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("seed", [0, 1])
def test_small_blocks_give_the_result_of_one_block(
    monkeypatch: pytest.MonkeyPatch, name: str, seed: int
) -> None:
    # One block is the whole (n+1, d) matrix the rules worked on before blocks.
    monkeypatch.setattr(flat, "BLOCK_BYTES", 1 << 30)
    whole = _run(name, seed)
    monkeypatch.setattr(flat, "BLOCK_BYTES", 7 * 8)  # a few columns: blocks cut through tensors
    blocks = _run(name, seed)
    assert torch.allclose(flatten(blocks.state)[0], flatten(whole.state)[0], rtol=1e-5, atol=1e-5)
    assert blocks.trust == pytest.approx(whole.trust, abs=1e-5)
    assert blocks.trust[1] == 0.0  # the NaN neighbour
    assert (blocks.radius is None) == (whole.radius is None)
    if whole.radius is not None:
        assert blocks.radius == pytest.approx(whole.radius, rel=1e-5)
    assert int(blocks.state["d.count"]) == 3


def test_blocks_cover_every_column_once_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flat, "BLOCK_BYTES", 3 * 4 * 10)  # 10 float32 columns of 3 rows
    gen = torch.Generator().manual_seed(0)
    models = [_state(gen, torch.float32) for _ in range(3)]
    spec = flat_spec(models[0])
    keep = torch.tensor([True, False, True])
    got = list(column_blocks(models, spec, torch.float32, keep))
    assert all(rows.shape == (3, where.stop - where.start) for where, rows in got)
    assert max(rows.nbytes for _, rows in got) <= flat.BLOCK_BYTES
    whole = torch.cat([rows for _, rows in got], dim=1)
    assert torch.equal(whole[0], flatten(models[0])[0])
    assert torch.equal(whole[2], flatten(models[2])[0])
    assert not bool(whole[1].any())  # a row not kept reads as zeros


def test_the_result_is_one_new_vector_not_a_copy_per_tensor() -> None:
    own, neighbours, weights = _cloud(0)
    result = aggregate("mean", own, neighbours, weights).state
    floats = [t for t in result.values() if t.is_floating_point() and t.dtype == torch.float32]
    assert len({t.untyped_storage().data_ptr() for t in floats}) == 1


def test_blocks_skip_empty_tensors_and_cut_through_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flat, "BLOCK_BYTES", 2 * 4 * 3)  # 3 float32 columns of 2 rows
    gen = torch.Generator().manual_seed(1)
    models = [{"a": torch.rand(0, generator=gen), "b": torch.rand(4, generator=gen),
               "c": torch.rand(0, 3, generator=gen), "d": torch.rand(5, generator=gen)} for _ in range(2)]
    spec = flat_spec(models[0])
    whole = torch.cat([rows for _, rows in column_blocks(models, spec, torch.float32)], dim=1)
    assert torch.equal(whole[1], flatten(models[1])[0])
