"""Shared helpers of the attack library: parameter checks and coordinate-wise state maths.

States are ``name -> tensor`` maps that passed the node's compatibility check (same keys,
shapes and dtypes as ours). Only floating-point tensors are attacked: integer buffers
(counters, masks) are copied from the attacker's own model, since a receiver would
reject or ignore nonsense there anyway and it is not where the damage is done.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence

import torch

from p2pfl.errors import ConfigError
from p2pfl.node.behaviour import PeerView, State

StateLike = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------- parameters


def number(attack: str, param: str, value: object, *, low: float = -math.inf,
           strict: bool = False) -> float:
    """Return ``value`` as a finite float >= ``low`` (> when ``strict``); strings are parsed.

    Raises:
        ConfigError: not a number, not finite, or out of range.
    """
    try:
        result = float(value)  # type: ignore[arg-type]  # str/int/float; anything else fails
    except (TypeError, ValueError):
        raise ConfigError(f"attack {attack}: {param} must be a number, got {value!r}") from None
    bound_ok = result > low if strict else result >= low
    if isinstance(value, bool) or not math.isfinite(result) or not bound_ok:
        relation = ">" if strict else ">="
        raise ConfigError(f"attack {attack}: {param} must be a finite number {relation} {low}, "
                          f"got {value!r}")
    return result


def integer(attack: str, param: str, value: object, *, low: int = 0) -> int:
    """Return ``value`` as an int >= ``low``; strings are parsed.

    Raises:
        ConfigError: not an integer or out of range.
    """
    try:
        result = int(str(value)) if not isinstance(value, int) else value
    except ValueError:
        result = None
    if result is None or isinstance(value, bool) or result < low:
        raise ConfigError(f"attack {attack}: {param} must be an integer >= {low}, got {value!r}")
    return result


def choice(attack: str, param: str, value: object, options: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``options``.

    Raises:
        ConfigError: naming the valid options.
    """
    if value not in options:
        raise ConfigError(f"attack {attack}: {param} must be one of {', '.join(options)}, "
                          f"got {value!r}")
    return str(value)


# ---------------------------------------------------------------- state maths

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(own_tensor, observed_stack)``; the stack has shape (k, *own.shape)."""


def combine(own: StateLike, observed: Sequence[StateLike], fn: Combine) -> State:
    """Apply ``fn`` coordinate-wise to every floating tensor; copy the others from ``own``.

    With nothing observed, the stack holds ``own`` alone (the attacker's best estimate of
    what honest nodes hold is its own honest model).
    """
    result: State = {}
    for key, mine in own.items():
        if not mine.is_floating_point():
            result[key] = mine.clone()
            continue
        tensors = [s[key].to(mine.dtype) for s in observed] or [mine]
        result[key] = fn(mine, torch.stack(tensors)).to(mine.dtype)  # stack: (k, *shape)
    return result


def mean_of(own: StateLike, observed: Sequence[StateLike]) -> State:
    """Coordinate-wise mean of ``observed`` (``own`` when nothing is observed)."""
    return combine(own, observed, lambda _, stack: stack.mean(dim=0))


def seeded_generator(*key: object) -> torch.Generator:
    """Return a torch generator seeded from ``key``: reproducible, independent streams."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def add_noise(state: StateLike, sigma: float, generator: torch.Generator) -> State:
    """Return ``state`` + N(0, sigma^2) on every floating coordinate (keys in sorted order)."""
    result = {key: tensor.clone() for key, tensor in state.items()}
    for key in sorted(result):
        tensor = result[key]
        if tensor.is_floating_point() and sigma > 0:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            result[key] = tensor + (sigma * noise).to(tensor.dtype)
    return result


def observed_states(view: PeerView, exclude: Collection[str] = ()) -> dict[str, StateLike]:
    """The freshest verified model per peer that ``view`` holds, minus ``exclude``, by peer."""
    held = view.neighbour_states()
    return {peer: held[peer] for peer in sorted(held) if peer not in exclude}
