"""The training loop, readable top to bottom: setup, resume, steps, logging, eval, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import yaml
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm.checkpoint import RUN_TOKENIZER, Checkpointer, init_params_from
from jaxlm.config import Config
from jaxlm.data import device_prefetch, open_split, train_pipeline
from jaxlm.errors import TrainingStopped, UserError
from jaxlm.evaluate import Evaluator
from jaxlm.flops import flops_per_token, mfu, peak_flops
from jaxlm.metrics import MetricsLog
from jaxlm.objectives import example_fn
from jaxlm.preemption import StopRequest
from jaxlm.resume import restore_newest_readable
from jaxlm.sharding import batch_shards, global_batch
from jaxlm.state import Setup, init_state, make_setup, make_train_step
from jaxlm.tokenizer import Tokenizer, load_tokenizer, sentencepiece_path


def resolve(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fills what the config leaves to the run and checks it.

    An unset vocab size is the tokenizer's rounded up to a multiple of 128, so the vocab axis splits
    over any tensor-parallel size and matmuls stay aligned (the extra ids are never produced).
    """
    vocab = cfg.model.vocab_size or -(-tokenizer.vocab_size // 128) * 128
    if vocab < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size ({vocab}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def prepare_run_dir(run_dir: Path) -> Path:
    """Creates the run directory and proves it writable before any work is done."""
    probe = run_dir / f".write-test-{jax.process_index()}-{os.getpid()}"  # processes share run_dir
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


def keep_tokenizer_copy(cfg: Config, run_dir: Path) -> None:
    """Copies a SentencePiece model into the run so its checkpoints are self-contained; a run
    resumed with a different model file is refused (its ids would mean other text)."""
    source = sentencepiece_path(cfg.data.tokenizer)
    if source is None:
        return
    copy = run_dir / RUN_TOKENIZER
    if not copy.exists():
        shutil.copyfile(source, copy.with_name(copy.name + ".tmp"))
        copy.with_name(copy.name + ".tmp").replace(copy)
    elif copy.read_bytes() != source.read_bytes():
        raise UserError(
            f"tokenizer {source} differs from the one this run was trained with ({copy}); "
            f"put that one back (cp {copy} {source}) or start a new train.run_dir"
        )


def check_batch_size(cfg: Config, setup: Setup) -> None:
    shards, processes = batch_shards(setup.batch_sharding), jax.process_count()
    accum = cfg.train.grad_accum_steps
    if cfg.train.batch_size % (shards * accum) or cfg.train.batch_size % processes:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the {shards} batch "
            f"shards of the mesh times train.grad_accum_steps ({accum}) and by the {processes} "
            "processes; change the batch size or train.grad_accum_steps"
        )


def train(
    cfg: Config,
    *,
    show_progress: bool = True,
    stop_at: int | None = None,
    force_resume: bool = False,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run `cfg` describes; returns the last eval metrics.

    `stop_at` ends this session early at that step with a checkpoint (time-sliced jobs); the next
    `train` of the same run continues exactly where it stopped. SIGTERM/SIGINT do the same at the
    step under way. `force_resume` accepts config changes that would alter the experiment.
    `devices` (default: all) lets a process train on part of its devices.
    """
    # ------------------------------------------------------------ setup
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, tokenizer)
    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(cfg.run_dir)
    if is_main:
        print(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), flush=True)
    setup = make_setup(cfg, devices)
    if is_main:
        keep_tokenizer_copy(cfg, run_dir)
    train_source = open_split(cfg.data, cfg.data.train_split)
    evaluator = Evaluator(setup, open_split(cfg.data, cfg.data.eval_split), tokenizer)
    check_batch_size(cfg, setup)

    def new_iterator():
        batches = train_pipeline(
            train_source,
            tokenizer,
            example_fn(cfg, tokenizer),
            seq_len=cfg.data.seq_len,
            global_batch=cfg.train.batch_size,
            seed=cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=cfg.data.worker_count,
        )
        place = functools.partial(global_batch, sharding=setup.batch_sharding)
        return iter(device_prefetch(batches, place, cfg.data.prefetch_batches))

    # ------------------------------------------------------------ fresh start or resume
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    start, state, train_iter = restore_newest_readable(
        checkpointer, setup, new_iterator, run_dir / "quarantine", force_resume
    )
    if state is None:
        state = init_state(setup)
        if cfg.init_from:
            state["params"] = init_params_from(cfg.init_from, setup)
            if is_main:
                print(f"initialized params from {cfg.init_from}", flush=True)
    elif is_main:
        print(f"resuming from step {start} in {checkpointer.directory}", flush=True)
    if is_main:
        config_lib.save_yaml(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main, resume_step=start,
                     tensorboard_dir=run_dir / "tensorboard")
    train_step = make_train_step(setup)

    # ------------------------------------------------------------ steps
    total = cfg.train.steps
    end = min(total, stop_at or total)
    bar = tqdm(total=total, initial=start, unit="step", disable=not (is_main and show_progress))
    pending = _PendingMetrics(cfg, checkpointer, last_saved=start, devices=setup.mesh.size)
    final_eval: dict[str, Any] = {}
    # XLA:CPU can deadlock when several multi-device steps with collectives are in flight at once;
    # CPU gains nothing from running ahead, so there each step is waited for.
    wait_each_step = jax.default_backend() == "cpu" and setup.mesh.size > 1
    try:
        with StopRequest() as stop:
            for step in range(start + 1, end + 1):
                batch = next(train_iter)  # already on the devices (data.prefetch_batches)
                state, metrics = train_step(state, batch)
                if wait_each_step:
                    jax.block_until_ready(metrics)
                pending.add(step, metrics)
                if step == start + 1:  # tokens/s and MFU leave out the compilation
                    pending.restart_clock(after=metrics)
                multi_host_stop = jax.process_count() > 1 and checkpointer.reached_preemption(step)
                interrupted = stop.requested or multi_host_stop
                save = step % cfg.checkpoint.every == 0 or step == end or interrupted
                if step % cfg.train.log_every == 0 or save:
                    # Between saves, leave the step just dispatched on the device: no stall.
                    records = pending.fetch(keep_newest=not save)
                    log.write(records)
                    pending.check_finite(records)
                    if records:
                        bar.set_postfix(loss=f"{records[-1]['loss']:.3f}",
                                        tok_s=f"{pending.tokens_per_s:,.0f}",
                                        mfu=f"{pending.mfu:.1%}", refresh=False)
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
                    final_eval = evaluator(state["params"], cfg.train.eval_batches)
                    log.write([{"step": step, **{f"eval_{k}": v for k, v in final_eval.items()}}])
                    bar.write(f"step {step}: eval loss {final_eval['loss']:.4f}, "
                              f"bits/byte {final_eval['bits_per_byte']:.4f}")
                    pending.restart_clock()
                if save:
                    _save(checkpointer, step, state, train_iter, cfg)
                    pending.last_saved = step
                bar.update(1)
                if interrupted:
                    bar.write(f"stopped at step {step} with a checkpoint; run the same command "
                              "to continue")
                    break
    finally:
        bar.close()
        checkpointer.close()  # waits for the last async save
        log.close()
        train_iter.close()  # stops the prefetch thread and grain's worker processes
    return final_eval


def _save(checkpointer: Checkpointer, step: int, state: Any, data_iter: Any, cfg: Config) -> None:
    try:
        checkpointer.save(step, state, data_iter, cfg)
    except OSError as err:
        raise TrainingStopped(
            f"writing checkpoint {step} failed ({err}); the run stopped and earlier checkpoints "
            f"in {checkpointer.directory} are intact"
        ) from None


class _PendingMetrics:
    """Per-step metrics still on the device, fetched in groups; checks for non-finite steps.

    Each group's last record also gets the tokens/s since the previous group (padding included)
    and the MFU that rate means (jaxlm.flops; on CPU the peak is measured here, once)."""

    def __init__(self, cfg: Config, checkpointer: Checkpointer, last_saved: int, devices: int):
        self.cfg, self.checkpointer, self.last_saved = cfg, checkpointer, last_saved
        self.steps: list[tuple[int, dict[str, jax.Array]]] = []
        self.nonfinite_streak = 0
        self.tokens_per_s = self.mfu = 0.0
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops, _ = peak_flops(cfg.model.compute_dtype, devices)
        self.restart_clock()

    def restart_clock(self, after: Any = None) -> None:
        """Counts time and steps from now on (`after`: once that step's result is ready)."""
        jax.block_until_ready(after)
        self._clock, self._clock_steps = time.perf_counter(), 0

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.steps.append((step, metrics))
        self._clock_steps += 1

    def fetch(self, keep_newest: bool) -> list[dict[str, Any]]:
        ready, self.steps = (self.steps[:-1], self.steps[-1:]) if keep_newest else (self.steps, [])
        records = [_record(step, m) for step, m in jax.device_get(ready)]
        if not self._clock_steps:  # only the (compiling) first step so far: no rate yet
            return records
        elapsed = max(time.perf_counter() - self._clock, 1e-9)
        tokens = self._clock_steps * self.cfg.train.batch_size * self.cfg.data.seq_len
        self.tokens_per_s = tokens / elapsed
        self.mfu = mfu(self.flops_per_token, self.tokens_per_s, self.peak_flops)
        self.restart_clock()
        if records:
            records[-1].update(tokens_per_s=self.tokens_per_s, mfu=self.mfu)
        return records

    def check_finite(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.nonfinite_streak = self.nonfinite_streak + 1 if record["nonfinite"] else 0
            if not self.nonfinite_streak:
                continue
            kept = (f"last good checkpoint: step {self.last_saved} in {self.checkpointer.directory}"
                    if self.last_saved else "no checkpoint was written")
            if self.cfg.train.on_nonfinite == "stop":
                raise TrainingStopped(
                    f"non-finite loss or gradient at step {record['step']}; {kept}, nothing after "
                    "it was saved; lower optimizer.learning_rate or set train.on_nonfinite=skip"
                )
            if self.nonfinite_streak >= self.cfg.train.max_consecutive_skips:
                raise TrainingStopped(
                    f"{self.nonfinite_streak} non-finite steps in a row up to step "
                    f"{record['step']} (all skipped); {kept}; lower optimizer.learning_rate"
                )


def _record(step: int, m: dict[str, Any]) -> dict[str, Any]:
    weight = max(float(m["weight_sum"]), 1.0)
    return {
        "step": step,
        "loss": float(m["loss_sum"]) / weight,
        "accuracy": float(m["correct_sum"]) / weight,
        "tokens": int(m["weight_sum"]),
        "grad_norm": float(m["grad_norm"]),
        "lr": float(m["lr"]),
        "nonfinite": bool(m["nonfinite"]),
    }
