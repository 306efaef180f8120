"""Compares the train steps of two configs in one process, alternating their steps.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tools/bench_ab.py --set model.n_layers=8 --b train.remat=full [--rounds 50]

On a shared host a benchmark run can be 15 % slower than the next identical one; alternating A
and B step by step exposes both to the same load, so their per-round ratio is stable where two
separate runs are not. A is the config with --set; B is A plus the --b overrides. Prints each
side's step times and the median A/B ratio with its interquartile range (> 1: B is faster).
JAXLM_MALLOC=keep keeps the C heap's freed blocks as in `jaxlm train` (jaxlm.host_memory).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from bench import prepare
from jaxlm.cli import DEFAULT_CONFIG
from jaxlm.host_memory import keep_freed_memory
from jaxlm.state import make_train_step


@dataclass
class Run:
    """One side of the comparison: its compiled step, current state and (fixed) batch."""

    step: Callable
    state: Any
    batch: Any


def compiled_step(config: Path, overrides: list[str]) -> Run:
    """The compiled train step of a config on synthetic full rows."""
    setup, state, batch = prepare(config, overrides)
    return Run(make_train_step(setup).lower(state, batch).compile(), state, batch)


def alternate(runs: dict[str, Run], rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each run, one step of each per round after a warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run.state, metrics = run.step(run.state, run.batch)
            jax.block_until_ready(metrics)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--b", dest="b_overrides", action="append", required=True,
                        help="an override that only B has (repeatable)")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    keep_freed_memory()
    runs = {"A": compiled_step(args.config, args.overrides),
            "B": compiled_step(args.config, args.overrides + args.b_overrides)}
    times = alternate(runs, args.rounds)
    for name, seconds in times.items():
        print(f"{name}: min {min(seconds) * 1e3:.1f} ms, median {np.median(seconds) * 1e3:.1f} ms")
    ratio = np.array(times["A"]) / np.array(times["B"])
    quartiles = np.percentile(ratio, [25, 75])
    print(f"A/B step time: median {np.median(ratio):.3f} "
          f"(interquartile {quartiles[0]:.3f}-{quartiles[1]:.3f}) over {args.rounds} rounds")


if __name__ == "__main__":
    main()
