"""Defence sweep driver: run settings x attacks x seeds with config overrides.

Each run appends one JSON line to $SWEEP_OUT (default runs/defence_sweep.jsonl).

usage: python benchmarks/defence_sweep.py VARIANT SETTING ATTACK[:k=v,...] SEEDS [ROUNDS] [key=value overrides...]
overrides: rep.X=.. harm.X=.. rule.X=.. ref.X=.. (values parsed as python literals), rule=NAME, reference=on
(ref.X: a field of the reference set's config, e.g. ref.tolerance=0.2; with reference=on)
"""
import ast
import contextlib
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from defence_settings import setting, with_reference

from p2pfl.core.reputation import ReputationConfig
from p2pfl.node.config import HarmCheck
from p2pfl.sim.runner import run_scenario
from p2pfl.sim.scorecard import scorecard

torch.set_num_threads(1)

if os.environ.get("BALANCED"):
    from p2pfl.learners.torch_learner import TorchLearner
    def probe_losses(self, states):
        x, y = self._probe_batch()
        classes = torch.unique(y)
        out = []
        self.model.eval()
        try:
            with torch.inference_mode():
                for state in states:
                    logits = torch.func.functional_call(self.model, dict(state), (x,))
                    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                    vals = torch.stack([per[y == c].mean() for c in classes])
                    out.append(float(vals.max() if os.environ["BALANCED"] == "worst" else vals.mean()))
        finally:
            self.model.train()
        return out
    TorchLearner.probe_losses = probe_losses
variant, sname, attack, seeds = sys.argv[1:5]
rest = sys.argv[5:]
rounds = None
if rest and "=" not in rest[0]:
    rounds = int(rest[0])
    rest = rest[1:]
rep, harm, rule, ref = {}, {}, {}, {}
rulename = None
reference = False
for kv in rest:
    k, v = kv.split("=", 1)
    if k == "rule":
        rulename = v
        continue
    if k == "reference":  # reference=on: the opt-in reference set (setting regho holds it out)
        if v not in ("on", "off"):
            raise SystemExit(f"reference={v}: on or off")
        reference = v == "on"
        continue
    with contextlib.suppress(ValueError, SyntaxError):  # not a literal: keep the string
        v = ast.literal_eval(v)
    grp, key = k.split(".", 1)
    if grp == "const":  # a module constant of the gossip rules, e.g. const.STEP_CAP=2.0
        import p2pfl.core.aggregation.gossip_rules as gossip_rules
        setattr(gossip_rules, key, v)
        continue
    {"rep": rep, "harm": harm, "rule": rule, "ref": ref}[grp][key] = v
sc = setting(sname)
aname, _, aparams = attack.partition(":")
params = {}
for kv in filter(None, aparams.split(",")):
    k, v = kv.split("=")
    params[k] = ast.literal_eval(v)
if aname == "none":
    sc = replace(sc, byzantine=0)
sc = replace(sc, attack=aname, attack_params=params, reputation=ReputationConfig(**rep), harm_check=HarmCheck(**harm),
             rule_params=rule, **({"rule": rulename} if rulename else {}), **({"rounds": rounds} if rounds else {}))
if ref and not reference:
    raise SystemExit("ref.X overrides need reference=on")
if reference:
    sc = with_reference(sc)
    sc = replace(sc, reference=replace(sc.reference, **ref))
for s in [int(x) for x in seeds.split(",")]:
    t = time.time()
    card = scorecard(run_scenario(sc, s))
    d = card["detection"]
    bad = set(card["byzantine"])
    finals = [n["accuracy"][-1] for n in card["nodes"] if not n["byzantine"]]
    out = {"variant": variant, "setting": sname, "attack": attack, "seed": s, "rounds": sc.rounds,
           "rule": sc.rule, "over": rest, "mean": round(card["final"]["honest_mean"], 4),
           "min": round(card["final"]["honest_min"], 4),
           "min_sheltered": card["final"]["honest_min_sheltered"], "recall": d["recall"], "fp_peers": d["false_positive_peers"],
           "fp_sheltered": d["false_positive_peers_sheltered"], "byz_share": d["byzantine_weight_share"],
           "fp_final": d["false_positive_pairs_final"],
           "fp_peers_final": d["false_positive_peers_final"], "exposed": card["exposed_honest"],
           "worst_class": card["final"].get("worst_class"), "wall": round(time.time() - t),
           # per honest node: (attacking neighbours, neighbours, final accuracy)
           "by_node": [(sum(1 for e in card["edges"] if n["index"] in e and set(e) - {n["index"]} <= bad),
                        sum(1 for e in card["edges"] if n["index"] in e), round(n["accuracy"][-1], 3))
                       for n in card["nodes"] if not n["byzantine"]]}
    print(json.dumps(out), flush=True)
    if variant != "diag":
      with open(os.environ.get("SWEEP_OUT", "runs/defence_sweep.jsonl"), "a") as f:
        f.write(json.dumps(out) + "\n")
