"""`jaxlm inspect RUN`: one screen about a run, read without changing it: its model, objective,
tokenizer, the mesh it was trained on, its checkpoints, last metrics, tokens seen, wall time, and
whether `jaxlm train` would resume it cleanly with the config now on disk."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax

from jaxlm.checkpoint import Checkpointer, CheckpointDamaged
from jaxlm.config import Config, architecture, decoder_layers, encoder_layers, load_config
from jaxlm.data import dataset_manifest
from jaxlm.errors import UserError
from jaxlm.resume import resume_plan
from jaxlm.run import RunDir, read_only_checkpointer, resolve, run_path, saved_config
from jaxlm.sharding import fit_axes
from jaxlm.state import make_setup
from jaxlm.tokenizer import load_tokenizer


def inspect_run(run_dir: str, config: Path | None = None, overrides: list[str] = ()) -> list[str]:
    """The lines of the report; `config` (default: the run's config.yaml) is what a resume would
    be started with."""
    run = RunDir(run_path(run_dir))
    checkpointer = read_only_checkpointer(run)
    try:
        steps = sorted(checkpointer.all_steps())
        step, cfg, saved_mesh, unreadable = _newest_readable(checkpointer, run, steps)
        params = sum(math.prod(x.shape) for x in jax.tree.leaves(
            make_setup(cfg, jax.devices()[:1]).abstract["params"]))
        mesh = " x ".join(f"{k}={v}" for k, v in saved_mesh.items())
        sizes = ", ".join(f"{s} ({run.size(checkpointer.step_dir(s)) / 2**20:,.1f} MiB)" for s in steps)
        lines = [
            ("run", str(run.root)),
            ("model", f"{_architecture(cfg)}: {params:,} params"),
            ("objective", cfg.objective),
            ("tokenizer", _tokenizer(cfg)),
            ("mesh", f"trained on {mesh}"),
            ("checkpoints", sizes + (f"; unreadable: {unreadable}" if unreadable else "")),
            *_metrics_lines(run, cfg, step),
            ("resume", _resume_verdict(run, checkpointer, step, config, overrides)),
        ]
    finally:
        checkpointer.close()
    return [f"{key:<12} {value}" for key, value in lines]


def _newest_readable(checkpointer: Checkpointer, run: RunDir,
                     steps: list[int]) -> tuple[int, Config, dict[str, int], str]:
    """(step, config, saved mesh) of the newest checkpoint whose config and params metadata read,
    and which newer ones did not."""
    unreadable = []
    for step in reversed(steps):
        try:
            cfg = saved_config(checkpointer, run, step)
            return step, cfg, checkpointer.saved_mesh(step), ", ".join(unreadable)
        except CheckpointDamaged as err:
            unreadable.append(f"{step} ({err})")
    raise UserError(f"no checkpoint in {run.checkpoints} is readable ({'; '.join(unreadable)})")


def _architecture(cfg: Config) -> str:
    m = cfg.model
    layers = (f"encoder-decoder, {encoder_layers(m)} + {decoder_layers(m)} layers"
              if architecture(cfg) == "encoder_decoder" else f"{m.n_layers} layers")
    return (f"{layers}, d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff} ({m.mlp}), "
            f"vocab {m.vocab_size}, context {m.max_seq_len}, {m.compute_dtype} compute")


def _tokenizer(cfg: Config) -> str:
    return f"{cfg.data.tokenizer} ({load_tokenizer(cfg.data.tokenizer).vocab_size} ids)"


def _metrics_lines(run: RunDir, cfg: Config, step: int) -> list[tuple[str, str]]:
    records = run.read_metrics() if run.metrics.exists() else []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    times = [r["time"] for r in records if "time" in r]
    rows = cfg.train.batch_size * cfg.data.seq_len
    lines = [
        ("last train", _describe(train[-1], "") if train else "none logged"),
        ("last eval", _describe(evals[-1], "eval_") if evals else "none logged"),
        ("tokens seen", f"{step * rows:,} at checkpoint {step} ({cfg.train.batch_size} rows x "
                        f"{cfg.data.seq_len} tokens per step, padding included)"),
    ]
    if len(times) > 1:
        lines.append(("wall time", f"{(times[-1] - times[0]) / 60:,.1f} min from the first to the last "
                                   "metrics record (pauses between sessions included)"))
    return lines


def _describe(record: dict[str, Any], prefix: str) -> str:
    keys = ("loss", "accuracy", "bits_per_byte", "perplexity", "lr", "grad_norm", "tokens_per_s", "mfu")
    shown = [f"{k} {record[prefix + k]:.4g}" for k in keys if isinstance(record.get(prefix + k), float)]
    return f"step {record['step']}: " + ", ".join(shown)


def _resume_verdict(run: RunDir, checkpointer: Checkpointer, step: int, config: Path | None,
                    overrides: list[str]) -> str:
    """'yes' (with the accepted changes) or 'no: why', as `jaxlm train` would decide it."""
    source = config or run.config
    if not source.exists():
        return f"unknown: {source} is missing"
    try:
        cfg = load_config(source, overrides)
        cfg = resolve(cfg, load_tokenizer(cfg.data.tokenizer))
        accepted, _ = resume_plan(checkpointer, step, cfg, dataset_manifest(cfg.data, cfg.objective),
                                  force=False)
        _check_tokenizer(run, cfg)
        one_device = dataclasses.replace(cfg.mesh, axes=fit_axes(cfg.mesh.axes, 1))
        checkpointer.check_fits(step, make_setup(dataclasses.replace(cfg, mesh=one_device),
                                                 jax.devices()[:1]))
    except (UserError, CheckpointDamaged) as err:
        return f"no: {err}"
    notes = [c for c in accepted if not c.startswith(("train.run_dir", "mesh."))]
    return f"yes, from step {step} with {source}" + (f" (accepted: {'; '.join(notes)})" if notes else "")


def _check_tokenizer(run: RunDir, cfg: Config) -> None:
    differs = run.tokenizer_mismatch(cfg.data.tokenizer)
    if differs:
        raise UserError(differs)

