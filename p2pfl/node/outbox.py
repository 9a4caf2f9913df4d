"""What leaves the node: the outbound pipeline, the serving window, re-announcements.

An update leaves as::

    state -> transforms (in order) -> encode (codec) -> sign -> serve -> publish

A :class:`Transform` changes the state before it is encoded, so the signed digest is
that of what peers actually receive; transforms are the seam for differential privacy,
sparsification and the like, and compose with whichever codec encodes the result (the
encode step: ``[net] codec``, see :mod:`p2pfl.node.encoding`; the header is signed with
the codec's name). They apply to
every update the node announces, whatever a behaviour crafted; raw publishes
(:meth:`Outbox.publish_raw`, for protocol attacks) bypass them.

Behaviours (:mod:`p2pfl.node.behaviour`) get the outbox, never the node: it signs with
the node's key and publishes through its transport, and nothing else.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from p2pfl.core.bounded import BoundedMap
from p2pfl.core.crypto import Identity
from p2pfl.core.envelope import AnnouncementKind, VerifiedHeader, encode_announcement, sign_update
from p2pfl.core.state import State
from p2pfl.errors import NetworkError
from p2pfl.net.transport import Transport
from p2pfl.node.encoding import HOLDS_MIN_BYTES, Encoder, payload_log_level

log = logging.getLogger(__name__)

_MAX_HELD_NOTICES = 256  # digests we said we hold (one notice each)
# Payload bytes a node keeps serving. Small models never reach it (the count bounds
# them); a 100 MB model would otherwise keep ~4 rounds x (neighbours + 1) payloads, ~2-3
# GB per node. Beyond it the oldest go first: a peer lagging more than about a round then
# gets NOT_FOUND for that payload and goes without it.
WINDOW_BYTES = 768 << 20

Compute = Callable[..., Awaitable[Any]]  # runs a CPU-bound function off the event loop


class Transform(Protocol):
    """One outbound step: ``apply(round, state) -> state``, before encoding and signing.

    Must not mutate ``state`` (it may be the learner's own tensors or a behaviour's
    remembered model); runs in the compute thread, so it may be CPU-heavy.
    """

    def apply(self, round: int, state: State) -> State:
        """Return the state to send in place of ``state`` for ``round``."""
        ...


def apply_transforms(transforms: Sequence[Transform], round: int, state: State) -> State:
    """Apply ``transforms`` to ``state`` in order."""
    for transform in transforms:
        state = transform.apply(round, state)
    return state


class ServingWindow:
    """Payloads served under their digest; the oldest are unserved beyond ``keep()`` payloads
    or :data:`WINDOW_BYTES` (the newest is always served)."""

    def __init__(self, transport: Transport, keep: Callable[[], int]) -> None:
        """Serve on ``transport``; ``keep`` is read on every addition."""
        self._transport, self._keep = transport, keep
        self._served: OrderedDict[bytes, int] = OrderedDict()  # digest -> size, oldest first
        self._bytes = 0

    def serve(self, digest: bytes, payload: bytes) -> None:
        """Serve ``payload`` under ``digest`` (again: as the newest), unserving the oldest."""
        self._transport.serve(digest, payload)
        self._bytes += len(payload) - self._served.pop(digest, 0)
        self._served[digest] = len(payload)
        keep = self._keep()
        while len(self._served) > 1 and (len(self._served) > keep or self._bytes > WINDOW_BYTES):
            old, size = self._served.popitem(last=False)
            self._bytes -= size
            self._transport.unserve(old)


class Outbox:
    """Sign, serve and publish this node's updates; repeat them until the round closes."""

    def __init__(
        self,
        *,
        transport: Transport,
        identity: Identity,
        network_id: str,
        max_lag: int,
        compute: Compute,
        transforms: Sequence[Transform] = (),
        encoder: Encoder | None = None,
        holds: bool = True,
    ) -> None:
        """Publish on ``transport`` as ``identity``; remember ``max_lag`` rounds to re-announce.

        ``encoder`` is the encode step (default ``raw``, see :mod:`p2pfl.node.encoding`).
        ``holds``: serve the verified payloads we pull, and say so (:meth:`hold`); False
        in a network that pulls from authors only, where they would be kept for nobody.
        """
        self._transport, self._identity, self._compute = transport, identity, compute
        self._encoder = encoder or Encoder("raw")
        self.network_id = network_id
        self._max_lag = max_lag
        self._transforms = tuple(transforms)
        # Our updates and the verified payloads we pulled: the last few rounds' worth.
        self._window = ServingWindow(transport, lambda: 4 * (len(transport.neighbours()) + 1))
        self._announced: dict[int, list[VerifiedHeader]] = {}
        self._held: BoundedMap[bytes, bool] = BoundedMap(_MAX_HELD_NOTICES)
        self._holds = holds

    @property
    def peer_id(self) -> str:
        """The identity updates are signed with."""
        return self._identity.peer_id

    async def announce(self, round: int, state: State, samples: int) -> VerifiedHeader:
        """Transform, encode, sign, serve and publish ``state`` as our update of ``round``."""
        held = self._encoder.held_bases(self._transport)
        payload = await self._compute(self._encode, round, state, held)
        update = self.sign(round, payload, samples)
        self.serve(update.header.digest, payload)
        self._announced.setdefault(round, []).append(update)
        for old in [r for r in self._announced if r < round - self._max_lag]:
            del self._announced[old]
        log.log(payload_log_level(len(payload)), "announcing %s: round %d, %d bytes",
                update.header.digest.hex()[:12], round, len(payload))
        await self.publish(AnnouncementKind.UPDATE, update)
        return update

    def _encode(self, round: int, state: State, held: frozenset[bytes]) -> bytes:
        state = apply_transforms(self._transforms, round, state)
        return self._encoder.encode(round, state, held=held)

    async def reannounce(self, round: int) -> None:
        """Publish again what we announced for ``round`` while a neighbour has not pulled it.

        Gossip is lossy, so an announcement is repeated; but each one costs every
        subscriber a pubsub message, so only while some current neighbour (a new one
        too) has yet to pull the payload from us.
        """
        neighbours = set(self._transport.neighbours())
        for update in self._announced.get(round, ()):
            if neighbours - self._transport.pulled_by(update.header.digest):
                await self.publish(AnnouncementKind.UPDATE, update)

    async def hold(self, update: VerifiedHeader, payload: bytes) -> None:
        """Serve a verified payload we pulled, and say so (HOLDS) if it is big.

        Neighbours still pulling it may then take pieces from us instead of all from its
        author (``[net] fetch_sources``). One notice per payload of at least
        :data:`HOLDS_MIN_BYTES`; it holds while the payload stays in the serving window.
        Nothing at all without ``holds``: a 100 MB model's pulled payloads filled the window
        (768 MiB) for no puller (docs/benchmarks/bigmodel.txt, "Session 9").
        """
        if not self._holds:
            return
        self.serve(update.header.digest, payload)
        await self.pulling(update)

    async def pulling(self, update: VerifiedHeader) -> None:
        """Say HOLDS for a big payload once (with ``holds``): we hold it, or we are pulling
        it and serve the pieces we checked against its author's piece map meanwhile (what
        a HOLDS means since session 10; co-pullers then swap pieces instead of all taking
        the whole payload from its author)."""
        digest = update.header.digest
        if not self._holds or update.header.size < HOLDS_MIN_BYTES or digest in self._held:
            return
        self._held.put(digest, True)
        await self.publish(AnnouncementKind.HOLDS, update)

    # ---------------------------------------------------------- building blocks

    def sign(self, round: int, payload: bytes, samples: int) -> VerifiedHeader:
        """Sign ``payload`` (already encoded, not transformed) as our update of ``round``."""
        return sign_update(
            self._identity,
            network_id=self.network_id,
            round=round,
            payload=payload,
            samples=samples,
            ts_ms=int(time.time() * 1000),
            codec=self._encoder.codec,
        )

    def serve(self, digest: bytes, payload: bytes) -> None:
        """Serve ``payload`` under ``digest`` in the node's window."""
        self._window.serve(digest, payload)

    def window(self, keep: int) -> ServingWindow:
        """A separate serving window of ``keep`` payloads (a behaviour's extra bytes)."""
        return ServingWindow(self._transport, lambda: keep)

    async def publish(self, kind: AnnouncementKind, update: VerifiedHeader) -> bool:
        """Publish an announcement of ``update``; False if the network refused it."""
        return await self.publish_raw(encode_announcement(kind, update))

    async def publish_raw(self, data: bytes) -> bool:
        """Publish announcement bytes as they are; False if the network refused them."""
        try:
            await self._transport.publish(data)
        except NetworkError as exc:  # lossy by nature; the next re-announce may pass
            log.warning("announcement not published: %s", exc)
            return False
        return True


__all__ = ["HOLDS_MIN_BYTES", "Outbox", "ServingWindow", "Transform", "apply_transforms"]
