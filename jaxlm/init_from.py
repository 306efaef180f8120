"""`init_from: RUN_DIR[@STEP]`: a new run starts from another run's params (pretrain -> fine-tune)."""

from __future__ import annotations

from typing import Any

import jax

from jaxlm.checkpoint import CheckpointDamaged, shapes
from jaxlm.errors import UserError
from jaxlm.run import RunDir, read_only_checkpointer, run_path, saved_config
from jaxlm.state import Setup, make_setup
from jaxlm.tokenizer import HF_PREFIX, tokenizer_files


def params_from(spec: str, setup: Setup) -> Any:
    """Params of checkpoint `RUN_DIR[@STEP]` laid out for `setup`.

    Every parameter must exist in both models with the same shape; the first that does not is
    named in the error. `hf:DIR` reads a Hugging Face checkpoint instead.
    """
    if spec.startswith(HF_PREFIX):
        from jaxlm.hf.importer import params_from_hf

        return params_from_hf(Path(spec[len(HF_PREFIX):]).expanduser(), setup)
    run_text, _, step_text = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if step_text and not step_text.isdigit():
        raise UserError(f"init_from '{spec}' must look like RUN_DIR or RUN_DIR@STEP")
    run = RunDir(run_path(run_text))
    checkpointer = read_only_checkpointer(run)
    try:
        steps = checkpointer.all_steps()
        step = int(step_text) if step_text else max(steps)
        if step not in steps:
            raise UserError(f"init_from: {run.root} has no checkpoint at step {step}; it has {sorted(steps)}")
        where = f"init_from {run.root}@{step}"
        try:
            source_cfg = saved_config(checkpointer, run, step)
            _check_matches(where, source_cfg, setup)
            return checkpointer.restore_params(step, setup)
        except CheckpointDamaged as err:
            raise UserError(f"{where}: the checkpoint is unreadable ({err}); name another step") from None
    finally:
        checkpointer.close()


def _check_matches(where: str, source_cfg: Any, setup: Setup) -> None:
    if _tokenizer_identity(source_cfg.data.tokenizer) != _tokenizer_identity(setup.cfg.data.tokenizer):
        raise UserError(
            f"{where}: that run's tokenizer differs from data.tokenizer "
            f"({setup.cfg.data.tokenizer}); its embeddings would mean other text: use "
            f"data.tokenizer={source_cfg.data.tokenizer} as it did"
        )
    source = shapes(make_setup(source_cfg, jax.devices()[:1]).abstract["params"])
    target = shapes(setup.abstract["params"])
    for name in source.keys() - target.keys():
        raise UserError(
            f"{where}: that run has parameter '{name}' this model lacks "
            f"(it trained objective {source_cfg.objective}); start from a matching run"
        )
    for name, shape in target.items():
        if name not in source:
            raise UserError(
                f"{where}: parameter '{name}' does not exist there "
                f"(that run trained objective {source_cfg.objective}); start from a matching run"
            )
        if source[name] != shape:
            raise UserError(
                f"{where}: parameter '{name}' has shape {source[name]} there but {shape} here; "
                "match the model config (and tokenizer) of that run"
            )


def _tokenizer_identity(spec: str) -> bytes:
    """What a tokenizer is, independent of where its files live: their bytes."""
    files = tokenizer_files(spec)
    return b"\0".join(f.read_bytes() for f in files) if files else spec.encode()
