"""Pure core: no I/O, no clock, no trio, no libp2p. Time and randomness come in as arguments.

- ``codec``: tensors <-> bytes (CBOR manifest + raw little-endian data), never pickle.
- ``crypto``: secp256k1 identities, signatures, PeerIds.
- ``envelope``: signed update headers, verification at ingress, replay/equivocation memory.
- ``aggregation``: robust aggregation rules registered by name in ``RULES``.
- ``reputation``: per-peer scores from typed evidence.
"""
