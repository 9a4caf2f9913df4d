"""The reference-set file: format, hostile files, the digits holdout, per-class scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from p2pfl.core.codec import encode_state
from p2pfl.errors import ConfigError, DecodeError
from p2pfl.learners.datasets import (
    PARTITIONS,
    digits_holdout,
    digits_reference,
    load_digits_split,
)
from p2pfl.learners.reference import (
    ReferenceSet,
    class_scores,
    decode_reference,
    load_reference,
    sha256_of,
)


def small() -> ReferenceSet:
    return ReferenceSet(torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))


def written(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "ref.cbor"
    path.write_bytes(data)
    return path, sha256_of(data)


def test_a_reference_set_round_trips_through_its_file(tmp_path: Path) -> None:
    ref = small()
    path, digest = written(tmp_path, ref.encode())

    loaded = load_reference(path, digest)

    assert torch.equal(loaded.x, ref.x)
    assert torch.equal(loaded.y, ref.y)


def test_a_file_with_another_hash_is_refused_naming_both_hashes(tmp_path: Path) -> None:
    path, digest = written(tmp_path, small().encode())
    expected = "0" * 64

    with pytest.raises(ConfigError, match=rf"\[reference\] sha256: .* hashes to {digest}, expected {expected}"):
        load_reference(path, expected)


def test_a_missing_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[reference\] path: cannot read"):
        load_reference(tmp_path / "absent.cbor", "0" * 64)


def test_a_truncated_file_is_refused_even_with_its_own_hash(tmp_path: Path) -> None:
    path, digest = written(tmp_path, small().encode()[:-5])

    with pytest.raises(ConfigError, match=r"\[reference\] path: .* not a reference set: truncated"):
        load_reference(path, digest)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"x": torch.rand(3, 2).double(), "y": torch.tensor([0, 1, 2])}, "x must be float32"),
        ({"x": torch.rand(3), "y": torch.tensor([0, 1, 2])}, "x must be float32 .n, features."),
        ({"x": torch.rand(3, 2), "y": torch.tensor([0, 1, 2], dtype=torch.int32)}, "y must be int64"),
        ({"x": torch.rand(3, 2), "y": torch.tensor([[0, 1, 2]])}, "y must be int64"),
        ({"x": torch.rand(3, 2), "y": torch.tensor([0, 1])}, "one label each"),
        ({"x": torch.rand(0, 2), "y": torch.zeros(0, dtype=torch.int64)}, "need 1.."),
        ({"x": torch.rand(3, 2), "y": torch.tensor([0, -1, 2])}, "labels must be in"),
        ({"x": torch.full((3, 2), math.nan), "y": torch.tensor([0, 1, 2])}, "NaN"),
        ({"x": torch.rand(3, 2)}, "tensors 'x' and 'y'"),
        ({"x": torch.rand(3, 2), "y": torch.tensor([0, 1, 2]), "z": torch.rand(1)}, "too many|tensors"),
    ],
)
def test_hostile_files_are_refused_with_what_is_wrong(state: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_reference(encode_state(state))


def test_garbage_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_reference(b"not a reference set at all")


def test_the_holdout_is_disjoint_from_every_split_and_the_same_for_every_seed() -> None:
    held = digits_reference(20)
    assert torch.bincount(held.labels).tolist() == [20] * 10
    keys = {tuple(row.tolist()) for row in held.features}
    for seed in (0, 1, 7):
        train, test = load_digits_split(seed=seed, holdout=20)
        assert len(train) + len(test) + 200 == 1797
        assert not keys & {tuple(row.tolist()) for row in test.features}
        # Every node's part comes from train: disjoint from the holdout as a whole.
        parts = PARTITIONS["dirichlet"](train.labels, 16, seed=seed, alpha=0.5)
        assert sum(len(p) for p in parts) == len(train)
    assert set(digits_holdout(10)) <= set(digits_holdout(20))


def test_the_holdout_does_not_share_images_with_the_training_data() -> None:
    held = {tuple(row.tolist()) for row in digits_reference(20).features}
    train, _ = load_digits_split(seed=0, holdout=20)
    full_train, _ = load_digits_split(seed=0)

    # Digits has a few duplicate images; the holdout's indices are what is removed.
    assert len(full_train) > len(train)
    assert len(held & {tuple(row.tolist()) for row in train.features}) <= 2


def test_no_holdout_keeps_the_split_of_earlier_releases() -> None:
    train, test = load_digits_split(seed=3)
    again, again_test = load_digits_split(seed=3, holdout=0)
    assert torch.equal(train.features, again.features)
    assert torch.equal(test.labels, again_test.labels)


def test_class_scores_are_per_class_loss_and_accuracy() -> None:
    model = nn.Linear(2, 3, bias=False)
    # Predicts class 0 for every sample with weight on feature 0.
    state = {"weight": torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]])}
    ref = ReferenceSet(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 0, 1, 2]))

    (scores,) = class_scores(model, [state], ref)

    assert scores.accuracy == (1.0, 0.0, 0.0)
    assert scores.loss[0] < 0.02
    assert scores.loss[1] == pytest.approx(scores.loss[2])
    assert scores.loss[1] > 4.9


def test_a_class_without_samples_scores_nan() -> None:
    model = nn.Linear(2, 3)
    ref = ReferenceSet(torch.rand(2, 2), torch.tensor([0, 2]))

    (scores,) = class_scores(model, [model.state_dict()], ref)

    assert math.isnan(scores.accuracy[1])
    assert not math.isnan(scores.accuracy[0])
