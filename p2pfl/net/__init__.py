"""Network layer: the only package that imports libp2p. Moves opaque bytes.

- ``transport``: the ``Transport`` interface the node uses.
- ``memory``: in-process transports with latency, loss and partitions.
- ``host``, ``gossip``, ``transfer``, ``discovery``, ``libp2p_transport``: the libp2p
  implementation; ``patches``: every override of py-libp2p internals, in one registry.
"""
