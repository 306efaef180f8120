"""Where a training start begins: the newest checkpoint that restores, or a fresh (or `init_from`)
state. One function, `initial_state`, decides it.

A resumed run must be the same experiment. Keys that change the model, the data or its order are
refused, and so is a corpus whose files changed; keys that only change how long, how often, or the
schedule, are accepted and reported. Only a checkpoint whose bytes are lost or torn is set aside
(to `quarantine/`, never deleted); a readable checkpoint that does not fit stops the start with one
line and nothing touched, `--force-resume` or not.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
from jax.experimental import multihost_utils

from jaxlm.checkpoint import Checkpointer, CheckpointDamaged, first_line
from jaxlm.config import Config, to_dict
from jaxlm.errors import TrainingStopped, UserError
from jaxlm.init_from import params_from
from jaxlm.run import Log, RunDir
from jaxlm.state import Setup, State, init_state

# Dotted prefixes of keys that may differ between a checkpoint and the run resuming it.
SAFE_TO_CHANGE = (
    "name",
    "compilation_cache_dir",
    "train.steps",
    "train.run_dir",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "train.pseudo_ppl_examples",
    "train.profile_steps",
    "train.remat",  # recomputation and accumulation change speed and memory, not the math
    "train.grad_accum_steps",
    "model.attention",
    "model.scan_layers",
    "data.prefetch_batches",  # (not data.worker_count: workers reorder task batches, and the
    # saved iterator state of one worker count does not restore into another)
    "init_from",  # only read when a run starts
    "init_heads",
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
    """Keys whose value differs: {key: (saved, now)}. A key the saved config lacks (written before
    jaxlm had it) counts as its default, which is what that run did."""
    old, new = {**_flatten(to_dict(Config())), **_flatten(saved)}, _flatten(to_dict(cfg))
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


PIPELINE_CHANGE = "data pipeline"


def dataset_changes(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> str:
    """'' if the corpus is the one a checkpoint was trained on, else what changed, counted."""
    if saved is None or now is None or saved == now:
        return ""
    if saved.get("dataset") != now.get("dataset"):
        return f"dataset {saved.get('dataset')} -> {now.get('dataset')}"
    if saved.get("stream") != now.get("stream"):  # the rows are cut another way
        return (f"{PIPELINE_CHANGE} {saved.get('stream', 'one stream per batch row')} -> "
                f"{now.get('stream', 'one stream per batch row')}")
    old, new = saved.get("files", {}), now.get("files", {})
    counts = {
        "added": len(new.keys() - old.keys()),
        "removed": len(old.keys() - new.keys()),
        "modified": sum(old[k] != new[k] for k in old.keys() & new.keys()),
    }
    return ", ".join(f"{n} file{'s' * (n != 1)} {what}" for what, n in counts.items() if n) or "options"


def initial_state(
    run: RunDir,
    checkpointer: Checkpointer,
    setup: Setup,
    new_iterator: Callable[[], Iterator],
    dataset: dict[str, Any] | None,
    force: bool,
    log: Log,
) -> tuple[int, State, Iterator, bool]:
    """(step, state, data iterator, resumed) to train from: the newest checkpoint that restores
    (resumed), else a fresh state (from `init_from` if set), with earlier metrics kept aside."""
    for step in sorted(checkpointer.all_steps(), reverse=True):
        try:
            return step, *_resume(checkpointer, step, setup, new_iterator, dataset, force, log), True
        except CheckpointDamaged as err:
            _set_aside(checkpointer, run, step, str(err), log)
        except (UserError, TrainingStopped):
            raise
        except Exception as err:  # noqa: BLE001 - stop with the cause, leaving every file as it is
            raise TrainingStopped(
                f"checkpoint {step} in {checkpointer.directory} could not be restored "
                f"({type(err).__name__}: {first_line(err)}); nothing was changed"
            ) from err
    if jax.process_index() == 0:
        run.set_history_aside(log)
    state = init_state(setup)
    if setup.cfg.init_from:
        state["params"] = params_from(setup.cfg.init_from, setup, state["params"])
    return 0, state, new_iterator(), False


def resume_plan(checkpointer: Checkpointer, step: int, cfg: Config, dataset: dict[str, Any] | None,
                force: bool) -> tuple[list[str], list[str]]:
    """(accepted config changes, why the data stream restarts) for resuming checkpoint `step`
    with `cfg`; raises UserError where the run would change (config or corpus) unless `force`.
    Reads the checkpoint's config and dataset manifest only."""
    saved = checkpointer.restore_config_dict(step)
    accepted = check_resumable(saved, cfg, step, force)
    restart = [k for k in config_changes(saved, cfg)
               if k.startswith(DATA_LAYOUT) and not k.startswith(SAFE_TO_CHANGE)]
    saved_dataset = checkpointer.restore_dataset(step)
    if saved_dataset is None and checkpointer.has_data(step):  # a TFDS catalog dataset's, before
        saved_dataset = {"dataset": (dataset or {}).get("dataset")}  # the stream had a manifest
    changed = dataset_changes(saved_dataset, dataset)
    if changed.startswith(PIPELINE_CHANGE) and not force:
        raise UserError(
            f"checkpoint {step} was written by another {changed}; its data position does not "
            "apply to this one: pass --force-resume to restart the data stream, or start a new "
            "train.run_dir"
        )
    if changed and not force:
        raise UserError(
            f"the corpus changed since checkpoint {step} was written ({changed}); its data position "
            "does not apply: restore the files, start a new train.run_dir, or pass --force-resume "
            "to restart the data stream"
        )
    if changed:
        restart.append(f"corpus: {changed}")
    return accepted, restart


def _resume(checkpointer: Checkpointer, step: int, setup: Setup, new_iterator: Callable[[], Iterator],
            dataset: dict[str, Any] | None, force: bool, log: Log) -> tuple[State, Iterator]:
    """Restores checkpoint `step`; what changed is reported once the restore has succeeded."""
    accepted, restart = resume_plan(checkpointer, step, setup.cfg, dataset, force)
    notes = [f"config change accepted on resume: {change}" for change in accepted]
    if restart:  # only with --force-resume: the saved position belongs to other data
        notes.append(f"the data stream restarts from its beginning ({', '.join(restart)} changed)")
    iterator = new_iterator()
    state = checkpointer.restore(step, setup, None if restart else iterator)
    for note in notes:
        log(note)
    return state, iterator


def _set_aside(checkpointer: Checkpointer, run: RunDir, step: int, why: str, log: Log) -> None:
    target = "quarantine/"
    if jax.process_index() == 0:  # one mover; the others wait for it
        target = run.set_checkpoint_aside(checkpointer.step_dir(step), step)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxlm-quarantine-{step}")
    checkpointer.reload()
    log(f"warning: checkpoint {step} is unreadable ({why}); moved it to {target} "
        "and trying the previous one")
