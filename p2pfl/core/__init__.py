"""Pure core: no I/O, no clock, no trio, no libp2p. Time and randomness come in as arguments.

- ``codec``: tensors <-> bytes (CBOR manifest + raw little-endian data), never pickle;
  the codec registry ``CODECS`` keyed by the signed header's ``codec`` field.
- ``cbor``: the one strict reader of the canonical CBOR that peers send.
- ``crypto``: secp256k1 identities, signatures, PeerIds.
- ``envelope``: signed update headers, verification at ingress, payloads hashed once.
- ``ledger``: replay/equivocation memory. ``bounded``: the one bounded, expiring map.
- ``state``: what a state (``State``) is and whether it fits a model.
- ``aggregation``: robust aggregation rules registered by name in ``RULES``, each entry
  carrying its capabilities (``RULES[name].clipping``, ``.uses_samples``).
- ``reputation``: per-peer scores from typed evidence.
- ``lossy``: the lossy codecs (fp16, bf16, int8, topk), registered in ``CODECS`` when
  imported; ``envelope`` (every header check) imports them. Importing the package alone does
  not: ``p2pfl --help`` and ``node status`` reach ``core.crypto`` and must not load torch.
"""

