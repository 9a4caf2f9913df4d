"""How far does mixing a neighbour in move the worst class of the reference set?

Usage: python benchmarks/reference_signals.py --attack label_flip [--seed 0] [--rounds 30]
       [--topology regular] [--byzantine 4] [--params '{"source": 3, "target": 8}']

Runs the attack grid's setting (16 nodes, random 4-regular, Dirichlet(0.5), clipped_gossip)
with a digits reference set of 20 per class (held out of every split) and a tolerance
of 1 (nothing refused), and records at every node, every round, every neighbour's
worst-class accuracy drop when mixed in (``ReferenceGate.judge``). Prints percentiles of
honest observers' drops for honest and Byzantine neighbours, by round range.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.learners.datasets import digits_reference
from p2pfl.learners.reference import ReferenceSet, sha256_of
from p2pfl.node.config import ReferenceConfig
from p2pfl.node.harm import mixed
from p2pfl.node.reference import ReferenceGate
from p2pfl.sim import runner
from p2pfl.sim.scenario import NO_ATTACK, Scenario

PER_CLASS = 20
DUMP: list[Any] = []  # --dump PREFIX: PREFIX.jsonl (who, round, shares) + PREFIX.f32 (own, neighbours' states)
RAW: list[tuple[Any, ...]] = []  # per judged pair: round, observer honest, neighbour honest,
# observer, own acc/loss per class, mix acc/loss, alone acc/loss, share (--raw FILE saves it)


def reference_config(directory: Path, tolerance: float) -> ReferenceConfig:
    """Write the digits reference set under ``directory``; return its config."""
    held = digits_reference(PER_CLASS)
    data = ReferenceSet(held.features.contiguous(), held.labels.contiguous()).encode()
    path = directory / "ref.cbor"
    path.write_bytes(data)
    return ReferenceConfig(path=path, sha256=sha256_of(data), tolerance=tolerance)


SIGNALS = ("mix_acc_drop", "mix_loss_rise", "alone_loss_worst", "alone_loss_vs_peers",
           "alone_acc_mean", "mix_drop_vs_peers")


def signals(scores_own: Any, alone: list[Any], drops: list[float]) -> list[dict[str, float]]:
    """Per neighbour: every candidate signal (see SIGNALS)."""
    loss = np.array([s.loss for s in alone])  # (neighbours, classes)
    median = np.median(loss, axis=0)
    drop_median = float(np.median(drops)) if drops else 0.0
    out = []
    for j, s in enumerate(alone):
        out.append({
            "mix_acc_drop": drops[j],
            "alone_loss_worst": float(np.nanmax(loss[j])),
            "alone_loss_vs_peers": float(np.nanmax(loss[j] - median)),
            "alone_acc_mean": float(np.nanmean(s.accuracy)),
            "mix_drop_vs_peers": drops[j] - drop_median,
        })
    return out


def measure(scenario: Scenario, seed: int) -> list[tuple[int, bool, bool, dict[str, float]]]:
    """Return (round, observer honest, neighbour honest, signals) for every judged pair."""
    owners: dict[int, tuple[int, bool]] = {}
    rows: list[tuple[int, bool, bool, dict[str, float]]] = []
    calls: dict[int, int] = defaultdict(int)
    raw = RAW
    byzantine_ids: set[int] = set()
    make_node, judge = runner._make_node, ReferenceGate.judge

    def making(scenario: Scenario, seed: int, index: int, byzantine: bool, *args: Any) -> Any:
        node = make_node(scenario, seed, index, byzantine, *args)
        owners[id(node._mixer._reference)] = (index, byzantine)
        if byzantine:
            byzantine_ids.add(hash(node.peer_id))
        return node

    def judging(self: ReferenceGate, own: Any, states: Any, weights: Any, self_weight: Any, floor: Any) -> Any:
        verdict = judge(self, own, states, weights, self_weight, floor)
        senders = judging.senders  # type: ignore[attr-defined]
        _, observer_byz = owners[id(self)]
        number = calls[id(self)]
        calls[id(self)] += 1
        scores = self.scorer.score_classes([own, *states], self.reference)
        found = signals(scores[0], scores[1:], verdict.drop)
        total = self_weight + sum(weights)
        least = 1 / (len(states) + 1)
        shares = [max(w / total, least) for w in weights]
        mixes = self.scorer.score_classes([mixed(own, s, a) for s, a in zip(states, shares, strict=True)],
                                          self.reference)
        for sig, mix in zip(found, mixes, strict=True):
            sig["mix_loss_rise"] = float(np.nanmax(np.array(mix.loss) - np.array(scores[0].loss)))
        if DUMP:
            vectors = [torch.cat([t.reshape(-1).float() for _, t in sorted(x.items())]) for x in [own, *states]]
            DUMP[1].write(torch.stack(vectors).numpy().tobytes())
            DUMP[0].write(json.dumps({"round": number, "observer": owners[id(self)][0],
                                      "observer_honest": not observer_byz, "shares": shares,
                                      "honest": [hash(x) not in byzantine_ids for x in senders]}) + "\n")
            DUMP[0].flush()
            DUMP[1].flush()
        for j, (sender, sig) in enumerate(zip(senders, found, strict=True)):
            rows.append((number, not observer_byz, hash(sender) not in byzantine_ids, sig))
            raw.append((number, not observer_byz, hash(sender) not in byzantine_ids, id(self),
                        scores[0].accuracy, scores[0].loss, mixes[j].accuracy, mixes[j].loss,
                        scores[1 + j].accuracy, scores[1 + j].loss, shares[j]))
        return verdict

    from p2pfl.node import mixer

    mix = mixer.Mixer.mix

    async def mixing(self: Any, number: int, own: Any, start: Any, updates: Any, samples: int) -> Any:
        judging.senders = [u.sender for u in updates]  # type: ignore[attr-defined]
        return await mix(self, number, own, start, updates, samples)

    runner._make_node, ReferenceGate.judge, mixer.Mixer.mix = making, judging, mixing  # type: ignore[method-assign]
    try:
        runner.run_scenario(scenario, seed)
    finally:
        runner._make_node, ReferenceGate.judge, mixer.Mixer.mix = make_node, judge, mix  # type: ignore[method-assign]
    return rows


def summary(rows: list[tuple[int, bool, bool, dict[str, float]]]) -> dict[str, Any]:
    """Per signal and round range: honest p50/p95/p99/max, and the share of Byzantine
    pairs above the honest p99 (from honest observers)."""
    out: dict[str, Any] = {}
    for signal in SIGNALS:
        for label, lo, hi in (("r0-4", 0, 5), ("r5-14", 5, 15), ("r15+", 15, 10**9)):
            honest = np.array([d[signal] for r, obs, h, d in rows if obs and h and lo <= r < hi])
            byz = np.array([d[signal] for r, obs, h, d in rows if obs and not h and lo <= r < hi])
            if not len(honest):
                continue
            hq = np.percentile(honest, [50, 95, 99, 100])
            row = {"honest p50/95/99/max": [round(float(v), 3) for v in hq]}
            if len(byz):
                row["byz p10/50/90"] = [round(float(v), 3) for v in np.percentile(byz, [10, 50, 90])]
                row["byz > honest p99"] = round(float(np.mean(byz > hq[2])), 2)
                row["byz > honest max"] = round(float(np.mean(byz > hq[3])), 2)
            out[f"{signal} {label}"] = row
    return out


def main() -> None:
    """Run one scenario and print the drop distributions as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", default="label_flip")
    parser.add_argument("--params", default="{}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--byzantine", type=int, default=4)
    parser.add_argument("--topology", default="regular")
    parser.add_argument("--tolerance", type=float, default=1.0)
    parser.add_argument("--dump", help="append every judged round's states to DUMP.f32, metadata to DUMP.jsonl")
    parser.add_argument("--raw", help="also save every judged pair's per-class scores here (.json)")
    args = parser.parse_args()
    topology_params = {"degree": 4} if args.topology == "regular" else {"p": 0.3} if args.topology == "erdos_renyi" else {}
    if args.dump:
        DUMP.extend([open(args.dump + ".jsonl", "w"), open(args.dump + ".f32", "wb")])  # noqa: SIM115
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Scenario(
            name="reference-signals", nodes=16, rounds=args.rounds, topology=args.topology,
            topology_params=topology_params, partition="dirichlet", alpha=0.5,
            task_options={"holdout": PER_CLASS}, attack=args.attack,
            attack_params=json.loads(args.params), byzantine=0 if args.attack == NO_ATTACK else args.byzantine,
            reference=reference_config(Path(tmp), args.tolerance),
        )
        rows = measure(replace(scenario), args.seed)
    if args.raw:
        Path(args.raw).write_text(json.dumps(RAW))
    for key, row in summary(rows).items():
        print(key, json.dumps(row))


if __name__ == "__main__":
    main()
