"""The training loop, readable top to bottom: setup, resume, steps, logging, eval, checkpoints."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import jax
import yaml
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, target_length
from jaxlm.data import (dataset_manifest, device_prefetch, label_names, open_split,
                        stream_cache_key, train_pipeline)
from jaxlm.errors import TrainingStopped
from jaxlm.evaluate import Evaluator
from jaxlm.flops import flops_per_token, mfu, peak_flops
from jaxlm.metrics import MetricsLog
from jaxlm.objectives import example_fn, record_encoder, row_length
from jaxlm.preemption import StopRequest
from jaxlm.resume import initial_state
from jaxlm.run import RunDir, RunLock, open_run, run_path, warn
from jaxlm.sharding import global_batch
from jaxlm.state import check_batch_size, make_train_step


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
    step under way (during setup they stop at once). `force_resume` accepts config changes that
    would alter the experiment. `devices` (default: all) lets a process train on part of its devices.
    """
    run = RunDir(run_path(cfg.train.run_dir or cfg.run_dir))
    with StopRequest() as stop, contextlib.ExitStack() as cleanup:
        run.prepare()
        cleanup.enter_context(RunLock(run))
        job = _start(cfg, run, devices, force_resume, cleanup)
        end = min(job.cfg.train.steps, stop_at or job.cfg.train.steps)
        if job.start >= end:
            if jax.process_index() == 0:
                print(f"already at step {job.start} (train.steps {job.cfg.train.steps}"
                      f"{f', --stop-at {stop_at}' if stop_at else ''}); nothing to do", flush=True)
            return {}
        _open_logs(job, run, cleanup)
        stop.setup_done()
        return _steps(job, end, stop, show_progress and jax.process_index() == 0, cleanup)


class _Job:
    """What the steps need, built once by `_start`."""

    def __init__(self, **parts: Any):
        self.__dict__.update(parts)


def _start(cfg: Config, run: RunDir, devices: list[jax.Device] | None, force_resume: bool,
           cleanup: contextlib.ExitStack) -> _Job:
    """Setup: config, data, the state to start from (fresh, resumed or init_from), the logs."""
    cfg, tokenizer, setup = open_run(cfg, devices)
    is_main = jax.process_index() == 0
    if is_main:
        print(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), flush=True)
        run.keep_tokenizer(cfg)
        if cfg.objective == "classify":
            run.keep_labels(label_names(cfg.data))
    train_source = open_split(cfg.data, cfg.data.train_split, cfg.objective)
    evaluator = Evaluator(setup, open_split(cfg.data, cfg.data.eval_split, cfg.objective), tokenizer,
                          run.read_labels(cfg.model.num_labels))
    check_batch_size(cfg, setup)

    def new_iterator():
        batches = train_pipeline(
            train_source,
            tokenizer,
            example_fn(cfg, tokenizer, train_source),
            seq_len=row_length(cfg),
            global_batch=cfg.train.batch_size,
            seed=cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=cfg.data.worker_count,
            encoder=record_encoder(cfg, tokenizer),
            cache_dir=cfg.data.cache_dir,
            cache_key=stream_cache_key(train_source, cfg.data.tokenizer),
        )
        place = functools.partial(global_batch, sharding=setup.batch_sharding)
        return iter(device_prefetch(batches, place, cfg.data.prefetch_batches))

    checkpointer = Checkpointer(run.checkpoints, cfg.checkpoint)
    cleanup.callback(checkpointer.close)  # waits for the last async save
    dataset = dataset_manifest(cfg.data, cfg.objective)
    log = warn if is_main else (lambda message: None)
    start, state, train_iter, resumed = initial_state(run, checkpointer, setup, new_iterator, dataset,
                                             force_resume, log)
    cleanup.callback(train_iter.close)  # stops the prefetch thread and grain's worker processes
    if is_main and (resumed or cfg.init_from):
        print(f"resuming from step {start} in {checkpointer.directory}" if resumed
              else f"initialized params from {cfg.init_from}", flush=True)
    return _Job(cfg=cfg, run=run, setup=setup, evaluator=evaluator, checkpointer=checkpointer,
                dataset=dataset, start=start, state=state, train_iter=train_iter)


def _open_logs(job: _Job, run: RunDir, cleanup: contextlib.ExitStack) -> None:
    """The config and metrics of a start that will train (after its restore succeeded)."""
    is_main = jax.process_index() == 0
    if is_main:
        run.write_config(job.cfg)
    job.metrics = MetricsLog(run.metrics, enabled=is_main, resume_step=job.start,
                             tensorboard_dir=run.tensorboard)
    cleanup.callback(job.metrics.close)


def _steps(job: _Job, end: int, stop: StopRequest, show_progress: bool,
           cleanup: contextlib.ExitStack) -> dict[str, Any]:
    cfg, state, log, checkpointer = job.cfg, job.state, job.metrics, job.checkpointer
    total = cfg.train.steps
    bar = cleanup.enter_context(tqdm(total=total, initial=job.start, unit="step",
                                     disable=not show_progress))
    train_step = make_train_step(job.setup)
    trace = _Trace(cfg.train.profile_steps, job.run, cleanup)
    pending = _PendingMetrics(cfg, checkpointer, last_saved=job.start, devices=job.setup.mesh.size)
    final_eval: dict[str, Any] = {}
    # XLA:CPU can deadlock when several multi-device steps with collectives are in flight at once;
    # CPU gains nothing from running ahead, so there each step is waited for.
    wait_each_step = jax.default_backend() == "cpu" and job.setup.mesh.size > 1
    for step in range(job.start + 1, end + 1):
        trace.before(step)
        batch = next(job.train_iter)  # already on the devices (data.prefetch_batches)
        state, metrics = train_step(state, batch)
        if wait_each_step:
            jax.block_until_ready(metrics)
        trace.after(step, metrics)
        pending.add(step, metrics)
        if step == job.start + 1:  # tokens/s and MFU leave out the compilation
            pending.restart_clock(after=metrics)
        checkpointer.check_saves()  # a background save that failed stops the run here
        interrupted = stop.requested or (
            jax.process_count() > 1 and checkpointer.reached_preemption(step))  # all agree
        save = step % cfg.checkpoint.every == 0 or step == end or interrupted
        if step % cfg.train.log_every == 0 or save:
            # Between saves, leave the step just dispatched on the device: no stall.
            records = pending.fetch(keep_newest=not save)
            log.write(records)
            pending.check_finite(records)
            if records:
                bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", tok_s=f"{pending.tokens_per_s:,.0f}",
                                mfu=f"{pending.mfu:.1%}", refresh=False)
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
            final_eval = job.evaluator(state["params"], cfg.train.eval_batches)
            log.write([{"step": step, **{f"eval_{k}": v for k, v in final_eval.items()},
                        "time": time.time()}])
            if jax.process_index() == 0:
                job.run.draw_curves(warn)
            measure = (f"bits/byte {final_eval['bits_per_byte']:.4f}" if "bits_per_byte" in final_eval
                       else f"accuracy {final_eval['accuracy']:.4f}")  # classify
            bar.write(f"step {step}: eval loss {final_eval['loss']:.4f}, {measure}")
            pending.restart_clock()
            interrupted = interrupted or stop.requested  # a signal that arrived during eval
            save = save or interrupted
        if save:
            checkpointer.save(step, state, job.train_iter, cfg, job.dataset)
            pending.last_saved = step
        bar.update(1)
        if interrupted:
            bar.write(f"stopped at step {step} with a checkpoint; run the same command to continue")
            break
    return final_eval


class _Trace:
    """train.profile_steps [first, last]: a jax.profiler trace of those steps (from fetching the
    first's batch to the last's result) in <run_dir>/profile/. Outside the jitted step: off, it
    costs nothing."""

    def __init__(self, steps: tuple[int, ...], run: RunDir, cleanup: contextlib.ExitStack):
        self.first, self.last = steps or (0, 0)
        self.directory, self.cleanup, self.tracing = run.profile, cleanup, False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True
            self.cleanup.callback(self._stop)  # a run stopped inside the range keeps its trace

    def after(self, step: int, metrics: Any) -> None:
        if step == self.last and self.tracing:
            jax.block_until_ready(metrics)
            self._stop()
            if jax.process_index() == 0:
                print(f"profile of steps {self.first}-{self.last} written to {self.directory}",
                      flush=True)

    def _stop(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()


class _PendingMetrics:
    """Per-step metrics still on the device, fetched in groups; checks for non-finite steps.

    Each group's last record also gets the tokens/s since the previous group (padding included)
    and the MFU that rate means (jaxlm.flops; on CPU the peak is measured here, once)."""

    def __init__(self, cfg: Config, checkpointer: Checkpointer, last_saved: int, devices: int):
        self.cfg, self.checkpointer, self.last_saved = cfg, checkpointer, last_saved
        self.steps: list[tuple[int, dict[str, jax.Array]]] = []
        self.nonfinite_streak = 0
        self.tokens_per_s = self.mfu = 0.0
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, target_length(cfg))
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
        **_nsp_record(m),
        "time": time.time(),  # when fetched (wall time of the run: `jaxlm inspect`)
    }


def _nsp_record(m: dict[str, Any]) -> dict[str, float]:
    """Next-sentence loss and accuracy, where the objective has them (mlm with data.nsp)."""
    if "nsp_weight_sum" not in m:
        return {}
    pairs = max(float(m["nsp_weight_sum"]), 1.0)
    return {"nsp_loss": float(m["nsp_loss_sum"]) / pairs, "nsp_accuracy": float(m["nsp_correct_sum"]) / pairs}
