"""A task of your own: a small CNN on the 8x8 digits, plugged in by its import path.

Run by a test network, from this directory (the factory's module is imported from the
current directory or PYTHONPATH)::

    cd examples && ../.venv/bin/p2pfl testnet --nodes 3 --rounds 5 --task digits_cnn:make_learner

or by a daemon: ``[task] factory = "digits_cnn:make_learner"`` in its node file. The
factory gets the node's place (``context.node_index`` of ``context.num_nodes``), the
shared ``seed``, the ``device`` and the other ``[task]`` keys in ``context.options``
(the test network passes ``partition``, ``alpha`` and ``batch_size``). Everything it
returns lives in the daemon as the bundled tasks do: checkpoints and resume, /status,
``p2pfl export``.
"""

from __future__ import annotations

import torch
from torch import nn

from p2pfl.learners import PARTITIONS, TensorBatches, TorchLearner, load_digits_split
from p2pfl.learners.tasks import TaskContext


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions over the 8x8 image, then a linear classifier (994 weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)  # (B, 8, 8, 8)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=3, padding=1)  # (B, 8, 4, 4) after pooling
        self.out = nn.Linear(8 * 2 * 2, 10)  # (B, 8, 2, 2) after the second pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, 1, 8, 8)`` to logits ``(B, 10)``."""
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 8, 4, 4)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 8, 2, 2)
        return self.out(x.flatten(1))


def model(seed: int) -> DigitsCNN:
    """The same initial weights on every node that passes the same seed."""
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
        torch.manual_seed(seed)
        return DigitsCNN()


def make_learner(context: TaskContext) -> TorchLearner:
    """Build this node's learner: its share of the digits, as images."""
    options = dict(context.options)
    train, test = load_digits_split(seed=context.seed)
    parts = PARTITIONS[options.get("partition", "iid")](
        train.labels, context.num_nodes, seed=context.seed, alpha=options.get("alpha", 0.5))
    mine = train.subset(parts[context.node_index])
    images = mine.features.reshape(-1, 1, 8, 8)  # (N, 64) -> (N, 1, 8, 8)
    return TorchLearner(
        model(context.seed),
        train_loader=TensorBatches(images, mine.labels, batch_size=options.get("batch_size", 32)),
        test_loader=TensorBatches(test.features.reshape(-1, 1, 8, 8), test.labels,
                                  batch_size=len(test), shuffle=False),
        lr=0.1,
        seed=context.seed * 1_000_003 + context.node_index,
        device=context.device,
    )
