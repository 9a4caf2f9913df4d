"""Small models for the default digits task, initialised deterministically from a seed."""

from __future__ import annotations

import math

import torch
from torch import nn

# 64 hidden units (4,810 parameters, a 19 KiB update): with lr 0.2 and momentum 0.9,
# FedAvg over 8 IID nodes reaches 0.95-0.97 after 10 rounds of 1 epoch (three seeds);
# 128 or 256 units were no better per round and double or quadruple every payload
# (benchmarks/bench_learner.py --sweep).
DEFAULT_HIDDEN = 64


class _UninitialisedLinear(nn.Linear):
    """A Linear layer whose constructor leaves the weights for the caller to initialise.

    Why not ``device="meta"`` + ``to_empty``: that path imports sympy (~1 s per process).
    """

    def reset_parameters(self) -> None:
        """Skip the default initialisation (which would draw from the global RNG)."""


class DigitsMLP(nn.Module):
    """Classify 8x8 digit images (64 features in [0, 1]) with one hidden ReLU layer."""

    def __init__(
        self,
        hidden: int = DEFAULT_HIDDEN,
        *,
        in_features: int = 64,
        num_classes: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        # Initialised below from ``generator`` only: construction never draws from (and
        # never advances) torch's global RNG, which other nodes' threads may be using.
        self.hidden: nn.Linear = _UninitialisedLinear(in_features, hidden)
        self.out: nn.Linear = _UninitialisedLinear(hidden, num_classes)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise like ``nn.Linear`` (Kaiming-uniform), drawing from ``generator``."""
        for layer in (self.hidden, self.out):
            init_linear(layer, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(B, 64)`` to logits ``(B, num_classes)``."""
        return self.out(torch.relu(self.hidden(x)))


def init_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """Initialise ``layer`` like ``nn.Linear`` does (Kaiming-uniform), drawing from ``generator``."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def digits_model(seed: int, *, hidden: int = DEFAULT_HIDDEN) -> nn.Module:
    """Build a DigitsMLP whose initial weights depend only on ``seed``.

    Every node that passes the same seed starts from the same model.
    """
    generator = torch.Generator().manual_seed(seed)
    return DigitsMLP(hidden, generator=generator)


def mlp(in_features: int, hidden: tuple[int, ...], num_classes: int, *, seed: int) -> nn.Sequential:
    """Build ``Linear, ReLU, ..., Linear`` whose initial weights depend only on ``seed``.

    A plain ``nn.Sequential``: an exported state dict loads into the same
    ``nn.Sequential(nn.Linear(...), nn.ReLU(), ...)`` written by hand, without p2pfl.
    """
    generator = torch.Generator().manual_seed(seed)
    sizes = (in_features, *hidden, num_classes)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        linear = _UninitialisedLinear(fan_in, fan_out)
        init_linear(linear, generator)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no ReLU after the logits


__all__ = ["DEFAULT_HIDDEN", "DigitsMLP", "digits_model", "init_linear", "mlp"]
