"""Frozen, keyword-only configuration records, validated on construction.

Only the CLI reads argv, environment and files; everything else receives these records.
A wrong value raises :class:`~p2pfl.errors.ConfigError` naming the field and what to
change.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfl.errors import ConfigError

MiB = 1 << 20


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Bounds on everything a peer can make us read, decode or hold.

    Enforced both in the stream framing (before reading) and at decode (before
    allocating).
    """

    # 256 MiB fits a ~64M-parameter float32 model; raise it for bigger models.
    max_payload_bytes: int = 256 * MiB
    # A ResNet-50 state dict has ~320 entries; 4096 leaves room without inviting abuse.
    max_tensors: int = 4096
    max_ndim: int = 8
    max_name_bytes: int = 256
    # CBOR manifest of 4096 entries x ~300 bytes stays well under 2 MiB.
    max_manifest_bytes: int = 2 * MiB
    # Gossip control messages are signed headers and holder notices: a few hundred bytes.
    max_message_bytes: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "max_payload_bytes",
            "max_tensors",
            "max_ndim",
            "max_name_bytes",
            "max_manifest_bytes",
            "max_message_bytes",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"limits.{name}",
                f"must be a positive integer, got {value!r}",
            )


__all__ = ["Limits", "MiB", "require"]
