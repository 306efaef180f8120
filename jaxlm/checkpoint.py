"""Orbax checkpoints of a run: params, optimizer state, grain iterator and resolved config.

Items are saved separately so evaluation restores params alone; every restore goes through an
abstract target built for the *current* mesh, so a checkpoint restores onto any device layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from jaxlm.config import CheckpointConfig, Config, apply_override, from_dict, to_dict, validate
from jaxlm.errors import UserError
from jaxlm.state import Setup, State, init_state, make_setup
from jaxlm.tokenizer import SENTENCEPIECE_PREFIX, load_tokenizer, sentencepiece_path

RUN_TOKENIZER = "tokenizer.model"  # a run's own copy of its SentencePiece model


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
        """Starts an (async) save; arrays are copied off the devices before this returns.
        A state without "opt" and no `data_iter` save params alone (an imported model)."""
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "config": ocp.args.JsonSave(to_dict(cfg))}
        if "opt" in state:
            items["opt"] = ocp.args.StandardSave(state["opt"])
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, setup: Setup, data_iter: Any | None) -> State:
        """Restores the full train state onto `setup`'s mesh; `data_iter` is advanced in place
        (None: the data position is not restored). A params-only checkpoint (an imported model)
        gets a fresh optimizer state and leaves the data at its start."""
        saved = {item.name for item in self.step_dir(step).iterdir()}
        items = {"params": ocp.args.StandardRestore(setup.abstract_sharded("params"))}
        if "opt" in saved:
            items["opt"] = ocp.args.StandardRestore(setup.abstract_sharded("opt"))
        if data_iter is not None and "opt" in saved:  # a train checkpoint has both
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        opt = restored.opt if "opt" in saved else init_state(setup)["opt"]
        return {"params": restored.params, "opt": opt}

    def restore_params(self, step: int, setup: Setup, host: bool = False) -> Any:
        """Params on `setup`'s mesh, or as host numpy arrays (`host`: nothing placed on devices,
        e.g. to convert them)."""
        target = setup.abstract_sharded("params")
        if host:
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            item = ocp.args.PyTreeRestore(item=target, restore_args=as_numpy)
        else:
            item = ocp.args.StandardRestore(target)
        return self._manager.restore(step, args=ocp.args.Composite(params=item)).params

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


def _open_run(run_dir: Path, step: int | None) -> tuple[Checkpointer, int]:
    """A read-only checkpointer on a run and the step to read (default: the latest)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"{run_dir} holds no checkpoints; pass the run_dir of a `jaxlm train` run")
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns that read-only is read-only
    checkpointer = Checkpointer(directory, CheckpointConfig(), read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise UserError(f"{directory} holds no complete checkpoint yet")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"{run_dir} has no checkpoint at step {step}; it has {sorted(steps)}")
    return checkpointer, step


def _run_config(checkpointer: Checkpointer, run_dir: Path, step: int, overrides: list[str]) -> Config:
    """The run's saved config, data-parallel on this machine, its tokenizer the run's own copy."""
    raw = checkpointer.restore_config_dict(step)
    raw["mesh"]["axes"] = {name: 1 for name in raw["mesh"]["axes"]} | {"data": -1}
    if (run_dir / RUN_TOKENIZER).exists():
        raw["data"]["tokenizer"] = f"{SENTENCEPIECE_PREFIX}{run_dir / RUN_TOKENIZER}"
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = from_dict(Config, raw)
    validate(cfg)
    tokenizer_vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    if tokenizer_vocab > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {cfg.data.tokenizer} has {tokenizer_vocab} ids but the checkpoint in "
            f"{run_dir} has model.vocab_size {cfg.model.vocab_size}; use the run's own tokenizer"
        )
    return cfg


def load_run(
    run_dir: Path,
    step: int | None = None,
    overrides: list[str] = (),
    devices: list[jax.Device] | None = None,
    host: bool = False,
) -> tuple[Config, Setup, Any, int]:
    """Config, setup and params of a run's checkpoint, laid out on `devices` (default: all).

    The run's own mesh may not fit here (a pod checkpoint on a laptop), so params are restored
    data-parallel; `overrides` apply on top of the saved config.
    """
    checkpointer, step = _open_run(run_dir, step)
    cfg = _run_config(checkpointer, run_dir, step, overrides)
    setup = make_setup(cfg, devices)
    params = checkpointer.restore_params(step, setup, host)
    checkpointer.close()
    return cfg, setup, params, step


def init_params_from(spec: str, setup: Setup) -> Any:
    """Params of checkpoint `RUN_DIR[@STEP]` laid out for `setup` (pretrain -> fine-tune).

    Every parameter must exist in both models with the same shape; the first that does not is
    named in the error. `hf:DIR` reads a Hugging Face checkpoint instead.
    """
    if spec.startswith("hf:"):
        from jaxlm.hf.importer import params_from_hf

        return params_from_hf(Path(spec[3:]).expanduser(), setup)
    run_text, _, step_text = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if step_text and not step_text.isdigit():
        raise UserError(f"init_from '{spec}' must look like RUN_DIR or RUN_DIR@STEP")
    run_dir = Path(run_text).expanduser()
    checkpointer, step = _open_run(run_dir, int(step_text) if step_text else None)
    source_cfg = _run_config(checkpointer, run_dir, step, [])
    if _tokenizer_identity(source_cfg.data.tokenizer) != _tokenizer_identity(setup.cfg.data.tokenizer):
        raise UserError(
            f"init_from {run_dir}@{step}: that run's tokenizer ({source_cfg.data.tokenizer}) differs "
            f"from data.tokenizer ({setup.cfg.data.tokenizer}); its embeddings would mean other "
            f"text: use data.tokenizer=sentencepiece:{run_dir / RUN_TOKENIZER} or bytes as it did"
        )
    source = _shapes(make_setup(source_cfg, jax.devices()[:1]).abstract["params"])
    target = _shapes(setup.abstract["params"])
    for name in source.keys() - target.keys():
        raise UserError(
            f"init_from {run_dir}@{step}: that run has parameter '{name}' this model lacks "
            f"(it trained objective {source_cfg.objective}); start from a matching run"
        )
    for name, shape in target.items():
        if name not in source:
            raise UserError(
                f"init_from {run_dir}@{step}: parameter '{name}' does not exist there "
                f"(that run trained objective {source_cfg.objective}); start from a matching run"
            )
        if source[name] != shape:
            raise UserError(
                f"init_from {run_dir}@{step}: parameter '{name}' has shape {source[name]} there "
                f"but {shape} here; match the model config (and tokenizer) of that run"
            )
    params = checkpointer.restore_params(step, setup)
    checkpointer.close()
    return params


def _tokenizer_identity(spec: str) -> bytes:
    """What a tokenizer is, independent of where its file lives: the model file's bytes."""
    path = sentencepiece_path(spec)
    return spec.encode() if path is None else load_tokenizer(spec).path.read_bytes()


def _shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """Dotted parameter path -> shape."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        shapes[".".join(n for n in names if n != "value")] = tuple(leaf.shape)  # nnx.Variable.value
    return shapes
