"""HF checkpoint -> jaxlm params, laid out straight into their mesh shards (`init_from: hf:DIR`),
and `jaxlm import`: a run directory whose step-0 checkpoint holds them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from jaxlm.config import (CheckpointConfig, Config, DataConfig, ModelConfig, TrainConfig,
                          save_yaml)
from jaxlm.config_checks import validate
from jaxlm.errors import UserError
from jaxlm.hf.convert import Family, check_names, expand, family_for_hf, staged_output
from jaxlm.hf.safetensors_io import HfTensors
from jaxlm.state import Setup, make_setup
from jaxlm.tokenizer import ByteTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
# Keys that change no param: the numerics, dropout (training only), the layer loop's form.
PARAMS_ALIKE = ("compute_dtype", "param_dtype", "attention", "dropout", "scan_layers")
# Keys only a task head depends on (init_heads: reinit creates that head fresh).
HEAD_ONLY = ("num_labels",)


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}; name a Hugging Face model "
                        "directory (config.json + safetensors) for --hf or init_from=hf:DIR") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def hf_model_config(hf: dict[str, Any], objective: str | None) -> tuple[Family, ModelConfig, str]:
    """The family, jaxlm model config and objective (default: the family's) of a HF config."""
    family = family_for_hf(hf)
    objective = objective or family.objectives[0]
    if objective not in family.objectives:
        raise UserError(f"a {family.model_type} checkpoint has no {objective} head; its "
                        f"objective is {family.objectives[0]}")
    return family, ModelConfig(**family.config_from_hf(hf, objective)), objective


def params_from_hf(directory: Path, setup: Setup) -> Any:
    """The params of HF checkpoint `directory` for `setup` (pretrained HF -> fine-tune here).

    The HF model must be the one `setup.cfg.model` describes (as `jaxlm import` writes it); the
    first key that differs is named in the error."""
    hf = read_hf_config(directory)
    family = family_for_hf(hf)
    if setup.cfg.objective not in family.objectives:
        raise UserError(f"init_from hf:{directory}: a {family.model_type} checkpoint has no "
                        f"{setup.cfg.objective} head; set init_heads=reinit to load its backbone "
                        "and create the head fresh")
    family, model, objective = hf_model_config(hf, setup.cfg.objective)
    _check_model(directory, model, setup.cfg.model)
    return load_params(directory, family, objective, setup)


def hf_source(directory: Path, setup: Setup) -> tuple[Config, Setup, Any]:
    """For `init_heads: reinit`: the HF model's config (its own objective and heads, this run's
    numerics), a setup of it on `setup`'s devices and its params there."""
    hf = read_hf_config(directory)
    family = family_for_hf(hf)
    ours = setup.cfg.objective if setup.cfg.objective in family.objectives else None
    family, model, objective = hf_model_config(hf, ours)
    _check_model(directory, model, setup.cfg.model, heads=True)
    model = dataclasses.replace(model, **{k: getattr(setup.cfg.model, k) for k in PARAMS_ALIKE})
    source_cfg = dataclasses.replace(setup.cfg, objective=objective, model=model,
                                     data=dataclasses.replace(setup.cfg.data, nsp=False))
    source_setup = make_setup(source_cfg, list(setup.mesh.devices.flat))
    return source_cfg, source_setup, load_params(directory, family, objective, source_setup)


def _check_model(directory: Path, theirs: ModelConfig, ours: ModelConfig, heads: bool = False) -> None:
    """Refuses a HF model whose backbone differs from `ours` (`heads`: the task head may too)."""
    for key in (f.name for f in dataclasses.fields(ModelConfig)):
        mine, hf = getattr(ours, key), getattr(theirs, key)
        rope_window = key == "max_seq_len" and theirs.position_embedding == "rope"
        head_only = heads and key in HEAD_ONLY
        if mine != hf and key not in PARAMS_ALIKE and not rope_window and not head_only:
            raise UserError(f"init_from hf:{directory}: model.{key} is {hf!r} there but "
                            f"{mine!r} here; use the model section `jaxlm import` writes")


def converted(directory: Path, family: Family, objective: str, model: ModelConfig,
              targets: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(param, host array) for every param in `targets` (dotted name -> shape/dtype), converted
    from the HF tensors one rule at a time: only that rule's tensors are on the host at once."""
    tensors = HfTensors(directory)
    tensors.add_prefix(family.base_prefix)
    rules = family.table(model, objective)
    check_names(family, rules, model.n_layers, tensors.names())
    for r in rules:
        host = {p: np.empty(targets[p].shape, targets[p].dtype) for p in r.params}
        for _, layer in expand([r], model.n_layers):
            arrays = r.transform.to_jax(*(tensors.get(n) for n in r.hf_names(layer)))
            for param, array in zip(r.params, arrays):
                slot = host[param] if layer is None else host[param][layer]
                if array.shape != slot.shape:
                    raise UserError(f"tensor {r.hf_names(layer)[0]} gives shape {array.shape} "
                                    f"for {param}, which the config makes {slot.shape}")
                slot[...] = array
        yield from host.items()


def load_params(directory: Path, family: Family, objective: str, setup: Setup) -> Any:
    """The params on `setup`'s mesh, each placed shard by shard as soon as it is converted."""
    targets = _flat(setup.abstract_sharded("params"))
    placed = {}
    for param, array in converted(directory, family, objective, setup.cfg.model, targets):
        placed[param] = jax.block_until_ready(jax.make_array_from_callback(
            targets[param].shape, targets[param].sharding, lambda index, a=array: a[index]))
    return _as_params(setup, placed)


def _as_params(setup: Setup, leaves: dict[str, Any]) -> Any:
    """`leaves` (dotted name -> array) in the structure of `setup`'s params."""
    unfilled = _flat(setup.abstract["params"]).keys() - leaves.keys()
    if unfilled:
        raise UserError(f"no HF tensor maps to jaxlm param {sorted(unfilled)[0]}")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: leaves[_dotted(path)], setup.abstract_sharded("params"))


def _dotted(path: tuple) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return ".".join(n for n in names if n != "value")  # nnx.Variable.value


def _flat(tree: Any) -> dict[str, Any]:
    return {_dotted(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def import_hf(directory: Path, out: Path, objective: str | None = None) -> Config:
    """Writes run directory `out` (config.yaml, tokenizer files, a params-only step-0 checkpoint)
    from HF model `directory`; nothing appears at `out` unless all of it succeeded."""
    from jaxlm.checkpoint import Checkpointer

    family, model, objective = hf_model_config(read_hf_config(directory), objective)
    out = out.absolute()
    if (directory / "tokenizer.json").exists():
        tokenizer = f"hf:{out / 'tokenizer.json'}"
    elif model.vocab_size >= ByteTokenizer.vocab_size:
        tokenizer = "bytes"
    else:
        raise UserError(f"{directory} has no tokenizer.json and its vocab_size {model.vocab_size} "
                        f"is below the byte tokenizer's {ByteTokenizer.vocab_size}")
    cfg = Config(name=out.name, objective=objective, model=model,
                 data=DataConfig(tokenizer=tokenizer, seq_len=min(256, model.max_seq_len)),
                 train=TrainConfig(run_dir=str(out)))
    validate(cfg)
    # On one device: each param moves there as soon as it is converted and its host copy is
    # freed; Orbax encodes one param at a time. Any mesh restores it.
    with staged_output(out, "importing") as staging:
        params = load_params(directory, family, objective, make_setup(cfg, jax.devices()[:1]))
        largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
        checkpointer = Checkpointer(staging / "checkpoints", CheckpointConfig(async_save=False),
                                    params_write_bytes=largest)
        try:  # closed even when interrupted: Orbax's threads finish before staging is removed
            checkpointer.save(0, {"params": params}, None, cfg)
        finally:
            checkpointer.close()
        for name in TOKENIZER_FILES:
            if (directory / name).exists():
                shutil.copyfile(directory / name, staging / name)
        save_yaml(cfg, staging / "config.yaml")
    return cfg
