"""Node TOML files: kept for imports of earlier releases; the reader is :mod:`p2pfl.assembly.toml`.

``DaemonConfig`` is :class:`~p2pfl.assembly.toml.NodeFile` and ``load_daemon_config`` is
:func:`~p2pfl.assembly.toml.load_node_file` (README "Changelog").
"""

from __future__ import annotations

from p2pfl.assembly.toml import SECTIONS, NodeFile, load_node_file

DaemonConfig = NodeFile
load_daemon_config = load_node_file

__all__ = ["SECTIONS", "DaemonConfig", "load_daemon_config"]
