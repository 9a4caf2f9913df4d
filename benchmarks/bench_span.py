"""What the opt-in span check (p2pfl/node/span.py) costs a node per round.

Run: ``.venv/bin/python benchmarks/bench_span.py`` (about half a minute, one thread).

For the digits learner of node 0 of 16 (Dirichlet(0.5)) and for the same task with a
wider hidden layer (1024 units, ~77k parameters), prints the median time of, per round
with 4 neighbours: one local epoch (what a round costs anyway), the harm check's probe of
5 models (its baseline), and the span check's parts: the per-sample gradients, their
span (a Gram matrix and its eigendecomposition; the QR it replaced is timed beside it),
and the ratios; then the span check's time over the local epoch's and over the harm
probe's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from p2pfl.core.aggregation.flat import fill_row, flat_spec
from p2pfl.learners.batches import TensorBatches
from p2pfl.learners.datasets import make_digits_learner
from p2pfl.learners.models import mlp
from p2pfl.learners.torch_learner import TorchLearner
from p2pfl.node.config import HarmCheck
from p2pfl.node.span import Span, SpanGate, span_ratios

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learner import median_ms

REPEATS = 15
NEIGHBOURS = 4


def wide(base: TorchLearner, hidden: int) -> TorchLearner:
    """The same data as ``base``, with a ``hidden``-unit MLP."""
    train, test = base.train_loader, base.test_loader
    assert isinstance(train, TensorBatches)
    assert isinstance(test, TensorBatches)
    return TorchLearner(mlp(64, (hidden,), 10, seed=0), train_loader=train, test_loader=test, lr=0.2)


def measure(name: str, learner: TorchLearner) -> None:
    own = learner.get_state()
    generator = torch.Generator().manual_seed(0)
    states = [{k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
               for k, v in own.items()} for _ in range(NEIGHBOURS)]
    spec = flat_spec(own)
    models = torch.empty(NEIGHBOURS + 1, spec.size)
    for row, state in zip(models, [own, *states], strict=True):
        fill_row(row, state, spec)
    samples = min(spec.size // 8, 256)
    gradients = learner.probe_gradients(own, samples)
    span = Span(gradients)
    gate = SpanGate(HarmCheck(span_low=3.0), learner)
    senders = [str(i) for i in range(NEIGHBOURS)]

    epoch = median_ms(lambda: (learner.set_state(own), learner.fit(1)), REPEATS)
    learner.set_state(own)
    probe = median_ms(lambda: learner.probe_losses([own, *states]), REPEATS)
    grads = median_ms(lambda: learner.probe_gradients(own, samples), REPEATS)
    gram = median_ms(lambda: Span(gradients), REPEATS)
    qr = median_ms(lambda: torch.linalg.qr(gradients.T), REPEATS)
    ratios = median_ms(lambda: span_ratios(span, models, 6.0), REPEATS)
    judge = median_ms(lambda: gate.judge(5, own, senders, states), REPEATS)
    print(f"{name}: {spec.size} parameters, {len(gradients)} probe gradients | one local epoch {epoch:.1f} ms | "
          f"harm probe of {NEIGHBOURS + 1} models {probe:.1f} ms | span check {judge:.1f} ms "
          f"(gradients {grads:.1f}, span {gram:.1f} [a QR: {qr:.1f}], ratios {ratios:.1f}) | span check / epoch {judge / epoch:.2f}, "
          f"/ harm probe {judge / probe:.1f}")


def main() -> None:
    torch.set_num_threads(1)
    base = make_digits_learner(node_index=0, num_nodes=16, partition="dirichlet", seed=0)
    measure("digits (64 hidden)", base)
    measure("digits, 1024 hidden", wide(base, 1024))


if __name__ == "__main__":
    main()
