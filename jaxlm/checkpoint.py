"""Orbax adapter: a run's checkpoints (params, optimizer state, grain iterator, config, dataset
manifest) and what can go wrong reading or writing them.

Items are saved separately so evaluation restores params alone; every restore goes through an
abstract target built for the *current* mesh, so a checkpoint restores onto any device layout.
Failures are classified here, where Orbax's and TensorStore's errors are understood:
`CheckpointDamaged` (bytes lost or torn: safe to set aside), `CheckpointMismatch` (a readable
checkpoint of another model or layout: never set aside) and `CheckpointWriteFailed`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # no public alias in 0.12

from jaxlm import storage
from jaxlm.config import CheckpointConfig, Config, to_dict
from jaxlm.errors import TrainingStopped, UserError
from jaxlm.state import Setup, State, init_state
from jaxlm.storage import Path

# TensorStore reports storage problems as ValueError("STATUS: ..."); these mean lost or torn bytes.
_LOSS_STATUSES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")
_STATE_ITEMS = ("params", "opt")


class CheckpointDamaged(Exception):
    """Bytes of a checkpoint are missing or torn; the message is the first line of the cause."""


class CheckpointMismatch(UserError):
    """A readable checkpoint that does not fit the model being restored (other shapes or items)."""


class CheckpointWriteFailed(TrainingStopped):
    """A checkpoint could not be written (disk full, permissions, storage errors)."""


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status(err: BaseException) -> str | None:
    """TensorStore's status code at the start of a ValueError's message, if there is one."""
    head = str(err).split(":", 1)[0]
    is_status = isinstance(err, ValueError) and head.isupper() and head.replace("_", "").isalpha()
    return head if is_status else None


def data_loss(err: BaseException) -> BaseException | None:
    """The cause in `err`'s chain that means a checkpoint's bytes are lost or torn, if any."""
    for cause in _chain(err):
        if isinstance(cause, json.JSONDecodeError):
            return cause
        if isinstance(cause, OSError) and not isinstance(cause, PermissionError):
            return cause
        if _status(cause) in _LOSS_STATUSES:
            return cause
    return None


def storage_failure(err: BaseException) -> BaseException | None:
    """The cause in `err`'s chain that is a storage error (OSError or a TensorStore status)."""
    return next((c for c in _chain(err) if isinstance(c, OSError) or _status(c)), None)


def first_line(err: BaseException) -> str:
    """A short description: TensorStore's status with its innermost reason, else the first line."""
    text = str(err).strip()
    text = text.splitlines()[0] if text else type(err).__name__
    if _status(err):
        reason = re.split(r" \[(?:tensorstore_spec|os_error_code)=", text)[0].rsplit(": ", 1)[-1]
        return f"{_status(err)}: {reason}"[:200]
    return text[:200]


class _StorageErrors(logging.Filter):
    """Drops log records of storage errors, keeping the first: Orbax's background save thread logs
    (and otherwise swallows) the one that failed a save, and after a failed read or write its
    leftover asyncio futures log theirs; the run reports the cause in one line instead."""

    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and storage_failure(exc) is not None:
            self.error = self.error or exc
            return False
        return True


def _closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _skip_closed_loop_unraisable(unraisable: Any, previous: Callable) -> None:
    if not _closed_loop(unraisable.exc_value):
        previous(unraisable)


def _skip_closed_loop_error(kind: type, exc: BaseException, tb: Any, previous: Callable) -> None:
    if not _closed_loop(exc):
        previous(kind, exc, tb)


def _quiet_orbax_leftovers() -> None:
    """When a read or write fails, Orbax's other asyncio tasks of that operation log the same
    storage error as "never retrieved", and TensorStore's callbacks still call into Orbax's event
    loop after it closed, from other threads (Python prints each through these hooks). The run
    reports the failure once, in one line, so both are dropped. Installed once per process."""
    if getattr(sys.excepthook, "func", None) is _skip_closed_loop_error:
        return
    logging.getLogger("asyncio").addFilter(_StorageErrors())
    sys.unraisablehook = functools.partial(_skip_closed_loop_unraisable, previous=sys.unraisablehook)
    sys.excepthook = functools.partial(_skip_closed_loop_error, previous=sys.excepthook)


# Replicated arrays whose per-replica slice is smaller than this are written by one replica: Orbax
# otherwise splits every replicated array across its replicas with a jitted slice per shape and
# mesh (84 compiles, ~3 s, for a tiny model's first save on a new mesh), which gains nothing on
# slices this small.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 2**20


def _use_single_replica_for_small_arrays() -> None:
    """Orbax's default jax.Array handler (with the array metadata store of its own registry),
    the slice threshold aside; registered once, when this module is imported, without Orbax's
    warning about the override (it is deliberate, and users would see it on every command)."""
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


_use_single_replica_for_small_arrays()


def _handlers(params_write_bytes: int | None) -> dict[str, Any] | None:
    """Orbax's handler per item (None: its defaults), with the params' and optimizer state's
    encoded bytes in flight capped at `params_write_bytes`."""
    if params_write_bytes is None:
        return None
    import grain  # here, not at the top: commands that never save the data position skip its import

    # In GB as a float (Orbax multiplies by 1e9), with 1 MiB to spare for the rounding.
    arrays = lambda: ocp.StandardCheckpointHandler(
        save_concurrent_gb=(params_write_bytes + 2**20) / 1e9)
    return {"params": arrays(), "opt": arrays(), "config": ocp.JsonCheckpointHandler(),
            "dataset": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig, *, read_only: bool = False,
                 params_write_bytes: int | None = None):
        """`params_write_bytes` caps the params bytes Orbax holds encoded before writing them
        (at least the largest param's): by default it encodes the whole tree first, a second
        copy of the model in host memory."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = directory if storage.is_remote(directory) else directory.absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=_handlers(params_write_bytes))
        # Orbax removes stale tmp dirs in a thread that neither close() nor exit waits for: a run
        # stopped by a setup error right after this would die under it, printing a traceback.
        self._manager._maybe_await_cleanup_tmp_directory()  # a directory listing: quick
        self._unconfirmed: int | None = None  # the last step saved, until it is seen committed
        self._errors = _StorageErrors()
        _quiet_orbax_leftovers()
        logging.getLogger("absl").addFilter(self._errors)

    # ------------------------------------------------------------ writing

    def save(self, step: int, state: State, data_iter: Any, cfg: Config,
             dataset: dict[str, Any] | None = None) -> None:
        """Starts an (async) save; arrays are copied off the devices before this returns. A state
        without "opt" and no `data_iter` saves params alone (an imported model)."""
        self.check_saves()
        self._errors.error = None  # only errors logged while this save runs belong to it
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "config": ocp.args.JsonSave(to_dict(cfg))}
        if "opt" in state:  # else params alone: an imported model
            items["opt"] = ocp.args.StandardSave(state["opt"])
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if dataset is not None:
            items["dataset"] = ocp.args.JsonSave(dataset)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001 - narrowed to storage errors just below
            self._raise_write_failure(step, err)
        self._unconfirmed = step

    def check_saves(self) -> None:
        """Raises CheckpointWriteFailed once a finished background save turns out not written."""
        step = self._unconfirmed
        if step is None or self._manager.is_saving_in_progress():
            return
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - narrowed to storage errors just below
            self._raise_write_failure(step, err)
        if self._errors.error is not None:
            self._raise_write_failure(step, self._errors.error)
        if jax.process_index() == 0:  # the primary commits; others may not see it yet
            self._manager.reload()
            if step not in self._manager.all_steps():
                self._raise_write_failure(step, None)
        self._unconfirmed = None

    def wait(self) -> None:
        """Blocks until the last save is written; raises CheckpointWriteFailed if it was not."""
        if self._unconfirmed is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - narrowed to storage errors by the call below
            self._raise_write_failure(self._unconfirmed, err)
        self.check_saves()

    def _raise_write_failure(self, step: int, err: BaseException | None) -> None:
        cause = storage_failure(err) if err is not None else None
        if err is not None and cause is None:
            raise err  # not a storage problem: a bug, with its traceback
        why = first_line(cause) if cause is not None else "the save did not complete"
        earlier = [s for s in self._manager.all_steps() if s < step]
        kept = (f"checkpoint {max(earlier)} in {self.directory} is intact" if earlier
                else "no earlier checkpoint exists")
        raise CheckpointWriteFailed(f"writing checkpoint {step} failed ({why}); the run stopped; "
                                    f"{kept}") from None

    # ------------------------------------------------------------ reading

    def restore(self, step: int, setup: Setup, data_iter: Any | None) -> State:
        """The full train state on `setup`'s mesh; `data_iter` is advanced in place (None: the data
        position is not restored). Raises CheckpointDamaged or CheckpointMismatch."""
        if self._params_only(step):  # an imported model: fresh optimizer, data from its start
            return {"params": self.restore_params(step, setup), "opt": init_state(setup)["opt"]}
        items = {part: self._state_item(step, setup, part) for part in _STATE_ITEMS}
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._read(step, items)
        return {"params": restored.params, "opt": restored.opt}

    def restore_params(self, step: int, setup: Setup, host: bool = False) -> Any:
        """Params on `setup`'s mesh, or as host numpy arrays (`host`: nothing placed on devices,
        e.g. to convert them)."""
        item = self._state_item(step, setup, "params")
        if host:
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item.item)
            item = ocp.args.PyTreeRestore(item=item.item, restore_args=as_numpy)
        return self._read(step, {"params": item}).params

    def _params_only(self, step: int) -> bool:
        """A checkpoint of params alone: what `jaxlm import` writes."""
        return not any((self.step_dir(step) / part).exists() for part in ("opt", "data"))

    def restore_config_dict(self, step: int) -> dict[str, Any]:
        return self._read(step, {"config": ocp.args.JsonRestore()}).config

    def has_data(self, step: int) -> bool:
        """Whether checkpoint `step` holds a data iterator position (imported models hold none)."""
        return (self.step_dir(step) / "data").is_dir()

    def restore_dataset(self, step: int) -> dict[str, Any] | None:
        """The dataset manifest saved with the checkpoint (None: saved before manifests existed)."""
        if not (self.step_dir(step) / "dataset").is_dir():
            return None
        return self._read(step, {"dataset": ocp.args.JsonRestore()}).dataset

    def check_fits(self, step: int, setup: Setup) -> None:
        """Raises CheckpointMismatch (or CheckpointDamaged) unless `setup`'s model and optimizer
        state could restore from checkpoint `step`; reads metadata only."""
        for part in _STATE_ITEMS:
            self._state_item(step, setup, part)

    def saved_mesh(self, step: int) -> dict[str, int]:
        """{axis: size} of the mesh checkpoint `step`'s params were written from."""
        saved = self._metadata(step, "params")
        leaf = jax.tree.leaves(saved, is_leaf=lambda x: hasattr(x, "sharding"))[0]
        return dict(zip(leaf.sharding.axis_names, map(int, leaf.sharding.shape)))

    def _state_item(self, step: int, setup: Setup, part: str) -> Any:
        """The restore args of one state item, after checking the saved shapes fit the model."""
        directory = self.step_dir(step) / part
        if not directory.is_dir():
            raise CheckpointMismatch(
                f"checkpoint {step} in {self.directory} has no '{part}' item: it was written by "
                "another layout; start a new train.run_dir"
            )
        target = setup.abstract_sharded(part)
        _check_same_shapes(step, part, shapes(self._metadata(step, part)), shapes(target))
        return ocp.args.StandardRestore(target)

    def _metadata(self, step: int, part: str) -> Any:
        """Orbax's saved tree of one state item (shapes, dtypes, shardings); no array is read."""
        try:
            return ocp.StandardCheckpointHandler().metadata(self.step_dir(step) / part)
        except Exception as err:  # noqa: BLE001 - narrowed by data_loss just below
            self._raise_read_failure(step, err)

    def _read(self, step: int, items: dict[str, Any]) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - narrowed by data_loss just below
            self._raise_read_failure(step, err)

    def _raise_read_failure(self, step: int, err: Exception) -> None:
        cause = data_loss(err)
        if cause is None:
            raise err
        raise CheckpointDamaged(first_line(cause)) from err

    # ------------------------------------------------------------ the directory

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def reload(self) -> None:
        """Re-reads the directory after checkpoints were moved away."""
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a (multi-host) preemption notice arrived."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for the last async save; raises CheckpointWriteFailed if it was not written."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as err:  # noqa: BLE001 - a storage error here was reported by wait()
                if storage_failure(err) is None:
                    raise
            finally:
                logging.getLogger("absl").removeFilter(self._errors)


def _check_same_shapes(step: int, part: str, saved: dict[str, tuple], wanted: dict[str, tuple]) -> None:
    what = "parameter" if part == "params" else "optimizer state"
    for name, shape in wanted.items():
        if name not in saved:
            raise CheckpointMismatch(
                f"checkpoint {step} has no {what} '{name}': it belongs to another model or "
                "optimizer; start a new train.run_dir or restore the config it was trained with"
            )
        if saved[name] != shape:
            raise CheckpointMismatch(
                f"checkpoint {step} has {what} '{name}' of shape {saved[name]}, the configured "
                f"model {shape}; shapes cannot change within a run: start a new train.run_dir "
                "(init_from can start it from this one)"
            )
    for name in saved.keys() - wanted.keys():
        raise CheckpointMismatch(
            f"checkpoint {step} has {what} '{name}' this model lacks; start a new train.run_dir "
            "or restore the config it was trained with"
        )


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every array leaf (nnx.Variable's `value` level left out)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "shape"):
            continue
        shapes[leaf_name(path)] = tuple(leaf.shape)
    return shapes


def leaf_name(path: tuple) -> str:
    """The dotted name of a state leaf's tree path, as errors and reports print it."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(n for n in names if n != "value")
