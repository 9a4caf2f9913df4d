"""The node: trains locally, gossips signed updates, robustly mixes its neighbours' models.

A round at node *i* (no global barrier)::

    train (worker thread) -> encode, sign, serve, announce (re-announce until closed)
      -> pull neighbours' updates of this round until quorum or deadline
      -> aggregate centred on the own model, weights = mixing x reputation
      -> reputation evidence -> evaluate -> checkpoint

Everything runs in the nursery the node owns (``async with Node(...)``); every network
wait has a deadline; a misbehaving peer never raises through the node: its input
becomes reputation evidence and is dropped. The node keeps the round loop and hands the
rest to its parts:

- :mod:`~p2pfl.node.ingress`: announcements verified and admitted, payloads fetched into
  the inbox (also the read-only view behaviours craft from);
- :mod:`~p2pfl.node.outbox`: transforms -> encode -> sign -> serve -> publish, re-announce;
- :mod:`~p2pfl.node.mixer`: harm check, mixing weights, the aggregation rule, trust ->
  evidence;
- :mod:`~p2pfl.node.standing`: the reputation book every part records evidence in;
- the behaviour (:mod:`~p2pfl.node.behaviour`): what we announce, through the outbox.

The decisions (admission, quorum, catching up) are pure functions in
:mod:`p2pfl.core.rounds`.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType

import torch
import trio

from p2pfl.config import NetConfig
from p2pfl.core.crypto import Identity, short_id
from p2pfl.core.reputation import Evidence
from p2pfl.core.state import template_of
from p2pfl.learners.base import Learner, State
from p2pfl.learners.privacy import privacy_spent
from p2pfl.net.transport import Transport
from p2pfl.node.behaviour import Behaviour
from p2pfl.node.checkpoint import resume, save_checkpoint, snapshot
from p2pfl.node.config import NodeConfig
from p2pfl.node.encoding import make_encoder
from p2pfl.node.ingress import Ingress
from p2pfl.node.mixer import Mixer
from p2pfl.node.outbox import Outbox, Transform
from p2pfl.node.standing import Standing
from p2pfl.node.stats import NodeStatistics, RoundRecord, reputation_rows
from p2pfl.node.transport import TransportFactory, libp2p_transport
from p2pfl.node.waiting import observe, wait_for_neighbours
from p2pfl.node.worker import Worker

log = logging.getLogger(__name__)


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
        transforms: Sequence[Transform] = (),
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
            transforms: Outbound transforms applied, in order, to every update before
                it is encoded and signed (see :mod:`p2pfl.node.outbox`).
        """
        self.config = config
        self.learner = learner
        self.identity = identity = identity or Identity.generate()
        self.peer_id = identity.peer_id
        self._open_transport = transport or libp2p_transport(
            identity, net or NetConfig(), network_id=config.network_id, limits=config.limits
        )
        self._encoder = make_encoder(net or NetConfig())
        # Pulled payloads are served to others only where pullers take pieces from holders:
        # a network opts in to that on every node ([net] fetch_sources).
        self._holds = (net or NetConfig()).fetch_sources > 1
        self._worker = Worker(offload=offload)
        self._compute = self._worker.run
        self.behaviour = behaviour or Behaviour()
        self._transforms = tuple(transforms)
        self._standing = Standing(config.reputation)
        self._round = 0
        self._rounds_target: int | None = None
        self._state = "starting"
        self._history: list[RoundRecord] = []
        self._metrics: tuple[float, float] | None = None
        self._privacy = privacy_spent(self.learner)  # as of the last finished round; None: not private
        self._round_finished = trio.Event()
        self._silent: set[str] = set()  # neighbours that published nothing in a whole round
        self._transport: Transport | None = None
        self._outbox: Outbox | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._start: State = {}  # our model before this round's local training
        self._mixer = Mixer(config, learner, self._standing, self._compute, short_id(self.peer_id))
        self._ingress = Ingress(
            peer_id=self.peer_id,
            config=config,
            publishes_invalid=self.behaviour.publishes_invalid,
            current_round=lambda: self._round,
            banned=lambda peer: self._standing.banned(peer, round=self._round),
            # Evidence found outside the round loop (ingress, fetches) counts in the current round.
            report=lambda peer, evidence, reason: self._standing.record(peer, evidence, self._round, reason),
            compute=self._compute,
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Node:
        self._restore()
        self._privacy = privacy_spent(self.learner)  # a restored account keeps what it spent
        # Shapes and dtypes peers' models must have; read once, never mid-training.
        template = template_of(self.learner.get_state())
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            transport = await stack.enter_async_context(self._open_transport(self._ingress.validate))
            self._nursery = await stack.enter_async_context(trio.open_nursery())
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack, self._transport = stack, transport
        self._outbox = Outbox(
            transport=transport, identity=self.identity, network_id=self.config.network_id,
            max_lag=self.config.rounds.max_lag, compute=self._compute, transforms=self._transforms,
            encoder=self._encoder, holds=self._holds,
        )
        await self._nursery.start(
            self._ingress.run, transport, template, self._outbox.hold, self._outbox.pulling)
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
    def outbox(self) -> Outbox:
        """What sends our updates (inside ``async with`` only)."""
        if self._outbox is None:
            raise RuntimeError("the node is not open: use `async with Node(...)`")
        return self._outbox

    @property
    def round(self) -> int:
        """The round in progress, or the next one."""
        return self._round

    async def wait_for_round(self, number: int) -> None:
        """Return once round ``number`` has finished here (or a later one has)."""
        while self._round <= number:
            await self._round_finished.wait()

    def neighbour_states(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The freshest verified model held from each peer (what attacks may observe)."""
        return self._ingress.neighbour_states()

    # ------------------------------------------------------------------ rounds

    async def run(self, rounds: int | None = None) -> NodeStatistics:
        """Run rounds until ``rounds`` have finished in total (None: until cancelled)."""
        self._rounds_target = rounds
        settings = self.config.rounds
        await self._wait_for_neighbours(settings.min_neighbours, settings.start_timeout)
        if self.config.role == "observer":
            await self._observe(rounds)
        while rounds is None or self._round < rounds:
            # Never a round alone unless the config allows it: a lone round looks like success.
            await self._wait_for_neighbours(min(1, settings.min_neighbours), None)
            if not await self._maybe_catch_up():
                await self._run_round(self._round)
        self._state = "done"
        return self.statistics()

    async def _wait_for_neighbours(self, need: int, timeout: float | None) -> None:
        """Wait until ``need`` neighbours are connected (see :func:`wait_for_neighbours`)."""
        if len(self.transport.neighbours()) >= need:
            return
        state, self._state = self._state, "waiting"
        await wait_for_neighbours(self.transport, self.peer_id, need, timeout)
        self._state = state

    async def _observe(self, rounds: int | None) -> None:
        """Receive and verify neighbours' updates, never train or publish, until ``rounds``."""
        self._state = "observing"
        async for finished in observe(self._ingress, self._round, rounds):
            self._advance(finished)  # the rounds the network has finished

    def _advance(self, next_round: int) -> None:
        """Move on to ``next_round`` and wake whoever waits for a round to finish."""
        self._round = next_round
        self._round_finished.set()
        self._round_finished = trio.Event()

    async def _run_round(self, number: int) -> None:
        started = trio.current_time()
        self._state = "training"
        self._start = self.learner.get_state()
        samples = await self._compute(self._worker.timed, self.learner.fit, self.config.rounds.local_epochs)
        own = self.learner.get_state()
        shared = self.behaviour.craft(self._ingress, number, own)
        await self.behaviour.announce(self.outbox, number, shared, samples)
        self._state = "collecting"
        await self._collect(number)
        if self._catch_up_target() is not None:
            return  # the network is far ahead: abandon this round and catch up
        self._state = "aggregating"
        used = await self._aggregate(number, own, samples)
        await self._finish_round(number, used, started)

    async def _finish_round(self, number: int, used: int, started: float) -> None:
        """Evaluate, settle reputation, checkpoint, and move on to round ``number + 1``."""
        metrics = await self._compute(self._worker.timed, self.learner.evaluate)
        self._metrics = (metrics.accuracy, metrics.loss)
        self._privacy = await self._compute(privacy_spent, self.learner)
        self._standing.end_round(number)
        self._enforce_bans(number)
        traffic = self.transport.stats()
        learning_cpu, compute_cpu = self._worker.take_cpu()
        record = RoundRecord(
            round=number, accuracy=metrics.accuracy, loss=metrics.loss, used=used,
            duration=trio.current_time() - started, bytes_in=traffic.bytes_in,
            bytes_out=traffic.bytes_out, finished_at=time.time(), payload_in=traffic.payload_in,
            payload_out=traffic.payload_out, cpu_seconds=time.process_time(),
            learning_cpu_seconds=learning_cpu, compute_cpu_seconds=compute_cpu,
            epsilon_spent=self._privacy.epsilon if self._privacy else None,
        )
        # Durable first: whoever sees the round finished (statistics, /status) may rely on
        # it surviving a SIGKILL.
        await self._checkpoint(number + 1, [*self._history, record])
        self._history.append(record)
        self._advance(number + 1)
        log.info("[%s] round %d: accuracy %.3f loss %.3f, %d neighbour updates, %.2f s",
                 short_id(self.peer_id), number, metrics.accuracy, metrics.loss, used, record.duration)

    async def _collect(self, number: int) -> None:
        """Wait for neighbours' updates until quorum or the round deadline, re-announcing."""
        settings = self.config.rounds
        deadline = trio.current_time() + settings.round_timeout
        next_announce = trio.current_time() + settings.reannounce_interval
        while not self._ingress.inbox.ready(self._expected(), number, settings.quorum):
            now = trio.current_time()
            if now >= deadline or self._catch_up_target() is not None:
                break
            if now >= next_announce:
                await self.behaviour.reannounce(self.outbox, number)
                next_announce = now + settings.reannounce_interval
                continue  # a payload may have arrived meanwhile: check the quorum again
            with trio.move_on_at(min(deadline, next_announce)):
                await self._ingress.next_delivery()

    async def _aggregate(self, number: int, own: dict[str, torch.Tensor], samples: int) -> int:
        updates = self._ingress.take(number)
        # Peers below threshold still go through the rule, with weight 0: the trust it
        # reports keeps them out, or lets them earn their way back.
        updates = [u for u in updates if not self._standing.banned(u.sender, round=number)]
        self.learner.set_state(await self._mixer.mix(number, own, self._start, updates, samples))
        delivered = {u.sender for u in updates}
        inbox = self._ingress.inbox
        for peer in self._expected():  # a peer whose update waits for our next round is not absent
            if peer not in delivered and not inbox.delivered(peer, number):
                self._standing.record(peer, Evidence.NO_SHOW, number, "no update this round")
        # A neighbour that has published nothing through a whole round (a monitor, an
        # observer) stops counting toward the quorum until it publishes.
        self._silent = {p for p in self.transport.neighbours() if p not in self._ingress.freshest}
        return len(updates)

    def _expected(self) -> list[str]:
        """Neighbours whose updates we wait for: connected, reputable, not known silent."""
        published = self._ingress.freshest
        return [p for p in self.transport.neighbours()
                if self._standing.weight(p) > 0 and (p in published or p not in self._silent)]

    # ------------------------------------------------------------------ catching up

    def _catch_up_target(self) -> tuple[int, list[str]] | None:
        """The round to jump to and the peers to start from, when we are far behind."""
        return self._ingress.behind(self._expected(), self._round)

    async def _maybe_catch_up(self) -> bool:
        """Jump to the network's round from a robust aggregate of neighbours' models.

        Return whether a round was completed that way. The sources' round-``target``
        models, robustly combined, are what aggregating round ``target`` gives: that round
        is done here too. Training it again (the network may have finished it already, so
        alone) used to undo the adopted model: 0.92 adopted, 0.45 after the lone round.
        """
        found = self._catch_up_target()
        if found is None:
            return False
        target, sources = found
        started = trio.current_time()
        log.info("catching up from round %d to %d via %d peers", self._round, target, len(sources))
        self._round = target
        self._state = "catching-up"
        with trio.move_on_after(self.config.rounds.round_timeout):
            await self._ingress.fetch_freshest(sources, target)
        updates = self._ingress.take(target)
        start = await self._mixer.restart(updates)
        if start is None:
            return False  # nothing usable: train round `target` from our own model
        self.learner.set_state(start)
        await self._finish_round(target, len(updates), started)
        return True

    # ------------------------------------------------------------------ helpers

    def _enforce_bans(self, number: int) -> None:
        for peer in self._standing.banned_peers(number):
            self._ingress.inbox.forget(peer)
            if peer in self.transport.neighbours():
                log.warning("banning peer %s", short_id(peer))
                self.transport.ban(peer, seconds=self.config.ban_seconds)

    # ------------------------------------------------------------------ persistence

    def _restore(self) -> None:
        if self.config.data_dir is None:
            return
        resumed = resume(self.config.data_dir, self.config.limits, self.learner, self._standing)
        if resumed is not None:
            self._round, self._history = resumed
            if self._history:
                self._metrics = (self._history[-1].accuracy, self._history[-1].loss)
            log.info("resumed from checkpoint at round %d", self._round)

    async def _checkpoint(self, next_round: int, history: Sequence[RoundRecord]) -> None:
        if self.config.data_dir is not None:
            checkpoint = snapshot(next_round, self.learner, self._standing,
                                  self.transport.neighbours(), history)
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
            accepted=self._standing.accepted,
            rejected=dict(Counter(self._standing.rejected) + Counter(self._ingress.mismatches)),
            reputation=reputation_rows(self._standing.book, self._round),
            history=tuple(self._history),
            byzantine=self.behaviour.name,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            epsilon_spent=self._privacy.epsilon if self._privacy else None,
            epsilon_target=self._privacy.target if self._privacy else None,
            payload_in=traffic.payload_in if traffic else 0,
            payload_out=traffic.payload_out if traffic else 0,
            addrs=tuple(self._transport.listen_addrs) if self._transport is not None else (),
            reachability=traffic.reachability if traffic else "unknown",
            relays=traffic.relays if traffic else (),
            relayed_peers=traffic.relayed_peers if traffic else (),
            payload_relayed=traffic.payload_relayed if traffic else 0,
            relay_forwarded=traffic.relay_forwarded if traffic else 0,
            relay_scores=traffic.relay_scores if traffic else (),
            gossip_reconnects=traffic.gossip_reconnects if traffic else 0,
            peer_paths=traffic.peer_paths if traffic else (),
        )
