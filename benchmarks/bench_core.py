"""Benchmark the pure core: codec against a memory copy, hashing, signatures, aggregation rules.

Usage: python benchmarks/bench_core.py [--params 25000000] [--repeat 3]

Every figure is the median of ``--repeat`` runs (signatures: of at least 20). The memcpy
baseline is the fastest of three honest copies of the encoded bytes into fresh memory,
timed round-robin with encode and decode in the same run, so ratios depend little on the
machine or its load (printed on the first line; absolute times do depend on it).
The codec targets are meant for the default size: 100 MB buffers lie above glibc's
32 MiB mmap ceiling, so every fresh buffer (copy, encode or decode) is page-faulted in
alike; with small --params, freed heap memory is reused by some steps and not others, and
ratios then measure the allocator's luck more than the codec.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from p2pfl.core.codec import State, decode_state, encode_state


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """Return the median wall time of ``repeat`` calls of ``fn``."""
    return interleaved_medians({"fn": fn}, repeat)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Time ``fns`` round-robin ``repeat`` times, so load spikes hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def model_state(params: int, seed: int = 0) -> State:
    """Return a float32 state of ``params`` parameters: 4 large tensors and 200 small ones."""
    gen = torch.Generator().manual_seed(seed)
    small = min(200 * 5000, params // 4)
    state = {f"block{i:03d}.bias": torch.randn(small // 200, generator=gen) for i in range(200)}
    large, rest = divmod(params - sum(t.numel() for t in state.values()), 4)
    for i in range(4):
        state[f"layer{i}.weight"] = torch.randn(large + (rest if i == 0 else 0), generator=gen)
    return state


def row(label: str, seconds: float, baseline: float | None, target: str, ok: bool | None) -> None:
    ratio = f"{seconds / baseline:6.2f}x" if baseline else "      "
    verdict = {True: "ok", False: "MISSED", None: ""}[ok]
    print(f"  {label:<24}{seconds * 1e3:11.2f} ms  {ratio}   {target:<22}{verdict}")


def bench_codec(params: int, repeat: int) -> tuple[bytes, float]:
    """Time memcpy, encode and decode; return the payload and the memcpy baseline."""
    state = model_state(params)
    data = encode_state(state)
    decoded = decode_state(data)
    assert all(torch.equal(decoded[k], state[k]) for k in state), "round trip broken"
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    copies: dict[str, Callable[[], Any]] = {
        "bytearray(data)": lambda: bytearray(data),
        "bytes(memoryview)": lambda: bytes(memoryview(data)),
        "torch uint8 clone": raw.clone,
    }
    warm = torch.empty_like(raw)  # touched once here, so the timed copy takes no page faults
    warm.copy_(raw)
    steps: dict[str, Callable[[], Any]] = {
        **copies,
        "warm": lambda: np.copyto(warm.numpy(), raw.numpy()),
        "encode": lambda: encode_state(state),
        "decode": lambda: decode_state(data),
        "sha256": lambda: hashlib.sha256(data).digest(),
    }
    timed = interleaved_medians(steps, repeat)
    best = min(copies, key=timed.__getitem__)
    memcpy = timed[best]
    print(f"codec: {params:,} float32 parameters in {len(state)} tensors, {len(data):,} bytes")
    print(f"  {'step':<24}{'median':>14}  {'ratio':>7}   {'target':<22}")
    for name in copies:
        row(f"copy: {name}", timed[name], memcpy, "baseline" if name == best else "", None)
    for name in ("encode", "decode"):
        row(name, timed[name], memcpy, "<= 3x memcpy", timed[name] <= 3 * memcpy)
    row("sha256", timed["sha256"], memcpy, "", None)
    # Info only: encode must return new bytes, so the baseline includes allocation too.
    row("copy into warm buffer", timed["warm"], memcpy, "info: no allocation", None)
    return data, memcpy


def bench_signatures(data: bytes, memcpy: float, repeat: int) -> None:
    """Time signing and verifying a 32-byte digest, if core.crypto exists."""
    try:
        from p2pfl.core.crypto import Identity, verify_signature
    except ImportError as exc:
        print(f"  sign/verify: skipped, p2pfl.core.crypto not importable ({exc})")
        return
    identity = Identity.generate()
    digest = hashlib.sha256(data).digest()
    signature = identity.sign(digest)
    verify_signature(identity.public_key, digest, signature)  # raises if broken
    runs = max(repeat, 20)
    sign = median_seconds(lambda: identity.sign(digest), runs)
    verify = median_seconds(lambda: verify_signature(identity.public_key, digest, signature), runs)
    row("sign", sign, None, "", None)
    row("verify", verify, None, "", None)
    row("sign + verify", sign + verify, None, "< 10 ms", sign + verify < 0.010)
    bench_announcements(identity)


def bench_announcements(identity: Any, count: int = 5000) -> None:
    """Verify distinct signed announcements (what every subscriber does): count per second."""
    from p2pfl.core.envelope import (
        AnnouncementKind,
        encode_announcement,
        parse_announcement,
        sign_update,
    )

    messages = [
        encode_announcement(AnnouncementKind.UPDATE, sign_update(
            identity, network_id="bench", round=n, payload=b"x", samples=1, ts_ms=n))
        for n in range(count)
    ]
    started = time.process_time()  # one core: CPU time, not wall time, on a shared machine
    for data in messages:
        parse_announcement(identity.peer_id, data, network_id="bench")
    rate = count / (time.process_time() - started)
    print(f"  {'announcements verified':<28} {rate:>10,.0f} /s CPU   target >= 10,000/s  "
          f"{'OK' if rate >= 10_000 else 'MISSED'}")


def bench_aggregation(neighbours: int, params: int, repeat: int) -> None:
    """Time every registered aggregation rule on ``neighbours`` states of ``params`` parameters."""
    try:
        from p2pfl.core.aggregation import RULES
    except ImportError as exc:
        print(f"\naggregation: skipped, p2pfl.core.aggregation not importable ({exc})")
        return
    states = [model_state(params, seed) for seed in range(neighbours + 1)]
    own, others, weights = states[0], states[1:], [1.0] * neighbours
    print(f"\naggregation: {neighbours} neighbours x {params:,} parameters (median of {repeat})")
    for name, rule in sorted(RULES.items()):
        target = "no target" if name == "geomed" else "< 0.5 s"
        try:
            seconds = median_seconds(functools.partial(rule, own, others, weights), repeat)
        except Exception as exc:  # a broken rule must not hide the others' figures
            print(f"  {name:<24}{'ERROR':>14}  {type(exc).__name__}: {exc}")
            continue
        row(name, seconds, None, target, None if name == "geomed" else seconds < 0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--agg-params", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load}")
    data, memcpy = bench_codec(args.params, args.repeat)
    bench_signatures(data, memcpy, args.repeat)
    bench_aggregation(args.neighbours, args.agg_params, args.repeat)


if __name__ == "__main__":
    main()
