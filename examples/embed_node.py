"""Embed p2pfl nodes in your own application, with your own torch model and data.

Three nodes in one process, each holding a private third of scikit-learn's bundled
breast-cancer data set, learn a shared classifier over real libp2p on 127.0.0.1:

    .venv/bin/python examples/embed_node.py [--rounds 10]

In a real deployment each node is its own process on its own machine: give it
``NetConfig(listen_host="0.0.0.0", port=7351, bootstrap=(<a peer's multiaddr>,))``.
"""

from __future__ import annotations

import argparse

import torch
import trio
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import p2pfl


def private_data(index: int, parts: int) -> tuple[DataLoader, DataLoader]:
    """Each node's own rows (train) and a shared held-out set (test), standardised."""
    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:120], order[120:]
    mine = train[index::parts]  # this node's private share
    train_set = TensorDataset(x[mine], y[mine])
    loader = DataLoader(train_set, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(index))
    return loader, DataLoader(TensorDataset(x[test], y[test]), batch_size=len(test))


def model() -> nn.Module:
    """Your model: anything with a state_dict of float tensors."""
    torch.manual_seed(0)  # every node starts from the same weights
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


async def run_node(  # type: ignore[no-untyped-def]
    index: int, rounds: int, bootstrap: list[str], finished: trio.Semaphore, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    train, test = private_data(index, 3)
    learner = p2pfl.TorchLearner(model(), train_loader=train, test_loader=test, lr=0.05)
    config = p2pfl.NodeConfig(
        network_id="embedded-demo",
        rounds=p2pfl.RoundConfig(min_neighbours=min(index, 1), round_timeout=3.0),
    )
    net = p2pfl.NetConfig(port=0, bootstrap=tuple(bootstrap))
    async with p2pfl.Node(config, learner, net=net) as node:
        bootstrap.append(node.transport.listen_addrs[0])  # type: ignore[attr-defined]
        task_status.started()
        stats = await node.run(rounds=rounds)
        print(f"node {index} ({stats.peer_id[-8:]}): accuracy {stats.accuracy:.3f} after {stats.round} rounds")
        finished.release()
        await trio.sleep_forever()  # keep serving neighbours until everyone is done


async def main(rounds: int) -> None:
    bootstrap: list[str] = []
    finished = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        for index in range(3):
            await nursery.start(run_node, index, rounds, bootstrap, finished)
        for _ in range(3):
            await finished.acquire()
        nursery.cancel_scope.cancel()  # all done: stop the three nodes together


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    torch.set_num_threads(1)
    trio.run(main, parser.parse_args().rounds)
