"""Measure the digits learner: speed of one local epoch, and what accuracy to expect.

Run: ``.venv/bin/python benchmarks/bench_learner.py`` (about half a minute on one core).
``--sweep`` also tries a grid of hidden sizes, learning rates and momenta.

Prints (a) timings of one epoch on a 1/8 partition and of evaluation on the test split;
(b) centralized training; (c) 8 isolated IID nodes; (d) in-process FedAvg (average all
8 models after every round of 1 local epoch) for IID and Dirichlet(0.5) partitions.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from p2pfl.learners.base import State
from p2pfl.learners.batches import TensorBatches
from p2pfl.learners.datasets import PARTITIONS, load_digits_split
from p2pfl.learners.models import DEFAULT_HIDDEN, digits_model
from p2pfl.learners.torch_learner import TorchLearner

NODES = 8
ROUNDS = 10
LR, MOMENTUM = 0.2, 0.9  # the defaults of make_digits_learner


def build(
    node: int, *, partition: str = "iid", hidden: int = DEFAULT_HIDDEN, lr: float = LR,
    momentum: float = MOMENTUM, nodes: int = NODES, seed: int = 0, loader: str = "tensor",
) -> TorchLearner:
    """Mirror make_digits_learner, with the knobs this benchmark sweeps."""
    train, test = load_digits_split(seed=seed)
    part = PARTITIONS[partition](train.labels, nodes, seed=seed, alpha=0.5)[node]
    x, y = train.features[part], train.labels[part]
    if loader == "tensor":
        train_loader: object = TensorBatches(x, y, batch_size=32)
    else:
        train_loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                                  generator=torch.Generator())
    return TorchLearner(
        digits_model(seed, hidden=hidden),
        train_loader=train_loader,  # type: ignore[arg-type]
        test_loader=TensorBatches(test.features, test.labels, batch_size=len(test), shuffle=False),
        lr=lr, momentum=momentum, seed=seed * 1_000_003 + node,
    )


def median_ms(action: Callable[[], object], repeat: int = 200) -> float:
    """Return the median wall time of ``action`` in milliseconds (after a warm-up)."""
    for _ in range(10):
        action()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def average(states: list[State], weights: list[int]) -> State:
    """Return the sample-weighted mean of ``states`` (FedAvg)."""
    total = sum(weights)
    return {k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))  # type: ignore[misc]
            for k in states[0]}


def fedavg(partition: str, **knobs: float) -> list[float]:
    """Run FedAvg over all nodes; return the mean test accuracy after each round."""
    learners = [build(i, partition=partition, **knobs) for i in range(NODES)]  # type: ignore[arg-type]
    curve = []
    for _ in range(ROUNDS):
        weights = [learner.fit(1) for learner in learners]
        mean_state = average([learner.get_state() for learner in learners], weights)
        for learner in learners:
            learner.set_state(mean_state)
        curve.append(statistics.mean(learner.evaluate().accuracy for learner in learners))
    return curve


def timings() -> None:
    print(f"== timings (torch threads = {torch.get_num_threads()}), median of 200 ==")
    for loader in ("tensor", "dataloader"):
        learner = build(0, loader=loader)
        print(f"one epoch, {learner.num_train_samples} samples, batch 32, {loader:>10}: "
              f"{median_ms(lambda learner=learner: learner.fit(1)):6.2f} ms")
    learner = build(0)
    print(f"evaluate, {learner.evaluate().samples} test samples, one batch:      "
          f"{median_ms(learner.evaluate):6.2f} ms")
    print(f"get_state: {median_ms(learner.get_state):.3f} ms; "
          f"set_state: {median_ms(lambda: learner.set_state(learner.get_state())):.3f} ms")
    nodes = [build(i) for i in range(NODES)]
    print(f"{NODES} nodes x one epoch, one after another:      "
          f"{median_ms(lambda: [n.fit(1) for n in nodes], repeat=30):6.2f} ms")
    print(f"{NODES} nodes x one epoch, one thread per node:    "
          f"{median_ms(lambda: threaded_fit(nodes), repeat=30):6.2f} ms")


def threaded_fit(learners: list[TorchLearner]) -> None:
    """Run one epoch on every learner at once, each in its own thread (as nodes do)."""
    threads = [threading.Thread(target=learner.fit, args=(1,)) for learner in learners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def accuracy_tables() -> None:
    print(f"\n== accuracy (hidden={DEFAULT_HIDDEN}, lr={LR}, momentum={MOMENTUM}, batch 32) ==")
    central = build(0, nodes=1)
    curve = []
    for _ in range(ROUNDS):
        central.fit(1)
        curve.append(central.evaluate().accuracy)
    print("epoch/round            " + " ".join(f"{r:>5}" for r in range(1, ROUNDS + 1)))
    print("centralized            " + fmt(curve))
    isolated = [build(i) for i in range(NODES)]
    for learner in isolated:
        learner.fit(ROUNDS)
    mean = statistics.mean(learner.evaluate().accuracy for learner in isolated)
    print(f"8 isolated IID nodes, 10 epochs, mean accuracy: {mean:.3f}")
    for partition in ("iid", "dirichlet", "shards", "halves"):
        print(f"fedavg {partition:<15} " + fmt(fedavg(partition)))
    for partition in ("iid", "dirichlet"):
        finals = [fedavg(partition, seed=seed)[-1] for seed in range(5)]
        print(f"fedavg {partition}, round {ROUNDS}, seeds 0-4: " + fmt(finals)
              + f"  (mean {statistics.mean(finals):.3f})")


def sweep() -> None:
    print("\n== sweep: FedAvg IID after rounds 5 and 10 ==")
    for hidden in (32, 64, 128, 256):
        for lr in (0.05, 0.1, 0.2, 0.3):
            for momentum in (0.5, 0.9):
                iid = fedavg("iid", hidden=hidden, lr=lr, momentum=momentum)
                dirichlet = fedavg("dirichlet", hidden=hidden, lr=lr, momentum=momentum)
                print(f"hidden={hidden:<4} lr={lr:<5} momentum={momentum:<4} iid "
                      f"{iid[4]:.3f} {iid[9]:.3f}  dirichlet {dirichlet[4]:.3f} {dirichlet[9]:.3f}")


def fmt(curve: list[float]) -> str:
    return " ".join(f"{a:5.3f}" for a in curve)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep hidden/lr/momentum")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings()
    accuracy_tables()
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()
