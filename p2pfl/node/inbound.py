"""What reaches a node from the network: announcements verified once, payloads pulled and checked.

Both halves turn a peer's bad input into reputation evidence through ``report`` and never
raise it into the node: an announcement that fails to verify is rejected at the gossip
validator; a payload that does not match its signed header or our model is dropped.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import torch
import trio

from p2pfl.config import Limits
from p2pfl.core.bounded import BoundedMap
from p2pfl.core.codec import codec_named, decode_payload
from p2pfl.core.crypto import short_id
from p2pfl.core.envelope import (
    CheckedPayload,
    ParsedAnnouncement,
    VerifiedHeader,
    check_payload,
    parse_announcement,
)
from p2pfl.core.reputation import Evidence
from p2pfl.core.rounds import Inbox, Received
from p2pfl.core.state import mismatch, nonfinite
from p2pfl.errors import (
    DecodeError,
    DigestMismatch,
    InvalidSignature,
    MissingBase,
    NetworkError,
    P2PFLError,
    PayloadNotFound,
    PayloadTooLarge,
    SignerMismatch,
    TamperedPayload,
    UnsupportedVersion,
    WrongNetwork,
)
from p2pfl.net.transport import Transport
from p2pfl.node.encoding import KEEP_BASES, payload_log_level

log = logging.getLogger(__name__)

Report = Callable[[str, Evidence, str], None]  # peer, evidence, reason
Compute = Callable[..., Awaitable[Any]]  # runs a CPU-bound function off the event loop

# The ban policy (docs/PROTOCOL.md "Ban policy"). Forgery is severe evidence: one
# announcement signed by the wrong key or not verifying bans its origin at once. A
# mismatch (another network, protocol version or format) is no proof of malice (version
# skew, a misconfigured node): it is counted and logged, never reputation evidence; the
# rejection itself feeds GossipSub's invalid-message score, which rate-limits the peer
# (gossip.py: tolerated once, gated from the third until it decays).
_INGRESS_EVIDENCE: Sequence[tuple[type[P2PFLError], Evidence]] = (
    (InvalidSignature, Evidence.INVALID_SIGNATURE),
    (SignerMismatch, Evidence.INVALID_SIGNATURE),
)
_MISMATCHES: Sequence[tuple[type[P2PFLError], str]] = (
    (WrongNetwork, "wrong_network"),
    (UnsupportedVersion, "unsupported_version"),
    (DecodeError, "invalid_format"),
)
_MAX_LOGGED_MISMATCHES = 1024  # (peer, kind) pairs logged once each
_MAX_VERIFIED = 1024  # announcements whose successful parse is remembered
_MAX_FETCHES = 8  # concurrent payload pulls; more would only queue on 2 cores
_MAX_HOLDER_DIGESTS = 1024
_MAX_SOURCES = 4  # the author, then up to three other holders
_MAX_BASES = 256  # senders whose last model is kept as a delta base (shared with the inbox)
# Waits before pulling again a payload whose every source failed on the way (a reset
# connection, a timeout, BUSY): the author re-announces only while it is still in that
# round, so without a retry one broken pull could leave us waiting out the round.
_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)
# Failures that pulling again cannot mend: nobody serves it, it is over our cap, or its
# source sent other bytes (blamed at once).
_FINAL = (PayloadNotFound, PayloadTooLarge, TamperedPayload)


class AnnouncementParser:
    """Verify announcements (the gossip validator's work), each distinct one once."""

    def __init__(self, *, me: str, network_id: str, limits: Limits, report: Report) -> None:
        """Verify for network ``network_id``; report failures of peers other than ``me``."""
        self._me, self._network_id, self._limits, self._report = me, network_id, limits, report
        self._verified: OrderedDict[tuple[str, bytes], ParsedAnnouncement] = OrderedDict()
        self.mismatches: Counter[str] = Counter()  # kind -> count (statistics' "rejected")
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()

    def parse(self, origin: str, data: bytes) -> ParsedAnnouncement:
        """Return the verified announcement; raise (after reporting ``origin``) if it is not."""
        # Re-announcements repeat the same bytes every round; an ecdsa check costs ~2 ms.
        # Only successes are cached, keyed by origin and the exact bytes.
        key = (origin, data)
        if (cached := self._verified.get(key)) is not None:
            self._verified.move_to_end(key)
            return cached
        try:
            parsed = parse_announcement(origin, data, network_id=self._network_id, limits=self._limits)
        except P2PFLError as exc:
            if origin != self._me:
                self._judge(origin, exc)
            raise
        self._verified[key] = parsed
        while len(self._verified) > _MAX_VERIFIED:
            self._verified.popitem(last=False)
        return parsed


    def _judge(self, origin: str, error: P2PFLError) -> None:
        """Ban a forger at once; count (and log once per peer) a mismatch."""
        evidence = next((ev for cls, ev in _INGRESS_EVIDENCE if isinstance(error, cls)), None)
        if evidence is not None:
            self._report(origin, evidence, f"announcement: {error}")
            return
        kind = next((name for cls, name in _MISMATCHES if isinstance(error, cls)), None)
        if kind is None:
            return
        self.mismatches[kind] += 1
        if (origin, kind) not in self._logged:
            self._logged[(origin, kind)] = None
            if len(self._logged) > _MAX_LOGGED_MISMATCHES:
                self._logged.popitem(last=False)
            log.warning("announcement from %s refused (%s; counted, not banned): %s",
                        short_id(origin), kind, error)


class Fetcher:
    """Pull announced payloads, check them against their header and our model, deliver them.

    A payload comes from its author and, for big ones, neighbours that announced they hold
    it (HOLDS) at once; failing that, from each such neighbour in turn; if they all failed
    on the way, all again after a wait (:data:`_RETRY_DELAYS`). At most ``_MAX_FETCHES``
    pulls run at once, each under the fetch deadline.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        inbox: Inbox,
        template: Mapping[str, tuple[torch.Size, torch.dtype]],
        limits: Limits,
        fetch_timeout: float,
        compute: Compute,
        report: Report,
        delivered: Callable[[VerifiedHeader, bytes], Awaitable[None]],
        pulling: Callable[[VerifiedHeader], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver into ``inbox``; await ``delivered(update, payload)`` after each delivery,
        and ``pulling(update)`` as soon as a pull serves its checked pieces to co-pullers."""
        self._transport, self._inbox, self._template = transport, inbox, template
        self._limits, self._fetch_timeout = limits, fetch_timeout
        self._compute, self._report, self._delivered = compute, report, delivered
        self._pulling = pulling
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()  # digest -> other sources
        self._fetching: set[tuple[str, bytes]] = set()
        # Each sender's last delivered models by payload digest: a delta codec's bases.
        self._bases: BoundedMap[str, dict[bytes, Mapping[str, torch.Tensor]]] = BoundedMap(_MAX_BASES)
        self._limiter = trio.CapacityLimiter(_MAX_FETCHES)
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # mypy misses the re-export
    ) -> None:
        """Host the pulls until cancelled (``await nursery.start(fetcher.run)``)."""
        async with trio.open_nursery() as self._nursery:
            task_status.started()
            await trio.sleep_forever()

    def remember_holder(self, digest: bytes, holder: str) -> None:
        """Note that neighbour ``holder`` announced it holds ``digest`` (bounded memory)."""
        self._holders.setdefault(digest, set()).add(holder)
        self._holders.move_to_end(digest)
        while len(self._holders) > _MAX_HOLDER_DIGESTS:
            self._holders.popitem(last=False)

    def start(self, update: VerifiedHeader) -> None:
        """Pull ``update`` unless we hold it, are pulling it, or its sender is gone."""
        header = update.header
        key = (header.sender, header.digest)
        if (
            self._nursery is None
            or key in self._fetching
            or not self._inbox.wants(header.sender, header.round)
            or header.sender not in self._transport.neighbours()
        ):
            return
        self._fetching.add(key)
        log.debug("fetching round %d from %s", header.round, short_id(header.sender))
        self._nursery.start_soon(self._fetch, update)

    async def _fetch(self, update: VerifiedHeader) -> None:
        header = update.header
        try:
            payload = await self._pull_retrying(update)
            if payload is None:
                self._inbox.give_up(header.sender, header.round)
                return
            state = await self._decode(update, payload)
            if state is None:
                return
            self._inbox.deliver(Received(header.sender, header.round, header.digest, header.samples, state))
            log.log(payload_log_level(header.size), "delivered %s: round %d from %s",
                    header.digest.hex()[:12], header.round, short_id(header.sender))
            if codec_named(header.codec).delta:  # a big model kept for nothing otherwise
                kept = self._bases.peek(header.sender) or {}
                recent = list(kept.items())[-(KEEP_BASES - 1):] if KEEP_BASES > 1 else []
                self._bases.put(header.sender, {**dict(recent), header.digest: state})
            await self._delivered(update, payload.data)
        finally:
            self._fetching.discard((header.sender, header.digest))

    async def _pull_retrying(self, update: VerifiedHeader) -> CheckedPayload | None:
        """:meth:`_pull`, again after each of :data:`_RETRY_DELAYS` while every source failed
        on the way (not for good) and the update would still be new to us."""
        header = update.header
        if header.size > self._limits.max_payload_bytes:
            log.info("%s announced %d bytes, above our cap", short_id(header.sender), header.size)
            return None
        for attempt, wait in enumerate((0.0, *_RETRY_DELAYS)):
            if attempt:
                await trio.sleep(wait)
                if not self._inbox.wants(header.sender, header.round):
                    return None
                if header.sender not in self._transport.neighbours():
                    continue  # trimmed or gone: no dial for it (it may be back by the next try)
                log.info("pulling %s from %s again (attempt %d of %d)", header.digest.hex()[:8],
                         short_id(header.sender), attempt + 1, len(_RETRY_DELAYS) + 1)
            async with self._limiter:  # not held while waiting: other pulls go on
                payload, transient = await self._pull(update)
            if payload is not None or not transient:
                return payload
        log.warning("gave up on %s from %s after %d attempts: its round goes on without it",
                    header.digest.hex()[:8], short_id(header.sender), len(_RETRY_DELAYS) + 1)
        return None

    async def _pull(self, update: VerifiedHeader) -> tuple[CheckedPayload | None, bool]:
        """Fetch the payload from its author and other holders at once, then from each holder.

        Returns the payload, or None and whether a source failed in a way that pulling
        again may mend (a broken connection, a timeout, BUSY; see :data:`_FINAL`).
        """
        header = update.header
        transient = False

        def holders() -> list[str]:
            return sorted(self._holders.get(header.digest, set()) - {header.sender})

        def blame(peer: str, reason: str) -> None:
            self._report(peer, Evidence.INVALID_FORMAT, f"served: {reason}")

        def on_map() -> None:  # co-pullers may take our checked pieces: say so now
            if self._pulling is not None and self._nursery is not None:
                self._nursery.start_soon(self._pulling, update)

        try:
            return await self._transport.fetch_from_holders(
                header.sender, header.digest, size=header.size, holders=holders, blame=blame,
                timeout=self._fetch_timeout, on_map=on_map), False
        except TamperedPayload as exc:
            blame(header.sender, str(exc))
        except NetworkError as exc:
            log.info("fetch %s from %s failed: %s", header.digest.hex()[:8], short_id(header.sender), exc)
            transient |= not isinstance(exc, _FINAL)
        neighbours = self._transport.neighbours()  # a holder is not dialled: it would be a neighbour
        for source in [h for h in holders() if h in neighbours][: _MAX_SOURCES - 1]:
            try:
                return await self._transport.fetch(
                    source, header.digest, max_size=header.size, timeout=self._fetch_timeout
                ), False
            except TamperedPayload as exc:
                blame(source, str(exc))
            except NetworkError as exc:
                log.info("fetch %s from %s failed: %s", header.digest.hex()[:8], short_id(source), exc)
                transient |= not isinstance(exc, _FINAL)
        return None, transient

    async def _decode(
        self, update: VerifiedHeader, payload: CheckedPayload
    ) -> dict[str, torch.Tensor] | None:
        """Check the payload against the signed header and our model; None if unusable."""
        header = update.header

        def base(digest: bytes) -> Mapping[str, torch.Tensor] | None:
            held = self._bases.peek(header.sender)  # only the sender's own previous models
            return held.get(digest) if held is not None else None

        try:
            check_payload(update, payload)
            state = await self._compute(
                decode_checked, header.codec, payload.data, limits=self._limits, base=base
            )
            if problem := mismatch(self._template, state):
                raise DecodeError(f"model differs from ours: {problem}")
        except MissingBase as exc:  # we missed its previous update: not the sender's fault
            log.info("payload of %s not usable: %s", short_id(header.sender), exc)
            return None
        except (DigestMismatch, DecodeError) as exc:
            self._report(header.sender, Evidence.INVALID_FORMAT, f"payload: {exc}")
            self._inbox.forget(header.sender)
            return None
        return dict(state)


def decode_checked(
    codec: str, data: bytes | bytearray | memoryview, *, limits: Limits,
    base: Callable[[bytes], Mapping[str, torch.Tensor] | None],
) -> Mapping[str, torch.Tensor]:
    """Decode a payload and refuse NaN/Inf, both off the event loop: the finite check of a
    100 MB model held the loop 0.2-0.4 s per pull, every transfer of the node waiting
    (session 12, py-spy of a 5-node big-model run)."""
    state = decode_payload(codec, data, limits=limits, base=base)
    if name := nonfinite(state):
        raise DecodeError(f"{name}: non-finite values")
    return state


__all__ = ["AnnouncementParser", "Fetcher", "Report"]
