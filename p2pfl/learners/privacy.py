"""DP-SGD for :class:`~p2pfl.learners.torch_learner.TorchLearner`: sample-level privacy.

Each step (Abadi et al. 2016, as in Opacus):

1. draw a batch by Poisson sampling: every local sample joins with probability
   ``q = 1 / batches per epoch``, independently (what the accountant assumes);
2. compute every sample's gradient (``torch.func``: ``vmap`` of ``grad``, which is
   Opacus' ``functorch`` mode), clip each to L2 norm ``max_grad_norm``;
3. sum them, add Gaussian noise of std ``noise_multiplier x max_grad_norm``, divide by
   the expected batch size, and hand the result to the learner's own optimizer.

Opacus' RDP accountant calibrates ``noise_multiplier`` so that the planned steps
(rounds x local epochs x batches per epoch) spend at most ``(epsilon, delta)``, and it
keeps the account: its history is plain numbers ``(noise_multiplier, sample_rate,
steps)``, stored in the learner's checkpoint as a float64 tensor, so a restart does not
reset the budget. When the planned steps are spent, training stops.

Why not Opacus' ``PrivacyEngine``: its ``DPOptimizer`` wraps a ``torch.optim`` optimizer
(2-5 s of imports per process, see :mod:`~p2pfl.learners.optim`) and its hooks support a
fixed list of layer types; ``torch.func`` handles any layer that is a function of one
sample, and the learner keeps its :class:`~p2pfl.learners.optim.MomentumSGD`. Opacus
(and its import cost) is loaded only when privacy is on. Nothing here pickles.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from p2pfl.config import PrivacyConfig
from p2pfl.errors import ConfigError, LearnerError
from p2pfl.learners.batches import Batch, TensorBatches, epoch_seed

logger = logging.getLogger(__name__)

HISTORY = "privacy.history"  # checkpoint entry: (rows, 3) float64 accountant history
MAX_HISTORY_ROWS = 4096  # a checkpoint claiming more is corrupt (a row per sigma/q change)
ACCOUNTANT = "rdp"


@dataclass(frozen=True, slots=True)
class PrivacySpent:
    """A node's privacy account: what it spent of its budget."""

    epsilon: float  # spent so far, at ``delta``
    target: float  # the budget
    delta: float
    exhausted: bool  # the planned steps are spent: the node trains no more


def privacy_spent(learner: object) -> PrivacySpent | None:
    """A learner's privacy account (``TorchLearner.privacy_spent``); None: not private."""
    spent = getattr(learner, "privacy_spent", None)
    return spent() if callable(spent) else None


def check_model(model: nn.Module) -> None:
    """Raise ConfigError naming the first layer DP-SGD cannot train, and the fix."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"[privacy]: layer {name!r} ({type(module).__name__}) mixes the samples of a batch, "
                "so per-sample gradients are undefined; replace it with nn.GroupNorm "
                "(or opacus.validators.ModuleValidator.fix(model))"
            )


@functools.cache
def _alphas() -> tuple[float, ...]:
    """RDP orders: Opacus' defaults, and larger ones for short runs at a large epsilon."""
    from opacus.accountants import RDPAccountant

    return (*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256)


@functools.lru_cache(maxsize=64)
def calibrate(config: PrivacyConfig, *, sample_rate: float, steps: int) -> float:
    """Return the smallest noise multiplier whose ``steps`` spend at most ``config.epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=config.epsilon, target_delta=config.delta,
                                      sample_rate=sample_rate, steps=steps, accountant=ACCOUNTANT,
                                      alphas=list(_alphas())))


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_alphas())))


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Return the epsilon the accountant ``history`` spends at ``delta`` (0 when empty).

    What Opacus' ``RDPAccountant.get_epsilon`` computes, with its own functions; RDP adds
    up over steps, so one step's is computed once per (noise, rate) and scaled.
    """
    if not history:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(np.asarray(_rdp_of_one_step(sigma, rate)) * steps for sigma, rate, steps in history)
    epsilon, _ = get_privacy_spent(orders=list(_alphas()), rdp=rdp, delta=delta)
    return float(epsilon)


class PoissonBatches:
    """Poisson-sampled batches of a TensorBatches or a map-style DataLoader's data set."""

    def __init__(self, loader: Any) -> None:
        if isinstance(loader, TensorBatches):
            self._gather = lambda idx: (loader.features[idx], loader.labels[idx])
            self.size, self.batch_size = int(loader.labels.shape[0]), loader.batch_size
        elif isinstance(loader, DataLoader) and hasattr(loader.dataset, "__len__") and loader.batch_size:
            dataset, collate = loader.dataset, loader.collate_fn
            self._gather = lambda idx: collate([dataset[int(i)] for i in idx])
            self.size, self.batch_size = len(loader.dataset), loader.batch_size
        else:
            raise ConfigError(
                f"[privacy]: DP-SGD samples batches itself and needs a TensorBatches or a "
                f"DataLoader over a sized data set as train loader, got {type(loader).__name__}"
            )
        if self.size == 0:
            raise LearnerError("the training data yielded no samples")
        self.steps_per_epoch = math.ceil(self.size / self.batch_size)
        self.sample_rate = 1 / self.steps_per_epoch  # expected batch: size / steps ~ batch_size

    def gather(self, indices: torch.Tensor) -> Batch:
        """Return the samples at ``indices`` as one batch."""
        x, y = self._gather(indices)
        return x, y

    def draw(self, steps: int, generator: torch.Generator) -> Iterator[Batch | None]:
        """Yield ``steps`` batches, each sample included with probability ``sample_rate``.

        None is an empty batch: the step still adds its noise (and is accounted).
        """
        for _ in range(steps):
            chosen = (torch.rand(self.size, generator=generator) < self.sample_rate).nonzero().flatten()
            yield self.gather(chosen) if len(chosen) else None


class PrivateTraining:
    """DP-SGD steps of one model, and their account."""

    def __init__(self, config: PrivacyConfig, model: nn.Module, loader: Any, *, epochs: int) -> None:
        """Plan ``epochs`` epochs over ``loader`` within ``config``'s budget; check the model."""
        check_model(model)
        self.config = config
        self.model = model
        self.batches = PoissonBatches(loader)
        self.planned_steps = epochs * self.batches.steps_per_epoch
        self.noise_multiplier = calibrate(config, sample_rate=self.batches.sample_rate,
                                          steps=self.planned_steps)
        self.history: list[tuple[float, float, int]] = []
        logger.info("DP-SGD: noise multiplier %.3f for %d steps at q=%.4f within epsilon %.2f",
                    self.noise_multiplier, self.planned_steps, self.batches.sample_rate, config.epsilon)

    @property
    def steps_taken(self) -> int:
        """Steps accounted so far (this run and, after a restore, the earlier ones)."""
        return sum(steps for _, _, steps in self.history)

    @property
    def remaining_steps(self) -> int:
        """Steps left of the plan."""
        return max(0, self.planned_steps - self.steps_taken)

    def spent(self) -> PrivacySpent:
        """Return the account at ``config.delta``."""
        return PrivacySpent(epsilon=epsilon_of(self.history, self.config.delta), target=self.config.epsilon,
                            delta=self.config.delta, exhausted=self.remaining_steps == 0)

    def generator(self, epoch: int) -> torch.Generator:
        """Return the noise and sampling generator of ``epoch`` (secret unless seeded)."""
        seed = self.config.noise_seed
        return torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else epoch_seed(seed, epoch))

    def train_epoch(self, loss_fn: Any, optimizer: Any, epoch: int,
                    on_device: Callable[[Batch], Batch] = lambda batch: batch) -> tuple[int, float]:
        """Run one epoch of DP-SGD steps (fewer when the budget runs out); return samples, loss sum.

        Batches are drawn on the CPU and moved by ``on_device``; so is the noise.
        """
        steps = min(self.batches.steps_per_epoch, self.remaining_steps)
        generator = self.generator(epoch)
        seen, loss_sum = 0, 0.0
        for batch in self.batches.draw(steps, generator):
            loss_sum += self.step(None if batch is None else on_device(batch), loss_fn, optimizer, generator)
            seen += 0 if batch is None else len(batch[1])
        return seen, loss_sum

    def step(self, batch: Batch | None, loss_fn: Any, optimizer: Any, generator: torch.Generator) -> float:
        """Apply one noisy clipped step to the model; return the batch's loss sum."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        clipped, loss_sum = self._clipped_sum(params, batch, loss_fn)
        expected = self.batches.size * self.batches.sample_rate
        std = self.noise_multiplier * self.config.max_grad_norm
        optimizer.zero_grad(set_to_none=True)
        for name, p in params.items():
            noise = torch.normal(0.0, std, size=p.shape, generator=generator).to(p.device)
            p.grad = ((clipped.get(name, 0.0) + noise) / expected).to(p.dtype)
        optimizer.step()
        self._account(1)
        return loss_sum

    def _clipped_sum(self, params: Mapping[str, torch.Tensor], batch: Batch | None,
                     loss_fn: Any) -> tuple[dict[str, torch.Tensor], float]:
        """Return the sum of the batch's per-sample gradients, each clipped; and its loss sum."""
        if batch is None:
            return {}, 0.0
        x, y = batch
        grads, losses = per_sample_gradients(self.model, params, x, y, loss_fn)
        norms = torch.stack([g.reshape(len(y), -1).norm(dim=1) for g in grads.values()]).norm(dim=0)  # (B,)
        scale = (self.config.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # (B,)
        return {n: torch.einsum("b,b...->...", scale, g) for n, g in grads.items()}, float(losses.sum())

    def _account(self, steps: int) -> None:
        entry = (self.noise_multiplier, self.batches.sample_rate)
        if self.history and self.history[-1][:2] == entry:
            self.history[-1] = (*entry, self.history[-1][2] + steps)
        else:
            self.history.append((*entry, steps))

    def history_tensor(self) -> torch.Tensor:
        """Return the account as a ``(rows, 3)`` float64 tensor (no pickle in checkpoints)."""
        return torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3)

    def restore_history(self, table: torch.Tensor) -> None:
        """Load what :meth:`history_tensor` returned; raise LearnerError if it is not an account."""
        if table.dim() != 2 or table.shape[1] != 3 or table.shape[0] > MAX_HISTORY_ROWS:
            raise LearnerError(f"{HISTORY} must be a (rows, 3) table, got shape {tuple(table.shape)}")
        rows = [(float(s), float(q), float(n)) for s, q, n in table.to(torch.float64).tolist()]
        for sigma, rate, steps in rows:
            if not (math.isfinite(sigma) and sigma > 0 and 0 < rate <= 1 and steps >= 0 and steps == int(steps)):
                raise LearnerError(f"{HISTORY}: not an accountant entry: {(sigma, rate, steps)}")
        self.history = [(sigma, rate, int(steps)) for sigma, rate, steps in rows]


def per_sample_gradients(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor, loss_fn: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Return each sample's gradient ``{name: (B, *shape)}`` and loss ``(B,)``."""
    from torch.func import functional_call, grad_and_value, vmap

    buffers = {n: b for n, b in model.named_buffers()}
    detached = {n: p.detach() for n, p in params.items()}

    def loss_of_one(weights: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**buffers, **weights}, (xi.unsqueeze(0),))
        return loss_fn(logits, yi.unsqueeze(0))

    per_sample = vmap(grad_and_value(loss_of_one), in_dims=(None, 0, 0), randomness="different")
    grads, losses = per_sample(detached, x, y)
    return grads, losses.detach()


def dry_run(training: PrivateTraining, loss_fn: Any,
            on_device: Callable[[Batch], Batch] = lambda batch: batch) -> None:
    """Compute two samples' gradients once, so a model torch.func cannot handle fails at start."""
    x, y = on_device(training.batches.gather(torch.arange(min(2, training.batches.size))))
    params = {n: p for n, p in training.model.named_parameters() if p.requires_grad}
    try:
        per_sample_gradients(training.model, params, x, y, loss_fn)
    except Exception as exc:  # torch.func's errors: one line naming the cause
        raise ConfigError(f"[privacy]: per-sample gradients fail for this model: {exc}".splitlines()[0]) from exc


__all__ = ["HISTORY", "PoissonBatches", "PrivacySpent", "PrivateTraining", "calibrate", "check_model",
           "dry_run", "epsilon_of", "per_sample_gradients", "privacy_spent"]
