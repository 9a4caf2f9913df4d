"""The node: trains locally, gossips signed updates, robustly mixes its neighbours' models.

A round at node *i* (no global barrier)::

    train (worker thread) -> encode, sign, serve, announce (re-announce until closed)
      -> pull neighbours' updates of this round until quorum or deadline
      -> aggregate centred on the own model, weights = mixing x reputation
      -> reputation evidence -> evaluate -> checkpoint

Everything runs in the nursery the node owns (``async with Node(...)``); every network
wait has a deadline; a misbehaving peer never raises through the node: its input
becomes reputation evidence and is dropped. Verifying announcements and pulling payloads
is :mod:`p2pfl.node.inbound`'s work; the decisions (admission, quorum, catching up) are
pure functions in :mod:`p2pfl.core.rounds`.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

import torch
import trio

from p2pfl.config import Limits, NetConfig
from p2pfl.core.aggregation import CLIPPING_RULES, Aggregate, aggregate
from p2pfl.core.codec import encode_state
from p2pfl.core.crypto import Identity, short_id
from p2pfl.core.envelope import (
    AnnouncementKind,
    ParsedAnnouncement,
    VerifiedHeader,
    encode_announcement,
    sign_update,
)
from p2pfl.core.ledger import UpdateLedger
from p2pfl.core.reputation import Evidence, ReputationBook
from p2pfl.core.rounds import Decision, Inbox, Received, admit, catch_up_target
from p2pfl.core.state import template_of
from p2pfl.errors import (
    NetworkError,
    P2PFLError,
)
from p2pfl.learners.base import Learner, State
from p2pfl.net.transport import Announcement, Transport, Validator
from p2pfl.node.behaviour import Behaviour
from p2pfl.node.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from p2pfl.node.config import NodeConfig
from p2pfl.node.harm import HarmGate, Prober, starting_point
from p2pfl.node.inbound import AnnouncementParser, Fetcher
from p2pfl.node.stats import NodeStatistics, RoundRecord, reputation_rows

log = logging.getLogger(__name__)

T = TypeVar("T")
TransportFactory = Callable[[Validator], AbstractAsyncContextManager[Transport]]



def libp2p_transport(
    identity: Identity, net: NetConfig, *, network_id: str, limits: Limits
) -> TransportFactory:
    """The real network: libp2p with the node's own key as its identity."""

    def open_transport(validator: Validator) -> AbstractAsyncContextManager[Transport]:
        from p2pfl.net.libp2p_transport import open_libp2p_transport  # imports libp2p: late

        return open_libp2p_transport(
            secret=identity.secret_bytes(),
            network_id=network_id,
            config=net,
            limits=limits,
            validator=validator,
        )

    return open_transport


def update_norm(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """Length of the change local training made to the floating-point parameters."""
    squares = sum(
        float(torch.sum((after[k].double() - before[k].double()) ** 2))
        for k in after
        if after[k].is_floating_point()
    )
    return squares**0.5


class Node:
    """One participant: ``async with Node(...) as node: await node.run(rounds=10)``."""

    def __init__(
        self,
        config: NodeConfig,
        learner: Learner,
        *,
        identity: Identity | None = None,
        transport: TransportFactory | None = None,
        net: NetConfig | None = None,
        offload: bool = True,
        behaviour: Behaviour | None = None,
    ) -> None:
        """Create a node; nothing runs until ``async with``.

        Args:
            config: Node settings.
            learner: Local model, data and training loop (synchronous).
            identity: The node's key; also its network identity. Default: a new,
                ephemeral key (a daemon keeps its key in a file).
            transport: Opens the network given the node's announcement validator.
                Default: libp2p with ``net``; simulations pass a memory transport.
            net: libp2p settings (port, bootstrap peers...) for the default transport.
            offload: Run training/encoding in a worker thread (daemon). Simulations
                under a mock clock run them inline: a thread would let the clock jump.
            behaviour: How the node presents itself; honest by default. Test networks
                pass an attack from ``p2pfl.attacks``.
        """
        self.config = config
        self.learner = learner
        self.identity = identity = identity or Identity.generate()
        self.peer_id = identity.peer_id
        self._open_transport = transport or libp2p_transport(
            identity, net or NetConfig(), network_id=config.network_id, limits=config.limits
        )
        self._offload = offload
        self.behaviour = behaviour or Behaviour()
        self._book = ReputationBook(config.reputation)
        self._ledger = UpdateLedger(window=config.rounds.max_lag + config.rounds.max_lead + 2)
        self._inbox = Inbox()
        self._round = 0
        self._rounds_target: int | None = None
        self._state = "starting"
        self._history: list[RoundRecord] = []
        self._metrics: tuple[float, float] | None = None
        self._accepted = 0
        self._rejected: Counter[str] = Counter()
        self._freshest: dict[str, VerifiedHeader] = {}  # newest verified header per peer
        self._served: list[bytes] = []
        self._announced: dict[int, list[VerifiedHeader]] = {}
        self._delivered = trio.Event()
        self._round_finished = trio.Event()
        self._compute_limiter = trio.CapacityLimiter(1)
        self._transport: Transport | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._template: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._own_step: float | None = None  # length of our last local update
        self._start: State | None = None  # our model before the last local training
        self._harm: HarmGate | None = None
        check = config.harm_check
        if check.enabled and config.rule in CLIPPING_RULES:
            if isinstance(learner, Prober):
                self._harm = HarmGate(check, learner)
            else:
                log.info("harm check off: %s has no probe_losses", type(learner).__name__)
        self._parser = AnnouncementParser(
            me=self.peer_id, network_id=config.network_id, limits=config.limits, report=self._report
        )
        self._fetcher: Fetcher | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Node:
        self._restore()
        # Shapes and dtypes peers' models must have; read once, never mid-training.
        self._template = template_of(self.learner.get_state())
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._transport = await stack.enter_async_context(self._open_transport(self._validate))
            self._nursery = await stack.enter_async_context(trio.open_nursery())
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        self._fetcher = Fetcher(
            transport=self._transport,
            inbox=self._inbox,
            template=self._template,
            limits=self.config.limits,
            fetch_timeout=self.config.rounds.fetch_timeout,
            compute=self._compute,
            report=self._report,
            delivered=self._on_delivered,
        )
        await self._nursery.start(self._fetcher.run)
        self._nursery.start_soon(self._announcement_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        if self._state != "done":
            self._state = "stopped"
        return await self._stack.__aexit__(exc_type, exc, traceback)

    @property
    def transport(self) -> Transport:
        """The open transport (inside ``async with`` only)."""
        if self._transport is None:
            raise RuntimeError("the node is not open: use `async with Node(...)`")
        return self._transport

    @property
    def fetcher(self) -> Fetcher:
        """The payload fetcher (inside ``async with`` only)."""
        if self._fetcher is None:
            raise RuntimeError("the node is not open: use `async with Node(...)`")
        return self._fetcher

    @property
    def round(self) -> int:
        """The round in progress, or the next one."""
        return self._round

    async def wait_for_round(self, number: int) -> None:
        """Return once round ``number`` has finished here (or a later one has)."""
        while self._round <= number:
            await self._round_finished.wait()

    # ------------------------------------------------------------------ rounds

    async def run(self, rounds: int | None = None) -> NodeStatistics:
        """Run rounds until ``rounds`` have finished in total (None: until cancelled)."""
        self._rounds_target = rounds
        await self._wait_for_neighbours()
        while rounds is None or self._round < rounds:
            await self._maybe_catch_up()
            await self._run_round(self._round)
        self._state = "done"
        return self.statistics()

    async def _wait_for_neighbours(self) -> None:
        """Give a network started together the chance to train together."""
        settings = self.config.rounds
        with trio.move_on_after(settings.start_timeout):
            # Bounded: at most start_timeout / 0.1 polls.
            while len(self.transport.neighbours()) < settings.min_neighbours:  # noqa: ASYNC110 (no event for neighbour changes)
                await trio.sleep(0.1)

    async def _run_round(self, number: int) -> None:
        started = trio.current_time()
        self._state = "training"
        before = self.learner.get_state()
        samples = await self._compute(self.learner.fit, self.config.rounds.local_epochs)
        own = self.learner.get_state()
        self._own_step = update_norm(before, own)
        self._start = before
        shared = self.behaviour.craft(self, number, own)
        await self.behaviour.announce(self, number, shared, samples)
        self._state = "collecting"
        await self._collect(number)
        if self._catch_up_target() is not None:
            return  # the network is far ahead: abandon this round and catch up
        self._state = "aggregating"
        used = await self._aggregate(number, own, samples)
        metrics = await self._compute(self.learner.evaluate)
        self._metrics = (metrics.accuracy, metrics.loss)
        for peer in self._book.end_round(number):
            after = self.config.reputation.drop_after
            log.info("peer %s: updates discarded in %d rounds, dropped", short_id(peer), after)
        self._enforce_bans(number)
        stats = self.transport.stats()
        record = RoundRecord(
            round=number,
            accuracy=metrics.accuracy,
            loss=metrics.loss,
            used=used,
            duration=trio.current_time() - started,
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            finished_at=time.time(),
        )
        # Durable first: whoever sees the round finished (statistics, /status) may rely on
        # it surviving a SIGKILL.
        await self._checkpoint(number + 1, [*self._history, record])
        self._history.append(record)
        self._round = number + 1
        self._round_finished.set()
        self._round_finished = trio.Event()
        log.info(
            "[%s] round %d: accuracy %.3f loss %.3f, %d neighbour updates, %.2f s",
            short_id(self.peer_id),
            number,
            metrics.accuracy,
            metrics.loss,
            used,
            record.duration,
        )

    async def announce_state(
        self, number: int, state: Mapping[str, torch.Tensor], samples: int
    ) -> VerifiedHeader:
        """Encode, sign, serve and announce ``state`` as our update of round ``number``."""
        payload = await self._compute(encode_state, state)
        update = sign_update(
            self.identity,
            network_id=self.config.network_id,
            round=number,
            payload=payload,
            samples=samples,
            ts_ms=int(time.time() * 1000),
        )
        self._serve(update.header.digest, payload)
        self._announced.setdefault(number, []).append(update)
        for old in [r for r in self._announced if r < number - self.config.rounds.max_lag]:
            del self._announced[old]
        await self._publish(AnnouncementKind.UPDATE, update)
        return update

    async def reannounce(self, number: int) -> None:
        """Publish again what we announced for round ``number``."""
        for update in self._announced.get(number, ()):
            await self._publish(AnnouncementKind.UPDATE, update)

    def neighbour_states(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The freshest verified model held from each peer (what attacks may observe)."""
        return self._inbox.latest()

    async def _collect(self, number: int) -> None:
        """Wait for neighbours' updates until quorum or the round deadline, re-announcing."""
        settings = self.config.rounds
        deadline = trio.current_time() + settings.round_timeout
        next_announce = trio.current_time() + settings.reannounce_interval
        while not self._inbox.ready(self._expected(), number, settings.quorum):
            now = trio.current_time()
            if now >= deadline or self._catch_up_target() is not None:
                break
            if now >= next_announce:
                await self.behaviour.reannounce(self, number)
                next_announce = now + settings.reannounce_interval
            self._delivered = trio.Event()
            with trio.move_on_at(min(deadline, next_announce)):
                await self._delivered.wait()

    async def _aggregate(self, number: int, own: dict[str, torch.Tensor], samples: int) -> int:
        settings = self.config.rounds
        updates = self._inbox.take(number, max_lag=settings.max_lag, max_lead=settings.max_lead)
        # Peers below threshold still go through the rule, with weight 0: the trust it
        # reports keeps them out, or lets them earn their way back.
        updates = [u for u in updates if not self._book.banned(u.sender, round=number)]
        weights, self_weight = self._mixing(updates, samples)
        states = [u.state for u in updates]
        verdict = None
        if self._harm is not None:
            senders = [u.sender for u in updates]
            verdict = await self._compute(
                self._harm.judge, own, self._start, senders, states, weights, self_weight
            )
        result: Aggregate = await self._compute(
            aggregate,
            self.config.rule,
            own,
            states,
            weights,
            self_weight=self_weight,
            own_step=self._own_step,
            vetted=None if verdict is None else verdict.vetted,
            **dict(self.config.rule_params),
        )
        self.learner.set_state(result.state)
        trust = result.trust
        if verdict is not None:
            # Clipped but harmless to us is no evidence of malice (the neighbour across
            # a bridge between communities is both); the streak decides the mixing.
            trust = verdict.forgiven(trust, self.config.reputation.clip_tolerance)
        self._record_trust(number, updates, trust)
        delivered = {u.sender for u in updates}
        for peer in self._expected():
            if peer not in delivered:
                self._evidence(peer, Evidence.NO_SHOW, number, "no update this round")
        return len(updates)

    def _mixing(self, updates: Sequence[Received], samples: int) -> tuple[list[float], float]:
        """Weights of the neighbours and of the own model for the configured rule."""
        reputation = [self._book.weight(u.sender) for u in updates]
        if self.config.rule != "mean":
            return reputation, 1.0
        # FedAvg weighs by samples. Claims are capped at 4x our own so that a peer cannot
        # buy influence by lying about its data.
        cap = 4 * max(samples, 1)
        return [r * min(u.samples, cap) for r, u in zip(reputation, updates, strict=True)], float(
            max(samples, 1)
        )

    def _record_trust(
        self, number: int, updates: Sequence[Received], trust: Sequence[float]
    ) -> None:
        for update, value in zip(updates, trust, strict=True):
            evidence, amount = self.config.reputation.evidence_from_trust(value)
            if evidence is Evidence.ACCEPTED:
                self._accepted += 1
            reason = f"trust {value:.2f}" if value < 1 else "used in full"
            self._evidence(update.sender, evidence, number, reason, amount=amount)

    def _expected(self) -> list[str]:
        """Neighbours whose updates we wait for: connected and reputable."""
        return [p for p in self.transport.neighbours() if self._book.weight(p) > 0]

    # ------------------------------------------------------------------ catching up

    def _catch_up_target(self) -> tuple[int, list[str]] | None:
        """The round to jump to and the peers to start from, when we are far behind."""
        settings = self.config.rounds
        return catch_up_target(
            {peer: update.header.round for peer, update in self._freshest.items()},
            self._expected(),
            self._round,
            after=settings.catch_up_after,
            sources=settings.catch_up_sources,
        )

    async def _maybe_catch_up(self) -> None:
        """Jump to the network's round from a robust aggregate of neighbours' models."""
        found = self._catch_up_target()
        if found is None:
            return
        target, sources = found
        log.info("catching up from round %d to %d via %d peers", self._round, target, len(sources))
        self._round = target
        self._state = "catching-up"
        for peer in sources:
            self.fetcher.start(self._freshest[peer])
        with trio.move_on_after(self.config.rounds.round_timeout):
            while not self._inbox.ready(sources, target, 1.0):
                self._delivered = trio.Event()
                await self._delivered.wait()
        settings = self.config.rounds
        updates = self._inbox.take(target, max_lag=settings.max_lag, max_lead=settings.max_lead)
        if not updates:
            return
        # One source may be an attacker we have no evidence about yet: a mean of two
        # sources let one sign-flipper wreck five honest nodes of a 12-node testnet.
        prober = self.learner if isinstance(self.learner, Prober) else None
        start = await self._compute(
            starting_point,
            self.learner.get_state(),
            [u.state for u in updates],
            prober,
            self.config.harm_check,
        )
        if start is not None:
            self.learner.set_state(start)

    # ------------------------------------------------------------------ ingress

    def _validate(self, origin: str, data: bytes) -> ParsedAnnouncement | None:
        """Gossip validator: runs on every announcement before anyone sees it."""
        if origin == self.peer_id and self.behaviour.publishes_invalid:
            with contextlib.suppress(P2PFLError):
                return self._parser.parse(origin, data)
            return None  # an attacker's own forgery: let it out, peers must catch it
        return self._parser.parse(origin, data)

    async def _announcement_loop(self) -> None:
        async for announcement in self.transport.announcements():
            self._on_announcement(announcement)

    def _on_announcement(self, announcement: Announcement) -> None:
        parsed: ParsedAnnouncement | None = announcement.value
        if parsed is None:
            return
        header = parsed.update.header
        neighbours = self.transport.neighbours()
        if parsed.kind is AnnouncementKind.HOLDS and announcement.origin in neighbours:
            self.fetcher.remember_holder(header.digest, announcement.origin)
        # We aggregate neighbours only; what everyone else says is gossip's business (and
        # tracking every sender would let one attacker with many keys grow our memory).
        if header.sender == self.peer_id or header.sender not in neighbours:
            return
        observation = self._ledger.observe(header.sender, header.round, header.digest)
        admission = admit(
            observation,
            header.round,
            self._round,
            max_lag=self.config.rounds.max_lag,
            max_lead=self.config.rounds.max_lead,
        )
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
            self._evidence(header.sender, admission.evidence, self._round, admission.reason)
        if admission.decision is Decision.REJECT:
            self._inbox.forget(header.sender)
            return
        if self._book.banned(header.sender, round=self._round):
            return
        freshest = self._freshest.get(header.sender)
        if freshest is None or header.round > freshest.header.round:
            self._freshest[header.sender] = parsed.update
        author = self._inbox.first_author(header.digest, header.sender)
        if author != header.sender:
            self._evidence(
                header.sender,
                Evidence.DUPLICATE_OF_OTHER,
                self._round,
                f"re-announced {short_id(author)}'s model as its own",
            )
            return
        if admission.decision is Decision.FETCH:
            self.fetcher.start(parsed.update)

    def _on_delivered(self, digest: bytes, payload: bytes) -> None:
        self._serve(digest, payload)  # verified: neighbours may pull it from us too
        self._delivered.set()

    # ------------------------------------------------------------------ helpers

    def _report(self, peer: str, evidence: Evidence, reason: str) -> None:
        """Record evidence found outside the round loop (ingress, fetches) in the current round."""
        self._evidence(peer, evidence, self._round, reason)

    def _evidence(
        self, peer: str, evidence: Evidence, number: int, reason: str, *, amount: float = 1.0
    ) -> None:
        if evidence not in (Evidence.ACCEPTED, Evidence.CLIPPED):
            self._rejected[evidence.value] += 1
            log.info("peer %s: %s (%s)", short_id(peer), evidence.value, reason)
        self._book.record(peer, evidence, round=number, amount=amount, reason=reason)

    def _enforce_bans(self, number: int) -> None:
        for peer in self._book.peers():
            if self._book.banned(peer, round=number):
                self._inbox.forget(peer)
                if peer in self.transport.neighbours():
                    log.warning("banning peer %s", short_id(peer))
                    self.transport.ban(peer, seconds=self.config.ban_seconds)

    def _serve(self, digest: bytes, payload: bytes) -> None:
        """Serve a verified payload; keep the last few rounds' worth."""
        self.transport.serve(digest, payload)
        self._served.append(digest)
        keep = 4 * (len(self.transport.neighbours()) + 1)
        while len(self._served) > keep:
            self.transport.unserve(self._served.pop(0))

    async def _publish(self, kind: AnnouncementKind, update: VerifiedHeader) -> None:
        try:
            await self.transport.publish(encode_announcement(kind, update))
        except NetworkError as exc:  # lossy by nature; the next re-announce may pass
            log.warning("announcement not published: %s", exc)

    async def _compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._offload:
            return fn(*args, **kwargs)
        return await trio.to_thread.run_sync(
            lambda: fn(*args, **kwargs), limiter=self._compute_limiter
        )

    # ------------------------------------------------------------------ persistence

    def _restore(self) -> None:
        if self.config.data_dir is None:
            return
        checkpoint = load_checkpoint(self.config.data_dir, limits=self.config.limits)
        if checkpoint is None:
            return
        self.learner.restore_checkpoint_state(checkpoint.learner_state)
        self._book = ReputationBook.from_record(dict(checkpoint.reputation), self.config.reputation)
        self._round = checkpoint.round
        self._history = list(checkpoint.history)
        if self._history:
            self._metrics = (self._history[-1].accuracy, self._history[-1].loss)
        log.info("resumed from checkpoint at round %d", self._round)

    async def _checkpoint(self, next_round: int, history: Sequence[RoundRecord]) -> None:
        if self.config.data_dir is None:
            return
        checkpoint = Checkpoint(
            round=next_round,
            learner_state=self.learner.checkpoint_state(),
            reputation=self._book.to_record(),
            peers=self.transport.neighbours(),
            history=tuple(history),
        )
        await self._compute(save_checkpoint, self.config.data_dir, checkpoint)

    # ------------------------------------------------------------------ reporting

    def statistics(self) -> NodeStatistics:
        """A frozen snapshot of this node."""
        neighbours = self._transport.neighbours() if self._transport is not None else ()
        traffic = self._transport.stats() if self._transport is not None else None
        return NodeStatistics(
            peer_id=self.peer_id,
            network_id=self.config.network_id,
            state=self._state,
            round=self._round,
            rounds_target=self._rounds_target,
            accuracy=self._metrics[0] if self._metrics else None,
            loss=self._metrics[1] if self._metrics else None,
            neighbours=tuple(neighbours),
            bytes_in=traffic.bytes_in if traffic else 0,
            bytes_out=traffic.bytes_out if traffic else 0,
            accepted=self._accepted,
            rejected=dict(self._rejected),
            reputation=reputation_rows(self._book, self._round),
            history=tuple(self._history),
            byzantine=self.behaviour.name,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
