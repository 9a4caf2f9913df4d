"""Optimizers for :class:`~p2pfl.learners.torch_learner.TorchLearner`.

:class:`MomentumSGD` makes the same updates as ``torch.optim.SGD(params, lr, momentum)``
without importing ``torch._dynamo`` (2-5 s and ~800 modules per process, which any
``torch.optim`` optimizer pulls in; a testnet starts 8 processes on 2 cores).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch


class OptimizerLike(Protocol):
    """What the learner needs of an optimizer (``torch.optim.Optimizer`` has it all)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class MomentumSGD:
    """SGD with heavy-ball momentum, update for update the same as ``torch.optim.SGD``.

    ``buf = grad`` on the first step, then ``buf = momentum * buf + grad``;
    ``param -= lr * buf``. No weight decay, dampening or Nesterov.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = momentum
        self.buffers: dict[int, torch.Tensor] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none`` is accepted for torch compatibility)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        for index, p in enumerate(self.params):
            if p.grad is None:
                continue
            update = p.grad
            if self.momentum:
                buf = self.buffers.get(index)
                if buf is None:
                    buf = self.buffers[index] = p.grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(p.grad)
                update = buf
            p.add_(update, alpha=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"state": {index: {"momentum_buffer": t}}, "param_groups": [...]}``."""
        return {
            "state": {i: {"momentum_buffer": b} for i, b in self.buffers.items()},
            "param_groups": [{"lr": self.lr, "momentum": self.momentum}],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load momentum buffers (hyperparameters stay as constructed)."""
        buffers: dict[int, torch.Tensor] = {}
        for index, entries in state_dict["state"].items():
            buf = entries["momentum_buffer"]
            if not 0 <= index < len(self.params) or buf.shape != self.params[index].shape:
                raise ValueError(f"momentum buffer {index} does not fit its parameter")
            param = self.params[index]
            buffers[index] = buf.detach().to(param.device, param.dtype, copy=True)
        self.buffers = buffers


__all__ = ["MomentumSGD", "OptimizerLike"]
