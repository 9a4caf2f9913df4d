"""What the node takes in: announcements verified and admitted, payloads pulled into the inbox.

The gossip validator (:meth:`Ingress.validate`) verifies every announcement once; the
announcement loop admits neighbours' updates (:func:`p2pfl.core.rounds.admit` over the
ledger of digests seen), keeps the freshest header per peer (catch-up reads it) and starts
the :class:`~p2pfl.node.inbound.Fetcher`, which checks each payload and delivers it into
the :class:`~p2pfl.core.rounds.Inbox`. Bad input becomes evidence through ``report``.

The ingress is also the node's :class:`~p2pfl.node.behaviour.PeerView`: what a behaviour
may legitimately observe is what came in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import torch
import trio

from p2pfl.core.crypto import short_id
from p2pfl.core.envelope import AnnouncementKind, ParsedAnnouncement, VerifiedHeader
from p2pfl.core.ledger import UpdateLedger
from p2pfl.core.reputation import Evidence
from p2pfl.core.rounds import Decision, Inbox, Received, admit, catch_up_target
from p2pfl.errors import P2PFLError
from p2pfl.net.transport import Announcement, Transport
from p2pfl.node.config import NodeConfig
from p2pfl.node.inbound import AnnouncementParser, Compute, Fetcher, Report

log = logging.getLogger(__name__)

Template = Mapping[str, tuple[torch.Size, torch.dtype]]  # what peers' models must look like


class Ingress:
    """Verify, admit and fetch neighbours' updates into :attr:`inbox`."""

    def __init__(
        self,
        *,
        peer_id: str,
        config: NodeConfig,
        publishes_invalid: bool,
        current_round: Callable[[], int],
        banned: Callable[[str], bool],
        report: Report,
        compute: Compute,
    ) -> None:
        """Take announcements for ``peer_id`` on ``config``'s network.

        Args:
            peer_id: Our own id.
            config: Node settings (network id, limits, round window, fetch timeout).
            publishes_invalid: Let our own invalid announcements out (a forging attacker).
            current_round: The node's round in progress.
            banned: Whether a peer is banned in the current round.
            report: Records evidence against a peer in the current round.
            compute: Runs CPU-bound work (payload decoding) off the event loop.
        """
        self.peer_id = peer_id
        self._config, self._publishes_invalid = config, publishes_invalid
        self._round, self._banned, self._report, self._compute = current_round, banned, report, compute
        rounds = config.rounds
        self._ledger = UpdateLedger(window=rounds.max_lag + rounds.max_lead + 2)
        self._parser = AnnouncementParser(
            me=peer_id, network_id=config.network_id, limits=config.limits, report=report
        )
        self.inbox = Inbox()
        self._freshest: dict[str, VerifiedHeader] = {}  # newest verified header per peer
        self._delivered = trio.Event()
        self._fetcher: Fetcher | None = None

    @property
    def freshest(self) -> Mapping[str, VerifiedHeader]:
        """The newest verified header admitted from each peer."""
        return self._freshest

    @property
    def mismatches(self) -> Mapping[str, int]:
        """Announcements refused for another network, version or format, by kind."""
        return self._parser.mismatches

    @property
    def fetcher(self) -> Fetcher:
        """The payload fetcher (once :meth:`run` has started)."""
        if self._fetcher is None:
            raise RuntimeError("ingress not running")
        return self._fetcher

    def neighbour_states(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The freshest verified model held from each peer (what attacks may observe)."""
        return self.inbox.latest()

    def validate(self, origin: str, data: bytes) -> ParsedAnnouncement | None:
        """Gossip validator: runs on every announcement before anyone sees it."""
        if origin == self.peer_id and self._publishes_invalid:
            with contextlib.suppress(P2PFLError):
                return self._parser.parse(origin, data)
            return None  # an attacker's own forgery: let it out, peers must catch it
        return self._parser.parse(origin, data)

    async def run(
        self,
        transport: Transport,
        template: Template,
        hold: Callable[[VerifiedHeader, bytes], Awaitable[None]],
        pulling: Callable[[VerifiedHeader], Awaitable[None]] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # mypy misses the re-export
    ) -> None:
        """Admit and fetch until cancelled (``await nursery.start(ingress.run, ...)``).

        Payloads must match ``template`` (our model's shapes and dtypes); after each
        delivery ``await hold(update, payload)`` serves what we pulled (and may say so);
        ``await pulling(update)`` as soon as a pull in progress serves its checked pieces.
        """

        async def delivered(update: VerifiedHeader, payload: bytes) -> None:
            self._delivered.set()
            await hold(update, payload)  # verified: neighbours may pull it from us too

        self._fetcher = Fetcher(
            transport=transport,
            inbox=self.inbox,
            template=template,
            limits=self._config.limits,
            fetch_timeout=self._config.rounds.fetch_timeout,
            compute=self._compute,
            report=self._report,
            delivered=delivered,
            pulling=pulling,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self._fetcher.run)
            task_status.started()
            async for announcement in transport.announcements():
                self._on_announcement(transport, announcement)

    async def next_delivery(self) -> None:
        """Wait for the next payload delivered into the inbox."""
        self._delivered = trio.Event()
        await self._delivered.wait()

    async def fetch_freshest(self, peers: Sequence[str], round: int) -> None:
        """Fetch each of ``peers``' freshest update; return once all of ``round`` are in."""
        for peer in peers:
            self.fetcher.start(self._freshest[peer])
        while not self.inbox.ready(peers, round, 1.0):
            await self.next_delivery()

    def behind(self, expected: Sequence[str], round: int) -> tuple[int, list[str]] | None:
        """The round to jump to and the peers to start from, when ``round`` is far behind."""
        rounds = self._config.rounds
        return catch_up_target(
            {peer: update.header.round for peer, update in self._freshest.items()},
            expected,
            round,
            after=rounds.catch_up_after,
            sources=rounds.catch_up_sources,
        )

    def take(self, round: int) -> list[Received]:
        """The updates to aggregate in ``round`` (see :meth:`Inbox.take`)."""
        return self.inbox.take(round, max_lag=self._config.rounds.max_lag)

    def _on_announcement(self, transport: Transport, announcement: Announcement) -> None:
        parsed: ParsedAnnouncement | None = announcement.value
        if parsed is None:
            return
        header = parsed.update.header
        neighbours = transport.neighbours()
        if parsed.kind is AnnouncementKind.HOLDS and announcement.origin in neighbours:
            self.fetcher.remember_holder(header.digest, announcement.origin)
        # We aggregate neighbours only; what everyone else says is gossip's business (and
        # tracking every sender would let one attacker with many keys grow our memory).
        if header.sender == self.peer_id or header.sender not in neighbours:
            return
        now = self._round()
        observation = self._ledger.observe(header.sender, header.round, header.digest)
        rounds = self._config.rounds
        admission = admit(observation, header.round, now, max_lag=rounds.max_lag, max_lead=rounds.max_lead)
        log.debug(
            "[%s] announcement %s round %d from %s via %s: %s %s",
            short_id(self.peer_id),
            parsed.kind.name,
            header.round,
            short_id(header.sender),
            short_id(announcement.origin),
            admission.decision.value,
            admission.reason,
        )
        if admission.evidence is not None:
            self._report(header.sender, admission.evidence, admission.reason)
        if admission.decision is Decision.REJECT:
            self.inbox.forget(header.sender)
            return
        if self._banned(header.sender):
            return
        freshest = self._freshest.get(header.sender)
        if freshest is None or header.round > freshest.header.round:
            self._freshest[header.sender] = parsed.update
        author = self.inbox.first_author(header.digest, header.sender)
        if author != header.sender:
            reason = f"re-announced {short_id(author)}'s model as its own"
            self._report(header.sender, Evidence.DUPLICATE_OF_OTHER, reason)
            return
        if admission.decision is Decision.FETCH:
            self.fetcher.start(parsed.update)
