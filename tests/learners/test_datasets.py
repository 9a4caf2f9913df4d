"""Digits split, partitions and the digits learner factory."""

from __future__ import annotations

import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learners.datasets import (
    PARTITIONS,
    load_digits_split,
    make_digits_learner,
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return load_digits_split()[0].labels


def assert_partition(parts: list[torch.Tensor], n_samples: int) -> None:
    """Parts are disjoint and together cover every index exactly once."""
    joined = torch.cat(parts)
    assert joined.dtype == torch.int64
    assert sorted(joined.tolist()) == list(range(n_samples))


def label_skew(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """Mean total-variation distance between each node's label mix and the global one."""
    overall = torch.bincount(labels, minlength=10).double() / len(labels)
    distances = []
    for part in parts:
        local = torch.bincount(labels[part], minlength=10).double() / len(part)
        distances.append(0.5 * float((local - overall).abs().sum()))
    return sum(distances) / len(distances)


def test_split_is_fixed_stratified_and_scaled() -> None:
    train, test = load_digits_split(seed=3)
    again_train, again_test = load_digits_split(seed=3)
    assert (len(train), len(test)) == (1347, 450)
    assert torch.equal(train.features, again_train.features)
    assert torch.equal(test.labels, again_test.labels)
    assert train.features.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert float(train.features.min()) >= 0.0
    assert float(train.features.max()) <= 1.0
    whole = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    in_test = torch.bincount(test.labels, minlength=10)
    assert ((in_test - whole * 0.25).abs() <= 1).all()


def test_split_depends_on_seed() -> None:
    assert not torch.equal(load_digits_split(seed=0)[1].features, load_digits_split(seed=1)[1].features)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        load_digits_split(test_fraction=fraction)


def test_iid_disjoint_covering_balanced_deterministic(labels: torch.Tensor) -> None:
    parts = partition_iid(labels, 8, seed=1)
    assert_partition(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(torch.equal(a, b) for a, b in zip(parts, partition_iid(labels, 8, seed=1), strict=True))
    assert not torch.equal(parts[0], partition_iid(labels, 8, seed=2)[0])


def test_dirichlet_respects_min_size_and_is_deterministic(labels: torch.Tensor) -> None:
    parts = partition_dirichlet(labels, 8, alpha=0.3, seed=0, min_size=20)
    assert_partition(parts, len(labels))
    assert min(len(p) for p in parts) >= 20
    again = partition_dirichlet(labels, 8, alpha=0.3, seed=0, min_size=20)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks(labels: torch.Tensor) -> None:
    skew = {a: label_skew(labels, partition_dirichlet(labels, 8, alpha=a, seed=0)) for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5
    assert skew[100.0] < 0.1


def test_dirichlet_gives_up_when_impossible() -> None:
    two_classes = torch.tensor([0] * 20 + [1] * 20)
    with pytest.raises(ConfigError, match="alpha"):
        partition_dirichlet(two_classes, 4, alpha=0.001, seed=0, min_size=10)
    with pytest.raises(ConfigError, match="nodes"):
        partition_dirichlet(two_classes, 5, alpha=1.0, seed=0, min_size=10)


def test_shards_give_few_labels_per_node(labels: torch.Tensor) -> None:
    parts = partition_shards(labels, 8, shards_per_node=2, seed=0)
    assert_partition(parts, len(labels))
    assert all(len(torch.unique(labels[p])) <= 4 for p in parts)
    assert label_skew(labels, parts) > label_skew(labels, partition_iid(labels, 8, seed=0)) + 0.4


def test_classes_give_each_group_only_its_classes(labels: torch.Tensor) -> None:
    groups = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    parts = partition_classes(labels, groups, 6, seed=0)
    assert_partition(parts, len(labels))
    for node, part in enumerate(parts):
        assert set(labels[part].tolist()) == set(groups[node * 2 // 6])


def test_classes_reject_overlapping_groups(labels: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="two groups"):
        partition_classes(labels, [[0, 1], [1, 2]], 4, seed=0)


@pytest.mark.parametrize("name", sorted(PARTITIONS))
def test_every_named_partition_is_a_partition(name: str, labels: torch.Tensor) -> None:
    assert_partition(PARTITIONS[name](labels, 8, seed=5, alpha=0.5), len(labels))


def test_digits_learners_share_init_and_split_the_train_data() -> None:
    learners = [make_digits_learner(node_index=i, num_nodes=4) for i in range(4)]
    assert sum(learner.num_train_samples for learner in learners) == 1347
    first = learners[0].get_state()
    for learner in learners[1:]:
        assert all(torch.equal(first[k], v) for k, v in learner.get_state().items())
    assert learners[2].evaluate().samples == 450


def test_label_map_rewrites_training_labels_only() -> None:
    honest = make_digits_learner(node_index=1, num_nodes=8)
    flipped = make_digits_learner(node_index=1, num_nodes=8, label_map=lambda y: 9 - y)
    assert torch.equal(flipped.train_loader.labels, 9 - honest.train_loader.labels)  # type: ignore[attr-defined]
    assert torch.equal(flipped.test_loader.labels, honest.test_loader.labels)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"partition": "nope"}, "partition"),
        ({"node_index": 8}, "node_index"),
        ({"label_map": lambda y: y + 1}, "label_map"),
        ({"label_map": lambda y: y.float()}, "label_map"),
    ],
)
def test_make_digits_learner_rejects_bad_settings(kwargs: dict, field: str) -> None:
    settings = {"node_index": 0, "num_nodes": 8} | kwargs
    with pytest.raises(ConfigError, match=field):
        make_digits_learner(**settings)
