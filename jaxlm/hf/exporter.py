"""`jaxlm export`: a run's checkpoint -> a Hugging Face model directory that
`AutoModelForCausalLM` / `AutoModelForMaskedLM.from_pretrained` loads with no missing or
unexpected weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxlm.config import Config
from jaxlm.errors import UserError
from jaxlm.hf.convert import VOCAB_AXIS, expand, family_for_run, staged_output
from jaxlm.hf.importer import TOKENIZER_FILES, _flat
from jaxlm.hf.safetensors_io import ShardedWriter
from jaxlm.tokenizer import load_tokenizer

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def exported_vocab(model_vocab: int, tokenizer_vocab: int) -> int:
    """Rows kept: the tokenizer's ids when the model's vocab is the tokenizer's rounded up to a
    multiple of 128 (jaxlm's padding), else all of them (an imported model's own size)."""
    padded = -(-tokenizer_vocab // 128) * 128
    return tokenizer_vocab if model_vocab == padded else model_vocab


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id}


def export_run(run_dir: Path, step: int | None, out: Path, dtype: str,
               max_shard_bytes: int) -> Path:
    """Writes HF model directory `out` from checkpoint `step` (default: latest) of `run_dir`;
    nothing appears at `out` unless all of it succeeded."""
    from jaxlm.run import load_run

    with staged_output(out, "exporting") as staging:
        cfg, _, params, step = load_run(run_dir, step, devices=jax.devices()[:1], host=True)
        params = _flat(params)  # the only reference: each array is freed once written
        family = family_for_run(cfg.model, cfg.objective)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        vocab = exported_vocab(cfg.model.vocab_size, tokenizer.vocab_size)
        _write_tensors(cfg, params, vocab, DTYPES[dtype], ShardedWriter(staging, max_shard_bytes))
        hf_config = {**family.config_to_hf(cfg.model, cfg.objective), "vocab_size": vocab,
                     "dtype": dtype, **_special_ids(tokenizer)}
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        generation = {**_special_ids(tokenizer), "_from_model_config": True}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for name in TOKENIZER_FILES:
            if (run_dir / name).exists():
                shutil.copyfile(run_dir / name, staging / name)
    return out


def _write_tensors(cfg: Config, arrays: dict[str, np.ndarray], vocab: int, dtype: Any,
                   writer: ShardedWriter) -> None:
    """Each rule's params (host arrays, popped from `arrays` so they are freed once written),
    padded vocab rows cut, converted per layer, cast and streamed to the files."""
    family = family_for_run(cfg.model, cfg.objective)
    for r in family.table(cfg.model, cfg.objective):
        host = [_cut_vocab(p, arrays.pop(p), vocab) for p in r.params]
        for _, layer in expand([r], cfg.model.n_layers):
            pieces = host if layer is None else [a[layer] for a in host]
            for name, tensor in zip(r.hf_names(layer), r.transform.to_hf(*pieces)):
                writer.add(name, tensor.astype(dtype, copy=False))
    writer.close()
    if arrays:
        raise UserError(f"{family.model_type} has no tensor for jaxlm param {sorted(arrays)[0]}")


def _cut_vocab(param: str, array: np.ndarray, vocab: int) -> np.ndarray:
    """A view without the padded vocabulary rows."""
    if param not in VOCAB_AXIS:
        return array
    return array[:vocab] if VOCAB_AXIS[param] == 0 else array[:, :vocab]
