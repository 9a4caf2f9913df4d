"""A daemon whose relay garbles, stalls or drops the circuits it carries (test only).

Run as ``python -c "from tests.netns.hostile_relay import main; main()" node run …`` (see
:meth:`tests.netns.lab.Lab.start`): the node is an honest p2pfl node in every other way
(bootstrap, peer exchange, training), so only its relaying is hostile. Each relayed
stream, once past the handshakes (its first chunk over 1000 bytes: a payload), gets the
next of :data:`ACTS` in turn, and the relay logs ``hostile relay: <act>`` (the test
reads its log).
"""

from __future__ import annotations

import itertools
import logging
import sys
from typing import Any

import trio

from p2pfl.cli.main import main as cli_main
from p2pfl.net import patches

ACTS = ("garble", "stall", "drop")
logger = logging.getLogger("p2pfl.hostile")


def install() -> None:
    """Replace the relay's forwarding step with a hostile one."""
    forward = patches.relay._forward
    acts = itertools.cycle(ACTS)
    chosen: dict[int, str] = {}  # id of a relayed stream -> its act

    async def hostile(relay: Any, dst_stream: Any, data: bytes) -> None:
        if len(data) <= 1000 and id(dst_stream) not in chosen:  # handshakes: let them through
            await forward(relay, dst_stream, data)
            return
        if id(dst_stream) not in chosen:
            chosen[id(dst_stream)] = next(acts)
            logger.warning("hostile relay: %s", chosen[id(dst_stream)])
        act = chosen[id(dst_stream)]
        if act == "garble":  # one flipped bit: Noise on the far end refuses the frame
            await forward(relay, dst_stream, data[:500] + bytes([data[500] ^ 1]) + data[501:]
                          if len(data) > 500 else data)
        elif act == "stall":  # forward nothing more, keep the circuit open
            await trio.sleep_forever()
        else:  # drop: end the circuit (the relay resets both its streams)
            raise ConnectionResetError("hostile relay drops the circuit")

    patches.relay._forward = hostile


def main() -> None:
    install()
    sys.exit(cli_main())
