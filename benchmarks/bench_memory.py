"""Peak memory of a node's model-sized stages, in model-size multiples (issue 12 item 3).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_memory.py [--params 25000000]
        [--neighbours 2,4] [--rules mean,clipped_gossip] [--baseline DIR]

A synthetic float32 state of ``--params`` parameters (100 MB by default) in two layouts:
``one`` tensor (5000 x 5000) and ``four`` tensors of unequal sizes. Each stage runs in a
fresh subprocess, which builds the stage's inputs, returns freed heap memory to the
system (``malloc_trim``: the stage must not reuse memory setup left resident), resets its
resident-set high-water mark (``5`` written to ``/proc/self/clear_refs``), runs the stage and reads ``VmHWM``
and ``VmRSS`` from ``/proc/self/status``:

- ``peak``: the high-water mark above the resident set before the stage;
- ``kept``: the resident set after the stage above the one before (what stays alive).

Stages: ``receive`` (16 MiB chunks, as ``read_body`` reads them, hashed and joined into
the payload), ``decode`` (the payload into a state, as ``Fetcher._decode`` does),
``pull`` (both: what one neighbour update costs a node), and ``aggregate`` with 2 and 4
neighbour updates held as a node holds them (decoded from payloads that stay alive, as
the outbox serves them), and ``own_step`` (the length of the node's local step that
the mixer passes clipping rules: ``p2pfl.node.harm.distance``), ``harm_mix`` (one
neighbour mixed in at its share, as the harm check probes it: ``harm.mixed``; the result
is one model). ``calibration`` allocates exactly one model: it must read 1.00.

``--baseline DIR`` runs every stage a second time with ``DIR`` (a tree holding the old
``p2pfl`` package, e.g. ``mkdir /tmp/base && git archive 1c06220 p2pfl | tar -x -C
/tmp/base``) first on PYTHONPATH, and prints both figures side by side.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHUNK = 16 * 2**20  # p2pfl.net.transfer.READ_CHUNK


# ---------------------------------------------------------------- inside a stage process


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]
            for key in ("VmRSS", "VmHWM")}


def _state(layout: str, params: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    if layout == "one":
        side = int(params**0.5)
        return {"w": torch.randn(side, params // side, generator=gen)}
    # four tensors: 36%, 32%, 32% of the parameters and a small bias
    a, b = int(params * 0.36), int(params * 0.32)
    return {"a.weight": torch.randn(a // 1000, 1000, generator=gen),
            "b.weight": torch.randn(1000, b // 1000, generator=gen),
            "c.weight": torch.randn(b // 1000, 1000, generator=gen),
            "c.bias": torch.randn(params - a // 1000 * 1000 - 2 * (b // 1000 * 1000), generator=gen)}


def _hasher(size: int) -> Any:
    from p2pfl.core.envelope import PayloadHasher

    if "size" in inspect.signature(PayloadHasher).parameters:
        return PayloadHasher(size=size)
    return PayloadHasher()


def _receive(payload: bytes) -> Any:
    hasher = _hasher(len(payload))
    for start in range(0, len(payload), CHUNK):
        hasher.add(payload[start : start + CHUNK])  # a fresh bytes object, as a read returns
    return hasher.finish()


def _decode(data: bytes) -> Any:
    from p2pfl.core.codec import decode_payload

    return decode_payload("raw", data)


def _neighbours(own: dict[str, Any], count: int) -> tuple[list[bytes], list[Any]]:
    import torch

    from p2pfl.core.codec import encode_state

    payloads = []
    for j in range(count):
        gen = torch.Generator().manual_seed(j + 1)
        payloads.append(encode_state({k: t + 0.01 * torch.randn(t.shape, generator=gen)
                                      for k, t in own.items()}))
    return payloads, [_decode(p) for p in payloads]


def run_stage(stage: str, layout: str, params: int) -> dict[str, float]:
    """Run one stage here; return peak and kept bytes (see the module docstring)."""
    import torch

    from p2pfl.core.codec import encode_state

    torch.set_num_threads(1)  # as the daemon runs (p2pfl/cli/daemon.py)
    held: list[Any] = []
    if stage == "calibration":
        work = lambda: torch.ones(params)  # noqa: E731
    elif stage in ("receive", "decode", "pull"):
        held.append(encode_state(_state(layout, params)))
        payload = held[0]
        work = {"receive": lambda: _receive(payload), "decode": lambda: _decode(payload),
                "pull": lambda: (lambda p: (p, _decode(p.data)))(_receive(payload))}[stage]
    elif stage in ("own_step", "harm_mix"):
        from p2pfl.node.harm import distance, mixed

        own = _state(layout, params)
        other = {k: t + 0.01 for k, t in own.items()}
        held += [own, other]
        work = {"own_step": lambda: distance(other, own),
                "harm_mix": lambda: mixed(own, other, 0.3)}[stage]
    else:
        from p2pfl.core.aggregation import aggregate

        _, rule, count = stage.split(":")
        own = _state(layout, params)
        payloads, states = _neighbours(own, int(count))
        held += [own, payloads, states]
        params_ = {"own_step": 1.0} if rule != "mean" else {}
        work = lambda: aggregate(rule, own, states, [1.0] * len(states), **params_)  # noqa: E731
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # setup's freed heap must not host the stage's memory
    Path("/proc/self/clear_refs").write_text("5")
    before = _status()
    result = work()
    after = _status()
    del result
    return {"peak": after["VmHWM"] - before["VmRSS"], "kept": after["VmRSS"] - before["VmRSS"]}


# ---------------------------------------------------------------- the driver


def measure(stage: str, layout: str, params: int, code: Path) -> dict[str, float]:
    """Run ``stage`` in a fresh interpreter importing p2pfl from ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--layout", layout, "--params", str(params)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if out.returncode != 0:
        sys.exit(f"stage {stage} ({layout}, {code}) failed:\n{out.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--layouts", default="one,four")
    parser.add_argument("--neighbours", default="2,4")
    parser.add_argument("--rules", default="mean,clipped_gossip")
    parser.add_argument("--baseline", type=Path, help="a tree holding the old p2pfl package")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.layout, args.params)))
        return 0
    model = args.params * 4
    stages = ["calibration", "receive", "decode", "pull", "own_step", "harm_mix"] + [
        f"aggregate:{rule}:{n}" for rule in args.rules.split(",") for n in args.neighbours.split(",")]
    trees = [("now", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    print(f"model: {args.params} float32 = {model / 2**20:.0f} MiB; figures in models "
          f"(peak: high-water mark above the start of the stage; kept: still resident after)")
    head = " ".join(f"{name + ' peak':>14} {name + ' kept':>14}" for name, _ in trees)
    print(f"{'stage':<28} {'layout':<6} {head}")
    for layout in args.layouts.split(","):
        for stage in stages:
            cells = []
            for _, code in trees:
                got = measure(stage, layout, args.params, code)
                cells.append(f"{got['peak'] / model:>14.2f} {got['kept'] / model:>14.2f}")
            print(f"{stage:<28} {layout:<6} {' '.join(cells)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
