"""Mixing the neighbours' updates into the own model: harm check, weights, rule, evidence.

One call per round, :meth:`Mixer.mix`: weigh each update by the sender's reputation (and,
for ``mean``, by its capped sample count), let the harm gate vet them (clipping rules
only), run the configured aggregation rule centred on the own model, and turn the trust
the rule reports into reputation evidence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from p2pfl.core.aggregation import RULES, Aggregate, aggregate
from p2pfl.core.crypto import short_id
from p2pfl.core.rounds import Received
from p2pfl.errors import ConfigError
from p2pfl.learners.base import Learner, State
from p2pfl.node.config import NodeConfig
from p2pfl.node.harm import HarmGate, Prober, distance, starting_point
from p2pfl.node.inbound import Compute
from p2pfl.node.reference import ClassScorer, ReferenceGate
from p2pfl.node.span import GradientProber, SpanGate
from p2pfl.node.standing import Standing

log = logging.getLogger(__name__)


def own_weight(weights: Sequence[float]) -> float:
    """The own model's weight beside neighbours at ``weights``: the share of them trusted.

    A neighbour at weight 0 hands its share to the trusted neighbours, not to the own
    model: a node that flagged three attacking neighbours of four mixes its last honest
    one at 4/5, as it would have mixed all four, instead of 1/2, where its own non-IID
    training held it apart from the network (issue 17; docs/DEFENCE.md section 2).
    With every neighbour trusted (or none) the own model weighs 1, as a neighbour does.
    """
    trusted = sum(1 for w in weights if w > 0)
    return trusted / len(weights) if trusted else 1.0


def distances(own: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """Each state's distance from ``own``."""
    return [distance(own, state) for state in states]


def mix_line(number: int, self_weight: float, radius: float | None,
             neighbours: Mapping[str, Sequence[tuple[str, object]]]) -> str:
    """One round's mixing as one line: our weight, the rule's radius, then per neighbour
    (short id) its ``(name, value)`` fields; a float prints with 3 digits, True as the
    name alone, False and None not at all."""
    def field(name: str, value: object) -> str:
        if value is None or isinstance(value, bool):
            return name if value else ""
        return f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"

    rows = [" ".join(filter(None, [short_id(peer), *(field(n, v) for n, v in fields)]))
            for peer, fields in neighbours.items()]
    shown = "-" if radius is None else f"{radius:.3g}"
    return f"round {number} mix: own w {self_weight:.2f} radius {shown}; " + "; ".join(rows)


class Mixer:
    """Aggregate a round's updates with the configured rule; record what it says of peers."""

    def __init__(self, config: NodeConfig, learner: Learner, standing: Standing, compute: Compute,
                 owner: str = "") -> None:
        """Mix for ``config.rule``; probe harm with ``learner`` when it can and the rule clips.
        ``owner`` names the node in the debug lines."""
        self._config, self._learner, self._standing, self._compute = config, learner, standing, compute
        self._owner = owner
        self._harm: HarmGate | None = None
        self._span: SpanGate | None = None
        check = config.harm_check
        if check.enabled and RULES[config.rule].clipping:
            if isinstance(learner, Prober):
                self._harm = HarmGate(check, learner)
            else:
                log.info("harm check off: %s has no probe_losses", type(learner).__name__)
            if check.span_low > 0 and isinstance(learner, GradientProber):
                self._span = SpanGate(check, learner)
        self._reference: ReferenceGate | None = None
        if config.reference.path is not None:
            if not isinstance(learner, ClassScorer):
                raise ConfigError(f"[reference] path: {type(learner).__name__} has no score_classes")
            self._reference = ReferenceGate(config.reference, learner, learner.get_state())

    async def mix(
        self,
        number: int,
        own: State,
        start: Mapping[str, torch.Tensor],
        updates: Sequence[Received],
        samples: int,
    ) -> State:
        """Return round ``number``'s aggregate of ``own`` and ``updates``; record the trust.

        Args:
            number: The round.
            own: Our model after local training.
            start: Our model before local training (the harm check's reference; rules
                may scale by the length of our step from it).
            updates: Neighbours' updates (banned peers already out).
            samples: Our own training samples this round.
        """
        weights, self_weight = self.weights(updates, samples)
        states = [u.state for u in updates]
        senders = [u.sender for u in updates]
        caps = [1.0] * len(updates)
        span = None
        if self._span is not None:
            # A deviation that training on data would not produce (a made-up drift inside
            # the honest spread) loses its weight this round and, if it persists, its trust.
            span = await self._compute(self._span.judge, number, own, senders, states)
            if span is not None:
                weights = [w * f for w, f in zip(weights, span.weight, strict=True)]
                caps = span.trust
        verdict = None
        counting = number >= self._config.harm_check.grace  # a failed check is evidence from here on
        if self._harm is not None:
            verdict = await self._compute(
                self._harm.judge, own, start, senders, states, weights, self_weight, counting
            )
        if self._reference is not None:
            refusal = await self._compute(self._reference.judge, own, states, weights, self_weight,
                                          self._config.reputation.clip_tolerance)
            caps = [min(a, b) for a, b in zip(caps, refusal.caps, strict=True)]
            weights = [0.0 if no else w for w, no in zip(weights, refusal.refused, strict=True)]
        result: Aggregate = await self._compute(
            aggregate,
            self._config.rule,
            own,
            states,
            weights,
            self_weight=self_weight,
            own_step=distance(start, own),
            vetted=None if verdict is None else verdict.vetted,
            **dict(self._config.rule_params),
        )
        trust = result.trust
        if verdict is not None:
            # Clipped but harmless to us is no evidence of malice (the neighbour across
            # a bridge between communities is both); the streak decides the mixing.
            trust = verdict.forgiven(trust, self._config.reputation.clip_tolerance,
                                     failures=counting,
                                     settled=number >= self._config.harm_check.settle)
        evidence = [min(value, cap) for value, cap in zip(trust, caps, strict=True)]
        for update, value in zip(updates, evidence, strict=True):
            self._standing.record_trust(update.sender, value, number)
        if log.isEnabledFor(logging.DEBUG):
            far = await self._compute(distances, own, states)  # model-sized work: off the event loop
            fields = {sender: [
                ("d", far[i]), ("w", weights[i]), ("used", result.trust[i]),
                ("vetted", verdict is not None and verdict.vetted[i]),
                ("pulled", verdict is not None and verdict.pulled[i]),
                ("span", None if span is None else span.ratio[i]), ("evidence", evidence[i]),
            ] for i, sender in enumerate(senders)}
            log.debug("[%s] %s", self._owner, mix_line(number, self_weight, result.radius, fields))
        return result.state

    async def restart(self, updates: Sequence[Received]) -> State | None:
        """The model to restart from when far behind, from ``updates``; None: keep ours."""
        if not updates:
            return None
        # One source may be an attacker we have no evidence about yet: a mean of two
        # sources let one sign-flipper wreck five honest nodes of a 12-node testnet.
        prober = self._learner if isinstance(self._learner, Prober) else None
        start: State | None = await self._compute(
            starting_point,
            self._learner.get_state(),
            [u.state for u in updates],
            prober,
            self._config.harm_check,
        )
        return start

    def weights(self, updates: Sequence[Received], samples: int) -> tuple[list[float], float]:
        """Weights of the neighbours and of the own model for the configured rule."""
        reputation = [self._standing.weight(u.sender) for u in updates]
        if not RULES[self._config.rule].uses_samples:
            return reputation, own_weight(reputation)
        # FedAvg weighs by samples. Claims are capped at 4x our own so that a peer cannot
        # buy influence by lying about its data.
        cap = 4 * max(samples, 1)
        return [r * min(u.samples, cap) for r, u in zip(reputation, updates, strict=True)], float(
            max(samples, 1)
        )
