"""Protocol attacks: free riding, replay, forgery, equivocation and flooding.

These break the protocol rather than poison the average; each one leaves the evidence
named in its docstring at honest receivers (see :mod:`p2pfl.core.rounds` and
:class:`p2pfl.core.reputation.Evidence`).
"""

from __future__ import annotations

import hashlib
import random
import time

from p2pfl.attacks._common import (
    add_noise,
    choice,
    integer,
    number,
    observed_states,
    seeded_generator,
)
from p2pfl.attacks.model import flipped
from p2pfl.core.codec import encode_state
from p2pfl.core.crypto import Identity
from p2pfl.core.envelope import AnnouncementKind, VerifiedHeader, encode_announcement, sign_update
from p2pfl.node.behaviour import Behaviour, PeerView, State
from p2pfl.node.outbox import Outbox, ServingWindow


class _Announcer(Behaviour):
    """A behaviour that publishes announcements of its own and repeats them with ours."""

    def __init__(self) -> None:
        self._extra: dict[int, list[bytes]] = {}  # round -> announcements to repeat
        self._window: ServingWindow | None = None  # our extra payloads, apart from the node's

    async def announce_payload(
        self, outbox: Outbox, round: int, payload: bytes, samples: int, *, serve: bytes | None = None
    ) -> VerifiedHeader:
        """Sign ``payload`` for ``round``, serve ``serve`` (default: it) under its digest, announce."""
        update = outbox.sign(round, payload, samples)
        self.serve(outbox, update.header.digest, payload if serve is None else serve)
        await self.publish_extra(outbox, round, encode_announcement(AnnouncementKind.UPDATE, update))
        return update

    def serve(self, outbox: Outbox, digest: bytes, payload: bytes) -> None:
        """Serve raw bytes under ``digest``, keeping the last few."""
        if self._window is None:
            self._window = outbox.window(keep=8)
        self._window.serve(digest, payload)

    async def publish_extra(self, outbox: Outbox, round: int, data: bytes) -> None:
        """Publish ``data`` now and with every re-announcement of ``round``."""
        self._extra.setdefault(round, []).append(data)
        for old in [r for r in self._extra if r < round - 2]:
            del self._extra[old]
        await outbox.publish_raw(data)

    async def reannounce(self, outbox: Outbox, round: int) -> None:
        """Repeat what the node announced and our own announcements of ``round``."""
        await outbox.reannounce(round)
        for data in self._extra.get(round, ()):
            await outbox.publish_raw(data)


class FreeRider(Behaviour):
    """Contribute nothing: announce someone else's model, or our own stale one.

    ``mode="copy"``: announce a received neighbour's model (round-robin over the observed
    peers) as ours, re-signed: the canonical encoding gives identical bytes, hence the
    author's digest, and receivers flag DUPLICATE_OF_OTHER. Nothing observed yet (round
    0): announce our own model. ``mode="stale"``: announce the model we had in our first
    round forever, plus fresh N(0, jitter^2) noise so that the digest changes and only
    the aggregation rule can notice (with ``jitter=0`` the digest repeats: REPLAY).
    """

    name = "free_rider"

    def __init__(self, mode: object = "copy", jitter: object = 1e-4, seed: object = 0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        self.mode = choice(self.name, "mode", mode, ("copy", "stale"))
        self.jitter = number(self.name, "jitter", jitter, low=0.0)
        self.generator = seeded_generator("free_rider", integer(self.name, "seed", seed))
        self._stale: State | None = None

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return the copied or stale model."""
        if self.mode == "copy":
            observed = observed_states(view)
            if not observed:
                return own
            peers = list(observed)
            return dict(observed[peers[round % len(peers)]])
        if self._stale is None:
            self._stale = {key: tensor.clone() for key, tensor in own.items()}
        return add_noise(self._stale, self.jitter, self.generator)


class Replay(Behaviour):
    """Replay our first update in every later round, and re-publish its old announcement.

    Round ``r0`` (our first): announce honestly. Every later round: announce the very same
    model again: same payload, same digest, signed for the new round; receivers see a
    digest this sender already used for another round (REPLAY, strong evidence). The
    original round-``r0`` announcement is also re-published with every re-announcement
    (STALE once ``r0`` is older than the receivers' ``max_lag``: neutral, since gossip
    forwarders replay old messages too; gossip layers drop exact repeats they remember).
    """

    name = "replay"

    def __init__(self) -> None:
        """Start with nothing to replay."""
        self._first: State | None = None
        self._original: bytes | None = None  # our first announcement

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return the model of our first round."""
        if self._first is None:
            self._first = {key: tensor.clone() for key, tensor in own.items()}
        return self._first

    async def announce(self, outbox: Outbox, round: int, state: State, samples: int) -> None:
        """Announce (a replay after the first round) and keep the first announcement."""
        update = await outbox.announce(round, state, samples)
        if self._original is None:
            self._original = encode_announcement(AnnouncementKind.UPDATE, update)

    async def reannounce(self, outbox: Outbox, round: int) -> None:
        """Repeat this round's announcement and the original one."""
        await outbox.reannounce(round)
        if self._original is not None:
            await outbox.publish_raw(self._original)


FORGE_MODES = ("all", "signer", "payload", "malformed")


class Forge(_Announcer):
    """Forge authorship and tamper with payloads.

    Each round, depending on ``mode``:

    - ``signer`` (and ``all``): publish, as ours, an UPDATE signed by a throwaway key
      (receivers: SignerMismatch -> INVALID_SIGNATURE against us, severe). Our own
      validator would refuse to publish it, but ``publishes_invalid`` lets it through,
      as a modified client would.
    - ``payload`` (``all``, even rounds): announce a correctly signed header of our model
      but serve bytes that differ in one byte (same size): the fetcher's sha256 check
      fails (TamperedPayload: INVALID_FORMAT against us, severe).
    - ``malformed`` (``all``, odd rounds): a correctly signed header of bytes that are not
      a model encoding (receivers: DecodeError -> INVALID_FORMAT, severe).
    - ``signer`` alone also announces our honest model.
    """

    name = "forge"
    publishes_invalid = True

    def __init__(self, mode: object = "all", seed: object = 0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        super().__init__()
        self.mode = choice(self.name, "mode", mode, FORGE_MODES)
        seed = integer(self.name, "seed", seed)
        self.rng = random.Random(f"forge/{seed}")
        self.throwaway = Identity.from_secret(hashlib.sha256(f"p2pfl-forge/{seed}".encode()).digest())

    async def announce(self, outbox: Outbox, round: int, state: State, samples: int) -> None:
        """Publish this round's forgeries (see the class docstring)."""
        payload = encode_state(state)
        if self.mode in ("all", "signer"):
            forged = sign_update(self.throwaway, network_id=outbox.network_id, round=round,
                                 payload=payload, samples=samples, ts_ms=int(time.time() * 1000))
            data = encode_announcement(AnnouncementKind.UPDATE, forged)
            await self.publish_extra(outbox, round, data)
        own = self.mode if self.mode != "all" else ("payload", "malformed")[round % 2]
        if own == "signer":
            await outbox.announce(round, state, samples)
        elif own == "payload":
            tampered = bytearray(payload)
            tampered[-1] ^= 0xFF
            await self.announce_payload(outbox, round, payload, samples, serve=bytes(tampered))
        else:
            await self.announce_payload(outbox, round, self.rng.randbytes(256), samples)


class Equivocate(Behaviour):
    """Sign two different updates for one round: the honest model and its sign flip.

    Both are served and announced (and re-announced). Receivers fetch whichever arrives
    first and flag the second digest as EQUIVOCATION (severe: ban). The second model is
    :func:`~p2pfl.attacks.model.flipped` with ``scale``, crafted from what we observe.
    """

    name = "equivocate"

    def __init__(self, scale: object = 10.0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        self.scale = number(self.name, "scale", scale, low=0.0, strict=True)
        self._other: State | None = None  # this round's conflicting model

    def craft(self, view: PeerView, round: int, own: State) -> State:
        """Return ``own``; keep its flip over what we observe for the second announcement."""
        self._other = flipped(own, list(observed_states(view).values()), self.scale)
        return own

    async def announce(self, outbox: Outbox, round: int, state: State, samples: int) -> None:
        """Announce ``state`` and the conflicting model for the same round."""
        await outbox.announce(round, state, samples)
        if self._other is not None:
            await outbox.announce(round, self._other, samples)


class Flood(_Announcer):
    """Spam ``rate`` validly signed headers per round for random, unserved digests.

    After our honest announcement, publish ``rate`` headers of this round for 32 random
    bytes each (never served). Receivers see a second digest for our round: EQUIVOCATION
    (severe) and a ban; fetches of the others fail. Our transport's publish rate limiter
    still applies (the flood slows us, and what reaches the wire is at most the limit);
    garbage bytes cannot be sent at all, since our own validator refuses them.
    """

    name = "flood"

    def __init__(self, rate: object = 50, seed: object = 0) -> None:
        """Check and keep the parameters (see :data:`p2pfl.attacks.ATTACKS`)."""
        super().__init__()
        self.rate = integer(self.name, "rate", rate, low=1)
        self.rng = random.Random(f"flood/{integer(self.name, 'seed', seed)}")

    async def announce(self, outbox: Outbox, round: int, state: State, samples: int) -> None:
        """Announce honestly, then flood."""
        await outbox.announce(round, state, samples)
        for _ in range(self.rate):
            junk = outbox.sign(round, self.rng.randbytes(32), samples)
            if not await outbox.publish_raw(encode_announcement(AnnouncementKind.UPDATE, junk)):
                return
