"""Orbax checkpoints of a run: params, optimizer state, grain iterator and resolved config.

Items are saved separately so evaluation restores params alone; every restore goes through an
abstract target built for the *current* mesh, so a checkpoint restores onto any device layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig, Config, apply_override, from_dict, to_dict, validate
from jaxlm.errors import UserError
from jaxlm.state import Setup, State, make_setup


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig, *, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = directory.absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: State, data_iter: Any, cfg: Config) -> None:
        """Starts an (async) save; arrays are copied off the devices before this returns."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                opt=ocp.args.StandardSave(state["opt"]),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(to_dict(cfg)),
            ),
            force=True,
        )

    def restore(self, step: int, setup: Setup, data_iter: Any) -> State:
        """Restores the full train state onto `setup`'s mesh; `data_iter` is advanced in place."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(setup.abstract_sharded("params")),
                opt=ocp.args.StandardRestore(setup.abstract_sharded("opt")),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        return {"params": restored.params, "opt": restored.opt}

    def restore_params(self, step: int, setup: Setup) -> Any:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(setup.abstract_sharded("params"))
            ),
        )
        return restored.params

    def restore_config_dict(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config

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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def load_run(
    run_dir: Path,
    step: int | None = None,
    overrides: list[str] = (),
    devices: list[jax.Device] | None = None,
) -> tuple[Config, Setup, Any, int]:
    """Config, setup and params of a run's checkpoint, laid out on `devices` (default: all).

    The run's own mesh may not fit here (a pod checkpoint on a laptop), so params are restored
    data-parallel; `overrides` apply on top of the saved config.
    """
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"{run_dir} holds no checkpoints; pass the run_dir of a `jaxlm train` run")
    checkpointer = Checkpointer(directory, CheckpointConfig(), read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise UserError(f"{directory} holds no complete checkpoint yet")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"{run_dir} has no checkpoint at step {step}; it has {sorted(steps)}")
    raw = checkpointer.restore_config_dict(step)
    raw["mesh"]["axes"] = {name: 1 for name in raw["mesh"]["axes"]} | {"data": -1}
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = from_dict(Config, raw)
    validate(cfg)
    setup = make_setup(cfg, devices)
    params = checkpointer.restore_params(step, setup)
    checkpointer.close()
    return cfg, setup, params, step
