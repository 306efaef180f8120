"""Deciding what a restart may continue from: config changes and unreadable checkpoints.

A resumed run must be the same experiment. Keys that change the model, the data or its order are
refused; keys that only change how long, how often, or the schedule, are accepted and reported.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
from jax.experimental import multihost_utils

from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, to_dict
from jaxlm.errors import UserError
from jaxlm.state import Setup, State

# Dotted prefixes of keys that may differ between a checkpoint and the run resuming it.
SAFE_TO_CHANGE = (
    "name",
    "train.steps",
    "train.run_dir",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "train.pseudo_ppl_examples",
    "train.remat",  # recomputation and accumulation change speed and memory, not the math
    "train.grad_accum_steps",
    "model.attention",
    "data.prefetch_batches",  # (not data.worker_count: workers reorder the batches, and the
    # saved iterator state of one worker count does not restore into another)
    "init_from",  # only read when a run starts
    "optimizer.",
    "checkpoint.",
    "mesh.",
)


# Keys that shape the data stream: the data position saved under other values does not apply
# (a forced resume after changing one restarts the stream instead of failing to restore it).
DATA_LAYOUT = ("data.", "train.batch_size", "seed", "objective")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "axes" and key != "rules":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs: {key: (saved, now)}."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_resumable(saved: dict[str, Any], cfg: Config, step: int, force: bool) -> list[str]:
    """Raises UserError for changes that would alter the experiment; returns all, described."""
    changes = config_changes(saved, cfg)
    unsafe = [k for k in changes if not k.startswith(SAFE_TO_CHANGE)]
    described = [f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in changes]
    if unsafe and not force:
        listed = "; ".join(d for k, d in zip(changes, described) if k in unsafe)
        raise UserError(
            f"the config differs from the one checkpoint {step} was trained with ({listed}); "
            "start a new run with --set train.run_dir=NEW_DIR, or pass --force-resume to continue"
        )
    return described


def restore_newest_readable(
    checkpointer: Checkpointer,
    setup: Setup,
    new_iterator: Callable[[], Iterator],
    quarantine: Path,
    force: bool,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> tuple[int, State | None, Iterator]:
    """(step, state, data iterator) of the newest checkpoint that restores, or (0, None, fresh).

    An unreadable checkpoint (truncated files, lost shards) is moved to `quarantine` with a
    warning, never deleted, and the one before it is tried.
    """
    for step in sorted(checkpointer.all_steps(), reverse=True):
        iterator = new_iterator()
        try:
            saved = checkpointer.restore_config_dict(step)
        except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise bare Exception on bad data
            _set_aside(checkpointer, step, quarantine, err, log)
            continue
        for change in check_resumable(saved, setup.cfg, step, force):
            log(f"config change accepted on resume: {change}")
        data_changes = [k for k in config_changes(saved, setup.cfg)
                        if k.startswith(DATA_LAYOUT) and not k.startswith(SAFE_TO_CHANGE)]
        if data_changes:  # only with --force-resume: the saved position belongs to other data
            log(f"the data stream restarts from its beginning ({', '.join(data_changes)} changed)")
        try:
            state = checkpointer.restore(step, setup, None if data_changes else iterator)
        except Exception as err:  # noqa: BLE001 - see above
            _set_aside(checkpointer, step, quarantine, err, log)
            continue
        return step, state, iterator
    return 0, None, new_iterator()


def _set_aside(
    checkpointer: Checkpointer, step: int, quarantine: Path, err: Exception, log: Callable
) -> None:
    target = quarantine / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:  # one mover; the others wait for it
        quarantine.mkdir(parents=True, exist_ok=True)
        shutil.move(str(checkpointer.step_dir(step)), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxlm-quarantine-{step}")
    checkpointer.reload()
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    log(f"warning: checkpoint {step} is unreadable ({first_line[:200]}); moved it to {target} "
        "and trying the previous one")
