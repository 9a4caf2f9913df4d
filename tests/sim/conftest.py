"""Simulation tests run many tiny models: one torch thread, as ``p2pfl sim`` uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # with 2+ threads, ops on 64x64 tensors cost more than they save
    yield
    torch.set_num_threads(before)
