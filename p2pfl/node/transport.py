"""How a node opens its network: a factory given the node's announcement validator.

The daemon uses :func:`libp2p_transport`; simulations and tests pass a factory over the
in-memory transport (:class:`p2pfl.net.memory.MemoryNetwork`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from p2pfl.config import Limits, NetConfig
from p2pfl.core.crypto import Identity
from p2pfl.net.transport import Transport, Validator

TransportFactory = Callable[[Validator], AbstractAsyncContextManager[Transport]]


def libp2p_transport(
    identity: Identity, net: NetConfig, *, network_id: str, limits: Limits
) -> TransportFactory:
    """The real network: libp2p with the node's own key as its identity."""

    def open_transport(validator: Validator) -> AbstractAsyncContextManager[Transport]:
        from p2pfl.net.libp2p_transport import open_libp2p_transport  # imports libp2p: late

        return open_libp2p_transport(
            secret=identity.secret_bytes(),
            network_id=network_id,
            config=net,
            limits=limits,
            validator=validator,
        )

    return open_transport


__all__ = ["TransportFactory", "libp2p_transport"]
