"""Per-sample loss gradients of a torch model (the span check's input, p2pfl/node/span.py).

The gradient of one sample's loss (a batch of one: under the loss's mean reduction, that
sample's loss), vectorised over the samples with ``torch.func.vmap``: 4x faster at 77k
parameters and 3x on digits than one batched backward pass over the losses
(benchmarks/bench_span.py). A model that ``vmap`` cannot run (control flow on a tensor's
value, ``.item()``) gets one backward pass per sample instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

Loss = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_gradients(
    model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    state: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *, vectorised: bool = True,
) -> tuple[torch.Tensor, bool]:
    """Return the gradient of each sample's loss at ``state``, and whether ``vmap`` ran.

    Rows: the samples of ``x, y``; columns: the floating tensors of ``state`` flattened
    in its key order. ``model`` runs in eval mode meanwhile and is not modified.
    ``vectorised`` False (for a model ``vmap`` failed on before) goes straight to one
    backward pass per sample.
    """
    params = {k: v.detach() for k, v in state.items() if v.is_floating_point()}
    rest = {k: v for k, v in state.items() if not v.is_floating_point()}

    def loss(weights: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, {**weights, **rest}, (xi.unsqueeze(0),))
        return loss_fn(logits, yi.unsqueeze(0))

    model.eval()
    try:
        grads = _vectorised(loss, params, x, y, model) if vectorised else None
        ran_vmap = grads is not None
        if grads is None:
            grads = _looped(loss, params, x, y)
    finally:
        model.train()
    return torch.cat([grads[k].reshape(len(y), -1) for k in params], dim=1).detach().cpu(), ran_vmap


def _vectorised(
    loss: Loss, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, model: nn.Module
) -> dict[str, torch.Tensor] | None:
    """``vmap`` of ``grad`` over the samples; None (and one log line) if the model refuses."""
    try:
        grads: dict[str, torch.Tensor] = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    except (RuntimeError, NotImplementedError) as exc:
        log.info("span check: torch.func.vmap cannot run %s (%s); one backward pass per sample instead",
                 type(model).__name__, str(exc).splitlines()[0])
        return None
    return grads


def _looped(loss: Loss, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss``'s gradient in ``params`` at each sample, one autograd pass each, stacked per
    parameter as ``vmap`` stacks them (zeros where a parameter does not take part)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    with torch.enable_grad():
        for xi, yi in zip(x, y, strict=True):
            grads = torch.autograd.grad(loss(leaves, xi, yi), list(leaves.values()), allow_unused=True)
            for (k, leaf), g in zip(leaves.items(), grads, strict=True):
                rows[k].append(torch.zeros_like(leaf) if g is None else g)
    return {k: torch.stack(r) if r else params[k].new_zeros((0, *params[k].shape)) for k, r in rows.items()}
