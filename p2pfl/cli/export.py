"""``p2pfl export``: a node's current model as a ``.safetensors`` file, for use without p2pfl.

Only the model's weights leave (no optimiser state, no reputation): the ``model.*``
entries of the learner's checkpoint, on the CPU, named as in the model's
``state_dict()``. The metadata holds the last finished round and its test accuracy::

    from safetensors.torch import load_file
    model = MyModel()                                   # the task's model, as built by its factory
    model.load_state_dict(load_file("model.safetensors"))
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from p2pfl.errors import ConfigError, DecodeError

MODEL_PREFIX = "model."  # TorchLearner.checkpoint_state names the model's tensors so


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``p2pfl export`` to ``parser``."""
    parser.add_argument("--data-dir", type=Path, required=True, help="the node's [node] data_dir (its checkpoint)")
    parser.add_argument("--out", type=Path, default=Path("model.safetensors"),
                        help="file to write (default model.safetensors)")


def export_command(args: argparse.Namespace) -> int:
    """Write the model of the checkpoint in ``args.data_dir`` to ``args.out``; print a summary."""
    metadata = export_model(args.data_dir, args.out)
    print(f"wrote {args.out}: round {metadata['round']}, accuracy {metadata['accuracy']}, "
          f"{metadata['tensors']} tensors")
    return 0


def export_model(data_dir: Path, out: Path) -> dict[str, str]:
    """Export the checkpoint in ``data_dir`` to ``out``; return the metadata written.

    Raises:
        ConfigError: no checkpoint there, a corrupt one, or one without model tensors.
    """
    from safetensors.torch import save_file

    from p2pfl.config import Limits
    from p2pfl.node.checkpoint import FILE_NAME, load_checkpoint

    try:
        checkpoint = load_checkpoint(data_dir, limits=Limits())
    except DecodeError as exc:
        raise ConfigError(f"--data-dir: {exc}") from None
    if checkpoint is None:
        raise ConfigError(f"--data-dir: no {FILE_NAME} in {data_dir}; give a node's [node] data_dir "
                          "after it finished a round")
    # Fresh contiguous copies: safetensors refuses tensors that share one decoded buffer.
    weights = {name.removeprefix(MODEL_PREFIX): tensor.detach().to("cpu").contiguous().clone()
               for name, tensor in checkpoint.learner_state.items() if name.startswith(MODEL_PREFIX)}
    if not weights:
        raise ConfigError(f"--data-dir: the checkpoint in {data_dir} holds no {MODEL_PREFIX}* tensors "
                          "(its learner is no TorchLearner)")
    last = checkpoint.history[-1] if checkpoint.history else None
    metadata = {
        "round": str(last.round if last else checkpoint.round - 1),
        "accuracy": repr(last.accuracy) if last and math.isfinite(last.accuracy) else "nan",
        "tensors": str(len(weights)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata=metadata)
    return metadata


__all__ = ["add_arguments", "export_command", "export_model"]
