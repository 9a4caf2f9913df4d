"""Synchronous learning code (torch), no networking: Learner protocol, TorchLearner, data sets.

Map of the package:

- ``base``: the :class:`Learner` protocol the node drives (in a worker thread),
  ``State`` (named tensors) and :class:`Metrics`.
- ``torch_learner``: :class:`TorchLearner` for any ``nn.Module`` and batch iterables;
  :class:`TensorBatches`, a fast in-memory batch iterator; :class:`MomentumSGD`.
- ``models``: :class:`DigitsMLP` and :func:`digits_model` (deterministic init from a seed).
- ``datasets``: the bundled digits task (fixed stratified split), partitions across nodes
  (IID, Dirichlet label skew, shards, class groups) and :func:`make_digits_learner`.
- ``tasks``: :data:`~p2pfl.learners.tasks.TASKS`, tasks by name: a factory
  ``(TaskContext) -> Learner`` and its options record; ``digits`` and ``table`` are
  registered there, and ``"package.module:function"`` names a factory outside p2pfl.
- ``table``: the ``table`` task, a CSV or ``.npz`` file learned by a small MLP.
- ``device``: ``[train] device`` (auto, cpu, cuda, cuda:N, mps) resolved against what torch sees.

Nothing here changes torch's global thread count or RNG; the CLI sets one intra-op
thread per process.
"""

from p2pfl.learners.base import Learner, Metrics, State
from p2pfl.learners.batches import TensorBatches
from p2pfl.learners.datasets import (
    PARTITIONS,
    Dataset,
    load_digits_split,
    make_digits_learner,
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from p2pfl.learners.models import DigitsMLP, digits_model
from p2pfl.learners.optim import MomentumSGD
from p2pfl.learners.torch_learner import TorchLearner

__all__ = [
    "PARTITIONS",
    "Dataset",
    "DigitsMLP",
    "Learner",
    "Metrics",
    "MomentumSGD",
    "State",
    "TensorBatches",
    "TorchLearner",
    "digits_model",
    "load_digits_split",
    "make_digits_learner",
    "partition_classes",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]
