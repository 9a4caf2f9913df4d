"""p2pfl: peer-to-peer decentralized learning over libp2p.

Nodes train locally, gossip signed model updates to their neighbours, mix what they
receive with a robust aggregation rule, and keep a reputation for every peer.
"""

from p2pfl import errors
from p2pfl.errors import P2PFLError

__all__ = ["P2PFLError", "errors"]
