"""Peerstore patch: a full peerstore must not evict this host's own identity.

``peerstore_keeps_own``
    ``PeerStore._enforce_peer_limit`` (run by ``add_addrs`` once more than ``max_peers`` =
    1000 peers are stored) evicts entries without addresses first, and the host's own
    entry (its key pair) has none. After ~1000 distinct peers (churn does it: the soak
    benchmark crashed a daemon at ~6,500 connections from ~800 identities) the next
    publish raises ``PeerStoreError('peer ID not found')`` for our own id and the node
    stops. Patched to run the stock eviction with every entry that holds a private key
    (ours) set aside and put back after.
"""

from __future__ import annotations

from typing import Any

from libp2p.peer.peerstore import PeerStore


def keep_own_identity() -> None:
    """Never let the peer limit evict an entry holding a private key (this host's own)."""
    stock = PeerStore._enforce_peer_limit

    def enforce_peer_limit(self: Any) -> None:
        own = {peer: data for peer, data in self.peer_data_map.items() if data.privkey is not None}
        for peer in own:
            del self.peer_data_map[peer]
        try:
            stock(self)
        finally:
            self.peer_data_map.update(own)

    PeerStore._enforce_peer_limit = enforce_peer_limit  # type: ignore[method-assign]


__all__ = ["keep_own_identity"]
