"""The default real task (scikit-learn's bundled digits) and ways to split data over nodes.

Partitions return one index tensor per node into the given labels. They depend only on
their arguments (a NumPy ``Generator`` seeded from ``seed``), so every node computes the
same partition on its own and takes its part: no coordinator needed.

- ``iid``: a random equal split (sizes differ by at most one).
- ``dirichlet``: label skew; each class is spread over nodes by Dirichlet(alpha)
  proportions (Hsu et al. 2019); small alpha means few classes per node.
- ``shards``: sort by label, cut into ``n * k`` shards, deal ``k`` to each node
  (McMahan et al. 2017).
- ``halves``: the first half of the nodes holds classes 0-4, the second half 5-9
  (:func:`partition_classes`), for two-community experiments.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p2pfl.errors import ConfigError
from p2pfl.learners.batches import TensorBatches
from p2pfl.learners.models import digits_model
from p2pfl.learners.torch_learner import TorchLearner

Partitioner = Callable[..., list[torch.Tensor]]
LabelMap = Callable[[torch.Tensor], torch.Tensor]

_DIRICHLET_ATTEMPTS = 1000
# The reference-set holdout is drawn with this fixed seed, never the network's: the same
# samples are held out in every run, so one reference file serves every seed.
_HOLDOUT_SEED = 0x5EF5E7


@dataclass(frozen=True)
class Dataset:
    """Features ``(N, F)`` float32, labels ``(N,)`` int64 in ``[0, num_classes)``."""

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        """Return the number of samples."""
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> Dataset:
        """Return the samples at ``indices`` (new tensors)."""
        return Dataset(self.features[indices], self.labels[indices], self.num_classes)


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    raw = _read_bundled_digits()
    if raw is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        raw = np.column_stack([bunch.data, bunch.target])
    features = torch.from_numpy(np.asarray(raw[:, :-1], dtype=np.float32) / 16.0)
    return features, torch.from_numpy(np.asarray(raw[:, -1], dtype=np.int64))


def _read_bundled_digits() -> np.ndarray | None:
    """Read scikit-learn's bundled ``digits.csv.gz`` without importing scikit-learn.

    Why: importing sklearn costs 0.7-3 s per process, and a testnet starts 8 processes
    on 2 cores. This is the same file ``load_digits`` parses (64 pixels, then the label);
    if the layout ever changes we fall back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                raw = np.loadtxt(f, delimiter=",")
            if raw.ndim == 2 and raw.shape[1] == 65:
                return raw
    return None


def load_digits_split(
    *, test_fraction: float = 0.25, seed: int = 0, holdout: int = 0
) -> tuple[Dataset, Dataset]:
    """Return the bundled digits as a fixed, stratified ``(train, test)`` split.

    Features are pixel intensities scaled to [0, 1]. The split depends only on
    ``test_fraction``, ``seed`` and ``holdout``: ``ceil(test_fraction * N)`` test samples
    (450 of 1,797 by default), each class represented in proportion. ``holdout`` samples
    per class (:func:`digits_holdout`, the same whatever the seed) are left out of both
    first: they are what ``p2pfl reference make`` publishes as a reference set.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    features, labels = _digits()
    whole = Dataset(features, labels, num_classes=10)
    if holdout:
        kept = np.ones(len(labels), dtype=bool)
        kept[digits_holdout(holdout)] = False
        whole = whole.subset(torch.from_numpy(np.flatnonzero(kept)))
    test_idx = stratified_sample(whole.labels.numpy(), test_fraction, np.random.default_rng(seed))
    is_test = np.zeros(len(whole), dtype=bool)
    is_test[test_idx] = True
    train = whole.subset(torch.from_numpy(np.flatnonzero(~is_test)))
    test = whole.subset(torch.from_numpy(np.flatnonzero(is_test)))
    return train, test


MAX_HOLDOUT = 50  # digits per class a network may hold out as its reference set


def digits_holdout(per_class: int) -> np.ndarray:
    """Return the sorted indices (into the bundled digits) of ``per_class`` samples per class.

    Drawn with a fixed seed, so the same for every network seed; a larger ``per_class``
    draws a superset of a smaller one's samples.
    """
    labels = _digits()[1].numpy()
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 <= per_class <= int(counts.min()) // 2:
        raise ConfigError(f"holdout: must be in [0, {int(counts.min()) // 2}] per class, got {per_class}")
    rng = np.random.default_rng(_HOLDOUT_SEED)
    orders = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    return np.sort(np.concatenate([order[:per_class] for order in orders]))


def digits_reference(per_class: int) -> Dataset:
    """Return the held-out samples of :func:`digits_holdout` (a public reference set)."""
    features, labels = _digits()
    return Dataset(features, labels, num_classes=10).subset(torch.from_numpy(digits_holdout(per_class)))


def stratified_sample(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pick ``ceil(fraction * N)`` indices, per class in proportion (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * fraction
    take = np.floor(quotas).astype(np.int64)
    short = math.ceil(fraction * len(labels) - 1e-9) - int(take.sum())
    take[np.argsort(-(quotas - take), kind="stable")[:short]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked))


# -- partitions ----------------------------------------------------------------------------


def _check_nodes(labels: torch.Tensor, n: int, per_node: int = 1) -> np.ndarray:
    if n < 1:
        raise ConfigError(f"nodes: need at least 1, got {n}")
    if len(labels) < n * per_node:
        raise ConfigError(
            f"nodes: {len(labels)} samples cannot give {n} nodes {per_node} each; use fewer nodes"
        )
    return labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


def _as_tensors(parts: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def partition_iid(labels: torch.Tensor, n: int, *, seed: int) -> list[torch.Tensor]:
    """Split indices randomly into ``n`` disjoint parts whose sizes differ by at most one."""
    y = _check_nodes(labels, n)
    order = np.random.default_rng(seed).permutation(len(y))
    return _as_tensors(np.array_split(order, n))


def partition_dirichlet(
    labels: torch.Tensor, n: int, *, alpha: float, seed: int, min_size: int = 10
) -> list[torch.Tensor]:
    """Split indices with Dirichlet(alpha) label skew; every node gets >= ``min_size``.

    Per class, node shares are drawn from Dirichlet(alpha); a node already holding more
    than ``N / n`` samples gets no more (the usual balancing step, so sizes stay near
    equal). Draws are repeated until every node has ``min_size`` samples, at most
    1000 times; ConfigError if that never happens.
    """
    if not alpha > 0:
        raise ConfigError(f"alpha: must be > 0, got {alpha}")
    y = _check_nodes(labels, n, per_node=min_size)
    rng = np.random.default_rng(seed)
    for _ in range(_DIRICHLET_ATTEMPTS):
        parts = _dirichlet_draw(y, n, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return _as_tensors(parts)
    raise ConfigError(
        f"alpha={alpha}: no Dirichlet draw in {_DIRICHLET_ATTEMPTS} gave all {n} nodes "
        f">= {min_size} samples; raise alpha or lower min_size"
    )


def _dirichlet_draw(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    sizes = np.zeros(n, dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(n, alpha)) * (sizes < len(y) / n)
        if shares.sum() == 0:  # every node is full: fall back to the raw draw
            shares = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(shares / shares.sum()) * len(idx)).astype(np.int64)[:-1]
        for node, chunk in enumerate(np.split(idx, cuts)):
            parts[node].append(chunk)
            sizes[node] += len(chunk)
    return [np.concatenate(p) for p in parts]


def partition_shards(
    labels: torch.Tensor, n: int, *, shards_per_node: int = 2, seed: int
) -> list[torch.Tensor]:
    """Sort indices by label, cut into ``n * shards_per_node`` shards, deal them at random."""
    if shards_per_node < 1:
        raise ConfigError(f"shards_per_node: need at least 1, got {shards_per_node}")
    y = _check_nodes(labels, n, per_node=shards_per_node)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))  # random order within each label after the sort
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(by_label, n * shards_per_node)
    deal = rng.permutation(len(shards)).reshape(n, shards_per_node)
    return _as_tensors([np.concatenate([shards[s] for s in row]) for row in deal])


def partition_classes(
    labels: torch.Tensor, groups: Sequence[Sequence[int]], n: int, *, seed: int
) -> list[torch.Tensor]:
    """Give the nodes of group ``g`` only the classes ``groups[g]``, split IID among them.

    Nodes are assigned to groups in contiguous blocks (node ``i`` is in group
    ``i * len(groups) // n``). Groups must not share a class; samples of classes in no
    group are left out.
    """
    if not groups or any(len(g) == 0 for g in groups):
        raise ConfigError("groups: need at least one group and no empty group")
    flat = [c for g in groups for c in g]
    if len(set(flat)) != len(flat):
        raise ConfigError(f"groups: a class appears in two groups: {groups}")
    if n < len(groups):
        raise ConfigError(f"nodes: {n} nodes cannot cover {len(groups)} groups")
    y = _check_nodes(labels, n)
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    for g, classes in enumerate(groups):
        members = [i for i in range(n) if i * len(groups) // n == g]
        idx = rng.permutation(np.flatnonzero(np.isin(y, list(classes))))
        if len(idx) < len(members):
            raise ConfigError(f"groups[{g}]: {len(idx)} samples for {len(members)} nodes")
        parts.extend(np.array_split(idx, len(members)))
    return _as_tensors(parts)


def _iid(labels: torch.Tensor, n: int, *, seed: int, alpha: float) -> list[torch.Tensor]:
    return partition_iid(labels, n, seed=seed)


def _dirichlet(labels: torch.Tensor, n: int, *, seed: int, alpha: float) -> list[torch.Tensor]:
    return partition_dirichlet(labels, n, alpha=alpha, seed=seed)


def _shards(labels: torch.Tensor, n: int, *, seed: int, alpha: float) -> list[torch.Tensor]:
    return partition_shards(labels, n, seed=seed)


def _halves(labels: torch.Tensor, n: int, *, seed: int, alpha: float) -> list[torch.Tensor]:
    classes = sorted(int(c) for c in torch.unique(labels))
    half = len(classes) // 2
    return partition_classes(labels, [classes[:half], classes[half:]], n, seed=seed)


PARTITIONS: dict[str, Partitioner] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
    "halves": _halves,
}
"""Partitioners by name, all called as ``f(labels, n, *, seed, alpha)``."""


# -- the default task ------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _digits_parts(
    partition: str, num_nodes: int, alpha: float, seed: int, holdout: int
) -> tuple[Dataset, Dataset, tuple[torch.Tensor, ...]]:
    # Cached: many nodes in one process compute the same split and partition.
    train, test = load_digits_split(seed=seed, holdout=holdout)
    parts = PARTITIONS[partition](train.labels, num_nodes, seed=seed, alpha=alpha)
    return train, test, tuple(parts)


def make_digits_learner(
    *,
    node_index: int,
    num_nodes: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 0.2,
    momentum: float = 0.9,
    holdout: int = 0,
    label_map: LabelMap | None = None,
    device: str = "cpu",
) -> TorchLearner:
    """Build node ``node_index``'s learner for the digits task.

    The node trains on its part of the fixed train split and evaluates on the whole
    fixed test split, so accuracies compare across nodes. Every node starts from
    ``digits_model(seed)``. ``label_map`` rewrites the node's training labels, e.g.
    ``lambda y: 9 - y`` for a label-flipping attacker; test labels stay true.

    ``lr=0.2`` (not TorchLearner's generic 0.05) because each node takes only ~6 steps
    per round between averagings: at 0.05, FedAvg over 8 IID nodes reaches only ~0.91
    after 10 rounds; at 0.2, 0.95-0.97 (benchmarks/bench_learner.py). ``holdout``
    samples per class are in neither split (:func:`load_digits_split`).
    """
    if partition not in PARTITIONS:
        raise ConfigError(f"partition: {partition!r} is not one of {sorted(PARTITIONS)}")
    if not 0 <= node_index < num_nodes:
        raise ConfigError(f"node_index: {node_index} is not in [0, {num_nodes})")
    train, test, parts = _digits_parts(partition, num_nodes, alpha, seed, holdout)
    local = train.subset(parts[node_index])
    labels = mapped_labels(local, label_map) if label_map else local.labels
    return TorchLearner(
        digits_model(seed),
        train_loader=TensorBatches(local.features, labels, batch_size=batch_size),
        test_loader=TensorBatches(
            test.features.clone(), test.labels.clone(), batch_size=len(test), shuffle=False
        ),
        lr=lr,
        momentum=momentum,
        seed=seed * 1_000_003 + node_index,  # distinct data order per node
        device=device,
    )


def mapped_labels(data: Dataset, label_map: LabelMap) -> torch.Tensor:
    mapped = torch.as_tensor(label_map(data.labels.clone()))
    if mapped.shape != data.labels.shape or mapped.dtype.is_floating_point:
        raise ConfigError("label_map: must return integer labels of the same shape")
    if len(mapped) and not (int(mapped.min()) >= 0 and int(mapped.max()) < data.num_classes):
        raise ConfigError(f"label_map: labels must stay in [0, {data.num_classes})")
    return mapped.to(torch.int64)


__all__ = [
    "PARTITIONS",
    "Dataset",
    "digits_holdout",
    "digits_reference",
    "make_digits_learner",
    "load_digits_split",
    "mapped_labels",
    "partition_classes",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "stratified_sample",
]
