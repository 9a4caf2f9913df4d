"""Test doubles shared by the attack tests."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


class FakeView:
    """A PeerView: what craft() reads, neighbour_states() and peer_id."""

    def __init__(self, held: Mapping[str, Mapping[str, Tensor]], peer_id: str = "me") -> None:
        self.held = held
        self.peer_id = peer_id

    def neighbour_states(self) -> dict[str, Mapping[str, Tensor]]:
        return dict(self.held)
