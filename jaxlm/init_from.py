"""`init_from: RUN_DIR[@STEP]`: a new run starts from another run's params (pretrain -> fine-tune).

`init_heads: strict` needs every parameter to match; `reinit` loads the backbone (every parameter
outside the heads), keeps this model's freshly initialized head and drops the source's head, and
prints which parameters were loaded, created and dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxlm.checkpoint import CheckpointDamaged, leaf_name, shapes
from jaxlm.config import architecture
from jaxlm.errors import UserError
from jaxlm.heads import HEAD_NAMES
from jaxlm.run import RunDir, read_only_checkpointer, run_path, saved_config
from jaxlm.state import Setup, init_state, make_setup
from jaxlm.tokenizer import HF_PREFIX, tokenizer_files


def params_from(spec: str, setup: Setup, fresh: Any | None = None) -> Any:
    """Params of checkpoint `RUN_DIR[@STEP]` laid out for `setup` (`fresh`: this model's newly
    initialized params, whose heads `init_heads: reinit` keeps; None: initialized here).

    Every parameter compared must exist in both models with the same shape; the first that does
    not is named in the error. `hf:DIR` reads a Hugging Face checkpoint instead.
    """
    if spec.startswith(HF_PREFIX):
        return _params_from_hf(Path(spec[len(HF_PREFIX):]).expanduser(), setup, fresh)
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
            _check_architecture(where, source_cfg, setup)
            _check_tokenizer(where, source_cfg, setup)
            if setup.cfg.init_heads == "reinit":  # the source's params, on this run's devices
                devices = list(setup.mesh.devices.flat)
                source_cfg = saved_config(checkpointer, run, step, device_count=len(devices))
                source_setup = make_setup(source_cfg, devices)
                _check_matches(where, source_cfg, source_setup, setup, backbone_only=True)
                fresh = init_state(setup)["params"] if fresh is None else fresh
                return _backbone_from(checkpointer.restore_params(step, source_setup), fresh, setup)
            _check_matches(where, source_cfg, make_setup(source_cfg, jax.devices()[:1]), setup)
            return checkpointer.restore_params(step, setup)
        except CheckpointDamaged as err:
            raise UserError(f"{where}: the checkpoint is unreadable ({err}); name another step") from None
    finally:
        checkpointer.close()


def _params_from_hf(directory: Path, setup: Setup, fresh: Any | None) -> Any:
    from jaxlm.hf.importer import hf_source, params_from_hf

    if setup.cfg.init_heads != "reinit":
        return params_from_hf(directory, setup)
    source_cfg, source_setup, source = hf_source(directory, setup)
    _check_matches(f"init_from hf:{directory}", source_cfg, source_setup, setup, backbone_only=True)
    fresh = init_state(setup)["params"] if fresh is None else fresh
    return _backbone_from(source, fresh, setup)


def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_NAMES


def _backbone_from(source: Any, fresh: Any, setup: Setup) -> Any:
    """`fresh` with every backbone leaf replaced by the source's (placed for `setup`); reports
    what was loaded, created and dropped."""
    loaded = {leaf_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(source)
              if not _is_head(leaf_name(p))}

    def pick(path: tuple, leaf: jax.Array, sharding: Any) -> jax.Array:
        name = leaf_name(path)
        return leaf if _is_head(name) else jax.device_put(loaded[name], sharding)

    params = jax.tree_util.tree_map_with_path(pick, fresh, setup.shardings["params"])
    if jax.process_index() == 0:
        created = sorted(n for n in shapes(fresh) if _is_head(n))
        dropped = sorted(n for n in shapes(source) if _is_head(n))
        print(f"init_heads reinit: loaded {len(loaded)} backbone parameters: {', '.join(sorted(loaded))}",
              flush=True)
        print(f"init_heads reinit: created {', '.join(created) or 'nothing'}", flush=True)
        print(f"init_heads reinit: dropped {', '.join(dropped) or 'nothing'}", flush=True)
    return params


def _check_architecture(where: str, source_cfg: Any, setup: Setup) -> None:
    """A decoder's and an encoder's params correspond (one stack; heads aside); an
    encoder-decoder's correspond to neither."""
    source, here = architecture(source_cfg), architecture(setup.cfg)
    if source != here and "encoder_decoder" in (source, here):
        raise UserError(f"{where} holds a model of architecture {source}, this run's is {here}: "
                        "their params do not correspond; start from a run of the same architecture")


def _check_tokenizer(where: str, source_cfg: Any, setup: Setup) -> None:
    if _tokenizer_identity(source_cfg.data.tokenizer) != _tokenizer_identity(setup.cfg.data.tokenizer):
        raise UserError(
            f"{where}: that run's tokenizer differs from data.tokenizer "
            f"({setup.cfg.data.tokenizer}); its embeddings would mean other text: use "
            f"data.tokenizer={source_cfg.data.tokenizer} as it did"
        )


def _check_matches(where: str, source_cfg: Any, source_setup: Setup, setup: Setup,
                   backbone_only: bool = False) -> None:
    source = shapes(source_setup.abstract["params"])
    target = shapes(setup.abstract["params"])
    if backbone_only:
        source = {k: v for k, v in source.items() if not _is_head(k)}
        target = {k: v for k, v in target.items() if not _is_head(k)}
    fix = "start from a matching run" if backbone_only else (
        "set init_heads=reinit to load only the backbone, or start from a matching run")
    for name in sorted(source.keys() - target.keys()):
        raise UserError(
            f"{where}: that run has parameter '{name}' this model lacks "
            f"(it trained objective {source_cfg.objective}); {fix}"
        )
    for name, shape in target.items():
        if name not in source:
            raise UserError(
                f"{where}: parameter '{name}' does not exist there "
                f"(that run trained objective {source_cfg.objective}); {fix}"
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
