"""Summarise how a test network's honest nodes mixed their neighbours, round by round.

usage: python benchmarks/testnet_mix.py RUN_DIR
RUN_DIR is a `p2pfl -v testnet ... --out RUN_DIR` run (its nodes log one mix line per
round at -v; p2pfl/node/mixer.py). Prints, per round and kind of neighbour (honest or
byzantine), summed over the honest observers: pair-rounds, mean distance from the
observer's model, that distance over the rule's clipping radius, mixing weight, the share
of the model the rule used, and the shares of pair-rounds the harm check vetted and the
joint check found pulling (over its bar in the whole mix).
"""
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"round (\d+) mix: own w [\d.]+ radius (\S+); (.*)")


FLAGS = ("vetted", "pulled")  # fields printed as a bare name when true


def fields(part: str) -> tuple[str, dict[str, str], dict[str, bool]]:
    """A neighbour's entry: its short id, its named values, and which flags it has."""
    words = part.split()
    named = [w for w in words[1:] if w not in FLAGS]
    return words[0], dict(zip(named[0::2], named[1::2], strict=True)), {f: f in words for f in FLAGS}


def main(run: Path) -> None:
    report = json.loads((run / "report.json").read_text())
    role = {n["short_id"]: n["role"] for n in report["nodes"]}
    pairs: dict[tuple[int, str], list[tuple[float, float, float, float, bool, bool]]] = defaultdict(list)
    for node in report["nodes"]:
        if node["role"] != "honest":
            continue
        for line in (run / "logs" / f"node{node['index']}.log").read_text().splitlines():
            match = LINE.search(line)
            if not match or match.group(2) == "-":
                continue
            number, radius = int(match.group(1)), float(match.group(2))
            for part in match.group(3).split("; "):
                peer, values, flags = fields(part)
                d = float(values["d"])
                pairs[(number, role[peer])].append((d, d / radius, float(values["w"]), float(values["used"]),
                                                    flags["vetted"], flags["pulled"]))
    if not pairs:
        raise SystemExit(f"{run}: no mix lines; run the testnet with p2pfl -v")
    print(f"{'round':>5} {'neighbour':<10} {'pairs':>5} {'d':>6} {'d/rad':>6} {'w':>5} {'used':>5} {'vetted':>6} {'pulled':>6}")
    for (number, kind), rows in sorted(pairs.items()):
        mean = [statistics.mean(column) for column in zip(*rows, strict=True)]
        print(f"{number:5d} {kind:<10} {len(rows):5d} {mean[0]:6.2f} {mean[1]:6.2f} {mean[2]:5.2f} {mean[3]:5.2f} {mean[4]:6.2f} {mean[5]:6.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
