"""The run directory: its layout, the one job allowed to write it, its history, and opening a run
for training (`open_run`) or for reading a checkpoint (`load_run`: eval, generate, fill-mask).

Layout of `<run_dir>`:
  config.yaml            resolved config of the latest start (also inside every checkpoint)
  tokenizer.model        the run's copy of a SentencePiece model (self-contained checkpoints)
  tokenizer.json         ... or of a Hugging Face tokenizer (with its tokenizer_config.json /
                         special_tokens_map.json, if it has them)
  labels.json            classify: the class names by id
  metrics.jsonl          one JSON record per logged step and per eval
  metrics.<time>.jsonl   history of an earlier start that restored no checkpoint, kept aside
  tensorboard/           the same scalars as TensorBoard events (tensorboard.<time>/ kept aside)
  checkpoints/<step>/    Orbax checkpoints
  quarantine/<step>-<time>/  unreadable checkpoints, moved aside, never deleted
  .lock                  held (flock) by process 0 of the job training this run
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import yaml
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer, CheckpointDamaged
from jaxlm.config import CheckpointConfig, Config
from jaxlm.data import label_names
from jaxlm.errors import UserError
from jaxlm.state import Setup, make_setup
from jaxlm.tokenizer import (HF_PREFIX, Tokenizer, load_tokenizer, spec_for_copy, tokenizer_file,
                             tokenizer_files)

Log = Callable[[str], None]


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths of one run directory and the file operations that keep them consistent."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def tokenizer_copy(self, spec: str) -> Path | None:
        """Where the run keeps its copy of tokenizer `spec`'s file (None: bytes needs none)."""
        source = tokenizer_file(spec)
        if source is None:
            return None
        return self.root / ("tokenizer.json" if spec.startswith(HF_PREFIX) else "tokenizer.model")

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def prepare(self) -> None:
        """Creates the directory and proves it writable before any work is done."""
        probe = self.root / f".write-test-{jax.process_index()}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(
                f"run directory {self.root} is not writable ({err.strerror}); "
                "choose another with --set train.run_dir=PATH"
            ) from None

    def write_config(self, cfg: Config) -> None:
        _write_atomically(self.config, yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False).encode())

    def keep_tokenizer(self, cfg: Config) -> None:
        """Copies the tokenizer's files into the run so its checkpoints are self-contained; a run
        resumed with a different tokenizer is refused (its ids would mean other text)."""
        sources = tokenizer_files(cfg.data.tokenizer)
        if not sources:
            return
        copy = self.tokenizer_copy(cfg.data.tokenizer)
        copies = [copy, *(self.root / extra.name for extra in sources[1:])]  # hf: configs beside it
        if not copy.exists():
            for source, target in zip(sources, copies):
                _write_atomically(target, source.read_bytes())
            return
        for source, target in zip(sources, copies):
            if not target.exists() or target.read_bytes() != source.read_bytes():
                raise UserError(
                    f"tokenizer file {source} differs from the one this run was trained with "
                    f"({target}); put that one back (cp {target} {source}) or start a new "
                    "train.run_dir"
                )

    def keep_labels(self, names: list[str]) -> None:
        """Saves a classifier's class names by id; a resume whose data numbers them otherwise is
        refused (the head's outputs would mean other classes)."""
        if not self.labels.exists():
            _write_atomically(self.labels, json.dumps(names).encode())
        elif self.read_labels() != names:
            raise UserError(f"the labels of the data ({names}) differ from the ones this run was "
                            f"trained with ({self.read_labels()}); start a new train.run_dir")

    def read_labels(self, count: int | None = None) -> list[str]:
        """The class names by id (their ids as names where the run saved none)."""
        if self.labels.exists():
            return json.loads(self.labels.read_text())
        return [str(i) for i in range(count or 0)]

    def set_history_aside(self, log: Log) -> None:
        """A start from step 0 keeps earlier metrics and events under a timestamped name."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for path, kept in ((self.metrics, self.root / f"metrics.{stamp}.jsonl"),
                           (self.tensorboard, self.root / f"tensorboard.{stamp}")):
            if path.exists() and (path.is_dir() or path.stat().st_size):
                path.rename(kept)
                moved.append(kept.name)
        if moved:
            log(f"no checkpoint was restored: the earlier history is kept as {' and '.join(moved)}")


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    partial.replace(path)


class RunLock:
    """One job at a time writes a run: process 0 holds an exclusive flock on `<run>/.lock` (the
    kernel drops it when the process dies, so a killed run's lock is free at once) and tells the
    other processes of its job whether it got it. The holder's host and pid are in the file."""

    def __init__(self, run: RunDir):
        self.run, self._file = run, None

    def __enter__(self) -> "RunLock":
        holder = self._take() if jax.process_index() == 0 else ""
        refused = bool(holder)
        if jax.process_count() > 1:
            refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
        if refused:
            raise UserError(
                f"run directory {self.run.root} is in use by {holder or 'another job'}; wait for "
                "it to end (or stop it), or choose another train.run_dir"
            )
        return self

    def _take(self) -> str:
        """'' once the lock is held here, else a description of its holder."""
        lock = open(self.run.lock, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = _holder(lock.read())
            lock.close()
            return holder
        lock.truncate(0)
        lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        lock.flush()
        self._file = lock
        return ""

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process"


# ---------------------------------------------------------------- opening a run


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
    labels = cfg.model.num_labels
    if cfg.objective == "classify":
        names = label_names(cfg.data)
        labels = labels or len(names)
        if labels < len(names):
            raise UserError(f"model.num_labels ({labels}) is smaller than the {len(names)} labels "
                            "of the data; raise it or leave it null")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab,
                                                              num_labels=labels))


def open_run(cfg: Config, devices: list[jax.Device] | None = None) -> tuple[Config, Tokenizer, Setup]:
    """The resolved config, its tokenizer and the state layout on `devices` (default: all)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, tokenizer)
    return cfg, tokenizer, make_setup(cfg, devices)


def read_only_checkpointer(run: RunDir) -> Checkpointer:
    """A checkpointer that reads a run without changing it; a run without checkpoints is refused."""
    if not run.checkpoints.is_dir():
        raise UserError(f"{run.root} holds no checkpoints; pass the run_dir of a `jaxlm train` run")
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns that read-only is read-only
    checkpointer = Checkpointer(run.checkpoints, CheckpointConfig(), read_only=True)
    if not checkpointer.all_steps():
        raise UserError(f"{run.checkpoints} holds no complete checkpoint yet")
    return checkpointer


def saved_config(checkpointer: Checkpointer, run: RunDir, step: int, overrides: list[str] = (),
                 mesh_from_saved: bool = False) -> Config:
    """The config a checkpoint was trained with, its tokenizer the run's own copy; the mesh is
    data-parallel over the devices here unless `mesh_from_saved`."""
    raw = checkpointer.restore_config_dict(step)
    if not mesh_from_saved:
        raw["mesh"]["axes"] = {name: 1 for name in raw["mesh"]["axes"]} | {"data": -1}
    copy = run.tokenizer_copy(raw["data"]["tokenizer"])
    if copy is not None and copy.exists():
        raw["data"]["tokenizer"] = spec_for_copy(raw["data"]["tokenizer"], copy)
    for assignment in overrides:
        config_lib.apply_override(raw, assignment)
    cfg = config_lib.from_dict(Config, raw)
    config_lib.validate(cfg)
    tokenizer_vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    if tokenizer_vocab > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {cfg.data.tokenizer} has {tokenizer_vocab} ids but the checkpoint in "
            f"{run.root} has model.vocab_size {cfg.model.vocab_size}; use the run's own tokenizer"
        )
    return cfg


def load_run(
    run_dir: Path,
    step: int | None = None,
    overrides: list[str] = (),
    devices: list[jax.Device] | None = None,
    log: Log = warn,
    host: bool = False,
) -> tuple[Config, Setup, Any, int]:
    """Config, setup and params of a run's checkpoint (default: the newest readable one, with a
    warning for each unreadable one skipped; nothing is moved), laid out data-parallel on
    `devices` (default: all), since the run's own mesh may not fit here (`host`: as numpy arrays,
    placed on no device)."""
    run = RunDir(Path(run_dir))
    checkpointer = read_only_checkpointer(run)
    steps = sorted(checkpointer.all_steps(), reverse=True)
    if step is not None and step not in steps:
        raise UserError(f"{run.root} has no checkpoint at step {step}; it has {sorted(steps)}")
    try:
        for candidate in [step] if step is not None else steps:
            try:
                cfg = saved_config(checkpointer, run, candidate, overrides)
                setup = make_setup(cfg, devices)
                return cfg, setup, checkpointer.restore_params(candidate, setup, host), candidate
            except CheckpointDamaged as err:
                if step is not None:
                    raise UserError(f"checkpoint {step} in {run.checkpoints} is unreadable ({err}); "
                                    f"choose another --step (it has {sorted(steps)})") from None
                log(f"warning: checkpoint {candidate} is unreadable ({err}); trying the previous one")
        raise UserError(f"no checkpoint in {run.checkpoints} is readable; train the run again")
    finally:
        checkpointer.close()
