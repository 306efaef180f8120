"""The training loop, readable top to bottom: setup, resume, steps, logging, eval, checkpoints."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import yaml
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config
from jaxlm.data import make_pipeline, open_split
from jaxlm.errors import UserError
from jaxlm.evaluate import Evaluator
from jaxlm.metrics import MetricsLog
from jaxlm.objectives import example_fn
from jaxlm.sharding import batch_shards, global_batch
from jaxlm.state import Setup, init_state, make_setup, make_train_step
from jaxlm.tokenizer import Tokenizer, load_tokenizer


def resolve(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fills what the config leaves to the run (vocab size from the tokenizer) and checks it."""
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size ({vocab}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def prepare_run_dir(run_dir: Path) -> Path:
    """Creates the run directory and proves it writable before any work is done."""
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"run directory {run_dir} is not writable ({err.strerror}); "
            "choose another with --set train.run_dir=PATH"
        ) from None
    return run_dir


def local_batch_size(cfg: Config, setup: Setup) -> int:
    shards, processes = batch_shards(setup.batch_sharding), jax.process_count()
    if cfg.train.batch_size % shards or cfg.train.batch_size % processes:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the {shards} batch "
            f"shards of the mesh and the {processes} processes"
        )
    return cfg.train.batch_size // processes


def train(cfg: Config, *, show_progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run `cfg` describes; returns the last eval metrics.

    `stop_at` ends this session early at that step with a checkpoint (time-sliced jobs); the next
    `train` of the same run continues exactly where it stopped.
    """
    # ------------------------------------------------------------ setup
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, tokenizer)
    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(cfg.run_dir)
    if is_main:
        print(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), flush=True)
    setup = make_setup(cfg)
    train_source = open_split(cfg.data, cfg.data.train_split)
    evaluator = Evaluator(setup, open_split(cfg.data, cfg.data.eval_split), tokenizer)
    train_iter = iter(
        make_pipeline(
            train_source,
            tokenizer,
            example_fn(cfg.objective),
            seq_len=cfg.data.seq_len,
            local_batch=local_batch_size(cfg, setup),
            seed=cfg.seed,
            train=True,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )

    # ------------------------------------------------------------ fresh start or resume
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    start = checkpointer.latest_step() or 0
    if start:
        state = checkpointer.restore(start, setup, train_iter)
        if is_main:
            print(f"resuming from step {start} in {checkpointer.directory}", flush=True)
    else:
        state = init_state(setup)
    if is_main:
        config_lib.save_yaml(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main, resume_step=start)
    train_step = make_train_step(setup)

    # ------------------------------------------------------------ steps
    total = cfg.train.steps
    end = min(total, stop_at or total)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    bar = tqdm(total=total, initial=start, unit="step", disable=not (is_main and show_progress))
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window_start, window_steps = time.perf_counter(), 0
    final_eval: dict[str, Any] = {}
    for step in range(start + 1, end + 1):
        batch = global_batch(next(train_iter), setup.batch_sharding)
        state, metrics = train_step(state, batch)
        pending.append((step, metrics))
        window_steps += 1
        last = step == end
        if step % cfg.train.log_every == 0 or last:
            # Fetch every step but the one just dispatched, so the device never waits on the host.
            ready, pending = (pending, []) if last else (pending[:-1], pending[-1:])
            records = _step_records(jax.device_get(ready))
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
            window_start, window_steps = time.perf_counter(), 0
            if records:
                records[-1]["tokens_per_s"] = tokens_per_s
                bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            log.write(records)
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
            final_eval = evaluator(state["params"], cfg.train.eval_batches)
            log.write([{"step": step, **{f"eval_{k}": v for k, v in final_eval.items()}}])
            bar.write(f"step {step}: eval loss {final_eval['loss']:.4f}, "
                      f"bits/byte {final_eval['bits_per_byte']:.4f}")
            window_start = time.perf_counter()
        if step % cfg.checkpoint.every == 0 or last:
            checkpointer.save(step, state, train_iter, cfg)
        bar.update(1)
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    return final_eval


def _step_records(ready: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    records = []
    for step, m in ready:
        weight = max(float(m["weight_sum"]), 1.0)
        records.append(
            {
                "step": step,
                "loss": float(m["loss_sum"]) / weight,
                "accuracy": float(m["correct_sum"]) / weight,
                "tokens": int(m["weight_sum"]),
                "grad_norm": float(m["grad_norm"]),
                "lr": float(m["lr"]),
            }
        )
    return records
