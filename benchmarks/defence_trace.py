"""Trace the defence pair by pair: what each honest node's harm check and rule said of
each neighbour, every round, in simulator runs.

usage: python benchmarks/defence_trace.py SETTING SEEDS ATTACK[:k=v,...] [harm.X=.. rep.X=..]
SETTING as in defence_sweep.py (reg, er, exp32, dumbbell). One JSON line per (seed,
observer, neighbour, round) goes to $TRACE_OUT (default runs/defence_trace.jsonl): the
mixing weight, the rule's trust, the trust recorded as evidence, the harm check's flags
(passed, vetted, failed, harmless, typical; pulled: over the joint check's bar), the excess over our own loss and over the
typical neighbour's mix, the tolerance, the neighbour's distance in own steps, and its
span ratio (p2pfl/node/span.py; None where the node abstained). Then
prints, per attack and kind of neighbour (honest or attacker), rounds 3 on: the share of
checks failed and typical, and percentiles of the failures' excess over our own loss (in
tolerances) and of the rule's trust.
"""
import ast
import json
import os
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defence_settings import setting

import p2pfl.node.harm as harm
import p2pfl.node.mixer as mixer
import p2pfl.node.span as span
from p2pfl.core.crypto import short_id
from p2pfl.core.reputation import ReputationConfig
from p2pfl.node.config import HarmCheck
from p2pfl.sim import runner

torch.set_num_threads(1)
FLAGS = ("passed", "vetted", "failed", "harmless", "typical", "pulled")


def overrides(args: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    rep: dict[str, Any] = {}
    check: dict[str, Any] = {}
    for kv in args:
        key, value = kv.split("=", 1)
        group, name = key.split(".", 1)
        {"rep": rep, "harm": check}[group][name] = ast.literal_eval(value)
    return rep, check


class Tap:
    """Wraps the harm check, the probe, the rule and the mixer to record each judgement."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.now: dict[str, Any] = {}
        judge, probe, aggregate, mix = harm.HarmGate.judge, harm.probe, mixer.aggregate, mixer.Mixer.mix
        span_judge = span.SpanGate.judge
        tap = self

        def span_judge_(gate: Any, *args: Any, **kwargs: Any) -> Any:
            tap.now["span"] = verdict = span_judge(gate, *args, **kwargs)
            return verdict

        def judge_(gate: Any, *args: Any, **kwargs: Any) -> Any:
            tap.now["verdict"] = verdict = judge(gate, *args, **kwargs)
            return verdict

        def probe_(prober: Any, check: Any, own: Any, neighbours: Any, shares: Any, *, start: Any = None) -> Any:
            tap.now["excess"] = excess = probe(prober, check, own, neighbours, shares, start=start)
            step = None if start is None else harm.distance(start, own)
            tap.now["steps"] = [harm.distance(own, n) / step if step else None for n in neighbours]
            return excess

        def aggregate_(*args: Any, **kwargs: Any) -> Any:
            tap.now["trust"] = (result := aggregate(*args, **kwargs)).trust
            return result

        async def mix_(self_: Any, number: int, own: Any, start: Any, updates: Any, samples: int) -> Any:
            tap.now = {}
            weights, _ = self_.weights(updates, samples)
            recorded: list[float] = []
            record = self_._standing.record_trust
            self_._standing.record_trust = lambda peer, value, n: (recorded.append(value), record(peer, value, n))
            try:
                out = await mix(self_, number, own, start, updates, samples)
            finally:
                self_._standing.record_trust = record
            for k, update in enumerate(updates):
                excess = (tap.now.get("excess") or [None] * len(updates))[k]
                verdict = tap.now.get("verdict")
                spanned = tap.now.get("span")
                tap.rows.append({
                    "mixer": self_._owner, "sender": str(update.sender), "round": number, "w": weights[k],
                    "rule_trust": tap.now["trust"][k], "final": recorded[k],
                    "over_own": None if excess is None else excess.over_own,
                    "over_typical": None if excess is None else excess.over_typical,
                    "tolerance": None if excess is None else excess.tolerance,
                    "steps": (tap.now.get("steps") or [None] * len(updates))[k],
                    "span_ratio": None if spanned is None else spanned.ratio[k],
                    **({} if verdict is None else {f: bool(getattr(verdict, f)[k]) for f in FLAGS}),
                })
            return out

        harm.HarmGate.judge, harm.probe, mixer.aggregate, mixer.Mixer.mix = judge_, probe_, aggregate_, mix_
        span.SpanGate.judge = span_judge_


def pct(values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return "-"
    return " / ".join(f"{values[min(len(values) - 1, int(p * len(values)))]:.3f}" for p in (0.1, 0.5, 0.9))


def main() -> None:
    name, seeds, attack = sys.argv[1:4]
    rep, check = overrides(sys.argv[4:])
    scenario = setting(name)
    kind, _, params = attack.partition(":")
    attack_params = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in filter(None, params.split(",")))}
    if kind == "none":
        scenario = replace(scenario, byzantine=0)
    scenario = replace(scenario, attack=kind, attack_params=attack_params,
                       reputation=ReputationConfig(**rep), harm_check=HarmCheck(**check))
    tap = Tap()
    out = Path(os.environ.get("TRACE_OUT", "runs/defence_trace.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[bool, dict[str, list[float]]] = {False: defaultdict(list), True: defaultdict(list)}
    pairs: dict[bool, dict[tuple[int, int, int], list[float]]] = {False: defaultdict(list), True: defaultdict(list)}
    for seed in (int(s) for s in seeds.split(",")):
        tap.rows.clear()
        result = runner.run_scenario(scenario, seed)
        index = {str(runner.identity_for(seed, i).peer_id): i for i in range(scenario.nodes)}
        # The mixer names its node by short id (not by whom it heard: two nodes that heard
        # the same few senders, e.g. when their other neighbours forge, were merged).
        observer = {short_id(str(runner.identity_for(seed, i).peer_id)): i for i in range(scenario.nodes)}
        bad = set(result.byzantine)
        with out.open("a") as f:
            for row in tap.rows:
                mixer_id = row.pop("mixer")
                row = {**row, "observer": observer[mixer_id], "sender": index[row["sender"]]}
                row.update(setting=name, attack=attack, seed=seed, attacker=row["sender"] in bad)
                f.write(json.dumps(row) + "\n")
                if row["observer"] in bad or row["round"] < 3:
                    continue
                into = summary[row["attacker"]]
                into["rule_trust"].append(row["rule_trust"])
                if row["span_ratio"] is not None and row["round"] >= 5:
                    pairs[row["attacker"]][(seed, row["observer"], row["sender"])].append(row["span_ratio"])
                if row["over_own"] is not None:
                    into["judged"].append(1.0)
                    into["failed"].append(float(row["failed"]))
                    into["typical"].append(float(row["typical"]))
                    if row["failed"]:
                        into["excess"].append(row["over_own"] / row["tolerance"])
    for attacker, s in summary.items():
        if s["judged"]:
            n = len(s["judged"])
            print(f"{attack} {'attackers' if attacker else 'honest'}: failed {sum(s['failed']) / n:.2f}, "
                  f"typical {sum(s['typical']) / n:.2f}, excess of failures in tolerances {pct(s['excess'])}, "
                  f"rule trust {pct(s['rule_trust'])} (10th / 50th / 90th percentile)")
    for attacker, by_pair in pairs.items():
        means = [sum(v) / len(v) for v in by_pair.values()]
        if means:
            print(f"{attack} {'attackers' if attacker else 'honest'}: span ratio per pair, rounds 5 on, "
                  f"{pct(means)} (10th / 50th / 90th percentile), {min(means):.1f}-{max(means):.1f}")


if __name__ == "__main__":
    main()
