"""``p2pfl sim``: run a scenario or a grid of scenarios and write their scorecards.

Output directory (``--out``, default ``sim-out/<name>``):

- a scenario: ``<name>-seed<S>.json`` (the scorecard), ``<name>-seed<S>-accuracy.png``
  and ``<name>-seed<S>-reputation.png`` per seed;
- a grid: ``runs/<rule>__<attack>__seed<S>.json`` per run, ``grid.json`` (the
  rules x attacks summary) and ``grid.png`` (its heatmap); ``--plots`` adds the two
  figures of every run. The summary table is also printed.
"""

from __future__ import annotations

import argparse
import copyreg
import json
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from p2pfl.config import require
from p2pfl.sim.scenario import Grid, Scenario, load_grid, load_scenario


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sim`` options to ``parser``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenario", metavar="FILE", help="scenario TOML (examples/scenarios)")
    source.add_argument("--grid", metavar="FILE", help="grid TOML: rules x attacks x seeds")
    parser.add_argument("--out", metavar="DIR", help="output directory (default sim-out/<name>)")
    parser.add_argument("--seeds", type=int, metavar="N", help="run seeds 0..N-1 instead of the file's")
    parser.add_argument("--jobs", type=int, default=1, metavar="J",
                        help="grid runs in parallel processes (default 1; at most the core count)")
    parser.add_argument("--plots", action="store_true", help="grid: also plot every run")


def sim_command(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for; return the exit code (0 on success)."""
    import torch

    torch.set_num_threads(1)  # tiny models: threads cost more than they save
    quiet_nodes(getattr(args, "verbose", 0))
    require(args.jobs >= 1, "--jobs", "must be >= 1")
    require(args.seeds is None or args.seeds >= 1, "--seeds", "must be >= 1")
    if args.scenario:
        scenario = _with_seeds(load_scenario(args.scenario), args.seeds)
        return run_scenario_files(scenario, _out(args, scenario.name))
    grid = load_grid(args.grid)
    grid = replace(grid, base=_with_seeds(grid.base, args.seeds))
    return run_grid_files(grid, _out(args, grid.base.name), jobs=args.jobs,
                          plots=args.plots)


def quiet_nodes(verbosity: int) -> None:
    """Keep hundreds of nodes' per-round logs off the terminal (-v: warnings, -vv: all)."""
    import logging

    if verbosity >= 2:
        return
    level = logging.WARNING if verbosity == 1 else logging.ERROR
    for name in ("p2pfl.node", "p2pfl.net", "p2pfl.attacks", "p2pfl.core"):
        logging.getLogger(name).setLevel(level)


def _with_seeds(scenario: Scenario, seeds: int | None) -> Scenario:
    return scenario if seeds is None else replace(scenario, seeds=tuple(range(seeds)))


def _out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) if args.out else Path("sim-out") / name


def _say(line: str) -> None:
    print(line, flush=True)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def run_scenario_files(scenario: Scenario, out: Path) -> int:
    """Run every seed of ``scenario``, print progress, write scorecards and figures."""
    from p2pfl.sim.plots import plot_accuracy, plot_reputation
    from p2pfl.sim.runner import run_scenario
    from p2pfl.sim.scorecard import run_line, scorecard

    for seed in scenario.seeds:
        _say(f"{scenario.name}: {scenario.nodes} nodes, {scenario.label}, seed {seed}, "
             f"{scenario.rounds} rounds")
        card = scorecard(run_scenario(scenario, seed, progress=_say))
        stem = out / f"{scenario.name}-seed{seed}"
        _write_json(stem.with_suffix(".json"), card)
        plot_accuracy(card, Path(f"{stem}-accuracy.png"))
        plot_reputation(card, Path(f"{stem}-reputation.png"))
        _say(f"{run_line(card)}  [{card['timing']['wall_seconds']:.1f} s]")
    _say(f"wrote {out}/ (peak memory {peak_rss_mb():.0f} MB)")
    return 0


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proxy(table: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(table)


def _proxy_reduce(proxy: MappingProxyType[str, Any]) -> tuple[Any, tuple[dict[str, Any]]]:
    return _proxy, (dict(proxy),)


# Scenarios freeze their parameter tables as mapping proxies; workers receive them pickled.
copyreg.pickle(MappingProxyType, _proxy_reduce)


def _one_run(scenario: Scenario, seed: int) -> str:
    """Run one scenario for one seed in a worker process; return its scorecard as JSON."""
    import torch

    from p2pfl.sim.runner import run_scenario
    from p2pfl.sim.scorecard import scorecard

    torch.set_num_threads(1)  # log levels come with the fork from the parent
    return json.dumps(scorecard(run_scenario(scenario, seed)), allow_nan=False)


def scorecards(
    runs: Sequence[tuple[Scenario, int]], jobs: int = 1
) -> Iterator[dict[str, Any]]:
    """Yield the scorecard of every ``(scenario, seed)`` run, in order, over ``jobs`` processes."""
    from p2pfl.sim.runner import run_scenario
    from p2pfl.sim.scorecard import scorecard

    require(jobs >= 1, "jobs", "must be >= 1")
    if jobs == 1:
        for scenario, seed in runs:
            yield scorecard(run_scenario(scenario, seed))
        return
    with ProcessPoolExecutor(max_workers=min(jobs, len(runs) or 1)) as pool:
        futures = [pool.submit(_one_run, scenario, seed) for scenario, seed in runs]
        for future in futures:
            yield json.loads(future.result())


def run_grid_files(
    grid: Grid, out: Path, *, jobs: int = 1, plots: bool = False
) -> int:
    """Run every (rule, attack, seed) of ``grid``; write run scorecards and the summary."""
    from p2pfl.sim.scorecard import grid_summary, grid_table

    tasks = [(s.rule, s.attack, seed) for s in grid.scenarios() for seed in s.seeds]
    _say(f"{grid.base.name}: {len(grid.rules)} rules x {len(grid.attacks)} attacks x "
         f"{len(grid.base.seeds)} seeds = {len(tasks)} runs of {grid.base.nodes} nodes, "
         f"{grid.base.rounds} rounds")
    started = time.perf_counter()
    cards = _run_tasks(grid, tasks, jobs, out, plots, started)
    summary = grid_summary(cards)
    _write_json(out / "grid.json", summary)
    from p2pfl.sim.plots import plot_grid

    plot_grid(summary, out / "grid.png", title=f"{grid.base.name}: final honest mean accuracy")
    _say("")
    _say(grid_table(summary))
    _say(f"\n{len(tasks)} runs in {time.perf_counter() - started:.0f} s; wrote {out}/")
    return 0


def _run_tasks(
    grid: Grid,
    tasks: Sequence[tuple[str, str, int]],
    jobs: int,
    out: Path,
    plots: bool,
    started: float,
) -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] = []
    runs = [(grid.cell(rule, attack), seed) for rule, attack, seed in tasks]
    for card in scorecards(runs, jobs):
        cards.append(card)
        _record_run(card, out, plots)
        s = card["scenario"]
        acc = card["final"]["honest_mean"]
        _say(f"run {len(cards)}/{len(tasks)}: {s['rule']}, {s['attack']}, seed {card['seed']}, "
             f"{time.perf_counter() - started:.0f} s elapsed, honest mean accuracy "
             f"{'-' if acc is None else f'{acc:.3f}'}")
    return cards


def _record_run(card: dict[str, Any], out: Path, plots: bool) -> None:
    s = card["scenario"]
    stem = out / "runs" / f"{s['rule']}__{s['attack']}__seed{card['seed']}"
    _write_json(stem.with_suffix(".json"), card)
    if plots:
        from p2pfl.sim.plots import plot_accuracy, plot_reputation

        plot_accuracy(card, Path(f"{stem}-accuracy.png"))
        plot_reputation(card, Path(f"{stem}-reputation.png"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``p2pfl sim`` on its own (``python -m p2pfl.sim.cli``)."""
    from p2pfl.errors import P2PFLError

    parser = argparse.ArgumentParser(prog="p2pfl sim", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return sim_command(args)
    except P2PFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_arguments", "main", "sim_command"]
