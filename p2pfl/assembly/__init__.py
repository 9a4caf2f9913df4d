"""One way to build a node: a :class:`NodeSpec` (plain data) -> :func:`build_node` -> Node.

Layer: above ``attacks`` (an attacker's spec names its attack), below ``sim`` and ``cli``,
which both build their nodes here. Map of the package:

- ``spec``: :class:`NodeSpec`, everything that makes one node (node and net config, task
  name and options, attack name and parameters, key file, data directory), and
  :class:`Service`, what the daemon adds around a node (rounds, HTTP port, exit).
- ``build``: :func:`build_node`, the one function that turns a spec into a ``Node``
  (learner from :data:`p2pfl.learners.tasks.TASKS`, behaviour from ``p2pfl.attacks``);
  the daemon, test network, simulator and tests call it. Transport and offload are
  arguments, so the simulator keeps its memory transport and inline training.
- ``toml``: the one TOML reader. Sections ``[node] [net] [train]/[task] [aggregation]
  [round] [reputation] [harm_check] [limits] [attack]`` mean the same in a node file
  and in a scenario file; keys are the fields of the config records, every value is
  checked against its field's type.
"""

from p2pfl.assembly.build import build_node, load_or_create_identity
from p2pfl.assembly.spec import NodeSpec, Service
from p2pfl.assembly.toml import NodeFile, load_node_file, read_node_file

__all__ = ["NodeFile", "NodeSpec", "Service", "build_node", "load_node_file", "load_or_create_identity",
           "read_node_file"]
