"""The browser dashboard: static pages shipped in the package, read-only, loopback only.

- ``static/``: ``node.html`` (one daemon, served at ``/`` next to ``/status``),
  ``testnet.html`` (a whole test network, served by ``p2pfl testnet --dashboard PORT``),
  their scripts and one stylesheet. No build step, no CDN: plain ES modules that poll JSON
  and insert everything a peer controls as text, never as markup.
- :mod:`.assets`: looks those files up by exact name (no path is ever joined).
- :mod:`.network`: the test network's aggregate document (``/network``) and the
  background server the launcher runs.
"""
