"""The run directory: its layout, the one job allowed to write it, its history, and opening a run
for training (`open_run`) or for reading a checkpoint (`load_run`: eval, generate, fill-mask).

Layout of `<run_dir>`:
  config.yaml            resolved config of the latest start (also inside every checkpoint)
  tokenizer.model        the run's copy of a SentencePiece model (self-contained checkpoints)
  tokenizer.json         ... or of a Hugging Face tokenizer (with its tokenizer_config.json /
                         special_tokens_map.json, if it has them)
  labels.json            classify: the class names by id
  metrics.jsonl          one JSON record per logged step and per eval
  curves.png             train/eval loss, learning rate and tokens/s against step, redrawn at each eval
  metrics.<time>.jsonl   history of an earlier start that restored no checkpoint, kept aside
  tensorboard/           the same scalars as TensorBoard events (tensorboard.<time>/ kept aside)
  profile/               train.profile_steps: jax.profiler traces (plugins/profile/<time>/)
  checkpoints/<step>/    Orbax checkpoints
  quarantine/<step>-<time>/  unreadable checkpoints, moved aside, never deleted
  .lock                  held (flock; on gs:// a lock object) by process 0 of the job training this run

The directory may be local or on an object store (gs://...): every file goes through `jaxlm.storage`,
which says how writes, moves, appends and the lock work without rename, append or flock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
import yaml
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import storage
from jaxlm.checkpoint import Checkpointer, CheckpointDamaged
from jaxlm.compile_cache import use_compilation_cache
from jaxlm.config import CheckpointConfig, Config, architecture
from jaxlm.config_checks import validate
from jaxlm.errors import UserError
from jaxlm.sharding import fit_axes
from jaxlm.span_corruption import reserved_ids, sentinel_count
from jaxlm.state import Setup, make_setup
from jaxlm.storage import Path
from jaxlm.tokenizer import (CONFIG_FILES as TOKENIZER_CONFIGS, HF_PREFIX, Tokenizer, load_tokenizer, spec_for_copy, tokenizer_file,
                             tokenizer_files)

Log = Callable[[str], None]


UNKNOWN_HOLDER = "another process"


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_path(text: str | os.PathLike) -> Path:
    """The path of a run directory (or a file beside it) as given: local or gs://."""
    return storage.path(text)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths of one run directory and the file operations that keep them consistent."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", storage.path(self.root))  # one type, local or gs://

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
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

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
        storage.write_whole(self.config, yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False).encode())

    def keep_tokenizer(self, cfg: Config) -> None:
        """Copies the tokenizer's files into the run so its checkpoints are self-contained; a run
        resumed with a different tokenizer is refused (its ids would mean other text)."""
        pairs = self._tokenizer_pairs(cfg.data.tokenizer)
        if pairs and not pairs[0][1].exists():
            for source, target in pairs:
                storage.write_whole(target, source.read_bytes())
            return
        differs = self.tokenizer_mismatch(cfg.data.tokenizer)
        if differs:
            raise UserError(f"{differs}; put that one back or start a new train.run_dir")

    def tokenizer_mismatch(self, spec: str) -> str:
        """'' if tokenizer `spec`'s files equal the run's copies (or there are none yet), else
        which file differs."""
        pairs = self._tokenizer_pairs(spec)
        if not pairs or not pairs[0][1].exists():
            return ""
        for source, target in pairs:
            if not target.exists() or target.read_bytes() != source.read_bytes():
                return (f"tokenizer file {source} differs from the one this run was trained with "
                        f"({target})")
        return ""

    def _tokenizer_pairs(self, spec: str) -> list[tuple[Path, Path]]:
        """(tokenizer file, the run's copy of it); hf: configs are copied beside tokenizer.json."""
        sources = tokenizer_files(spec)
        if not sources:
            return []
        copies = [self.tokenizer_copy(spec), *(self.root / extra.name for extra in sources[1:])]
        return list(zip(sources, copies))

    def local_tokenizer(self, copy: Path) -> Path:
        """The run's tokenizer copy as a local file (SentencePiece and `tokenizers` read local
        files only): itself, or for gs:// a copy (with its companion configs) in a temporary
        directory named by their content."""
        if not storage.is_remote(copy):
            return copy
        files = [copy, *(f for f in (self.root / n for n in TOKENIZER_CONFIGS) if f.exists())]
        contents = [f.read_bytes() for f in files]
        local = storage.path(tempfile.gettempdir()) / "jaxlm-tokenizers" / (
            hashlib.sha256(b"\0".join(contents)).hexdigest()[:16])
        if not (local / copy.name).exists():
            local.mkdir(parents=True, exist_ok=True)
            for f, data in zip(files, contents):
                storage.write_whole(local / f.name, data)
        return local / copy.name

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl; a torn line (a run killed mid-write) is left out."""
        if not self.metrics.exists():
            raise UserError(f"{self.root} has no metrics.jsonl; pass the run_dir of a `jaxlm train` run")
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def draw_curves(self, log: Log) -> None:
        """Redraws curves.png from the metrics. A failed write only warns: the curves are derived
        from metrics.jsonl, which is intact."""
        from jaxlm.plot import render  # matplotlib is imported once a run first evaluates

        try:
            storage.write_whole(self.curves, render({self.root.name: self.read_metrics()}))
        except OSError as err:
            log(f"warning: could not write {self.curves} ({err.strerror or err})")

    def size(self, path: Path) -> int:
        """Bytes of a file, or of all files under a directory."""
        return storage.size(path)

    def set_checkpoint_aside(self, step_dir: Path, step: int) -> Path:
        """Moves an unreadable checkpoint to quarantine/<step>-<time> (never deleted)."""
        target = self.quarantine / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.quarantine.mkdir(parents=True, exist_ok=True)
        storage.move(step_dir, target)
        return target

    def keep_labels(self, names: list[str]) -> None:
        """Saves a classifier's class names by id; a resume whose data numbers them otherwise is
        refused (the head's outputs would mean other classes)."""
        if not self.labels.exists():
            storage.write_whole(self.labels, json.dumps(names).encode())
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
            if path.exists() and (path.is_dir() or path.stat().length):
                storage.move(path, kept)
                moved.append(kept.name)
        if moved:
            log(f"no checkpoint was restored: the earlier history is kept as {' and '.join(moved)}")


class RunLock:
    """One job at a time writes a run: process 0 holds an exclusive flock on `<run>/.lock` (the
    kernel drops it when the process dies, so a killed run's lock is free at once) and tells the
    other processes of its job whether it got it. The holder's host and pid are in the file.
    On gs:// it is a lock object instead (`storage.ObjectLock`)."""

    def __init__(self, run: RunDir):
        self.run, self._file, self._object = run, None, None

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
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        if storage.is_remote(self.run.lock):
            self._object = storage.ObjectLock(self.run.lock)
            holder = self._object.acquire(info)
            return "" if holder is None else (f"{_holder(json.dumps(holder))} (if that job is gone, "
                                              f"delete {self.run.lock})")
        lock = open(self.run.lock, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(lock)
            lock.close()
            return holder
        lock.truncate(0)
        lock.write(json.dumps(info))
        lock.flush()
        self._file = lock
        return ""

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None
        if self._object is not None:
            self._object.release()


def _read_holder(lock: Any) -> str:
    """The holder's note; it writes the note just after taking the lock, so a job refused in
    between waits up to a second for it."""
    for _ in range(20):
        lock.seek(0)
        holder = _holder(lock.read())
        if holder != UNKNOWN_HOLDER:
            return holder
        time.sleep(0.05)
    return holder


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return UNKNOWN_HOLDER


# ---------------------------------------------------------------- opening a run


def resolve(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fills what the config leaves to the run and checks it.

    An unset vocab size is the tokenizer's rounded up to a multiple of 128, so the vocab axis splits
    over any tensor-parallel size and matmuls stay aligned (the extra ids are never produced as
    text); an encoder-decoder's first reserves its sentinel ids (span_corruption.reserved_ids).
    """
    sentinels = sentinel_count(cfg.data) if cfg.objective == "span_corruption" else 0
    needed = tokenizer.vocab_size + sentinels
    unset = tokenizer.vocab_size + reserved_ids(cfg.data, cfg.objective, architecture(cfg))
    vocab = cfg.model.vocab_size or -(-unset // 128) * 128
    if vocab < needed:
        also = f" plus {sentinels} sentinel ids for span_corruption" if sentinels else ""
        raise UserError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's "
                        f"({tokenizer.vocab_size}){also}; raise it or leave it null")
    labels = cfg.model.num_labels
    if cfg.objective == "classify":
        from jaxlm.data import label_names  # tfds and grain: only commands that read data need them

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
    use_compilation_cache(cfg.compilation_cache_dir)
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
                 device_count: int = 1) -> Config:
    """The config a checkpoint was trained with, its tokenizer the run's own copy, its mesh fitted
    to `device_count` devices (sharding.fit_axes; `overrides` of mesh.axes apply after that)."""
    raw = checkpointer.restore_config_dict(step)
    raw["mesh"]["axes"] = fit_axes(raw["mesh"]["axes"], device_count)
    copy = run.tokenizer_copy(raw["data"]["tokenizer"])
    if copy is not None and copy.exists():
        raw["data"]["tokenizer"] = spec_for_copy(raw["data"]["tokenizer"], run.local_tokenizer(copy))
    for assignment in overrides:
        config_lib.apply_override(raw, assignment)
    cfg = config_lib.from_dict(Config, raw)
    validate(cfg)
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
    warning for each unreadable one skipped; nothing is moved), restored in their shards on the
    run's own mesh fitted to `devices` (default: all), so a model bigger than one device loads
    (`host`: as numpy arrays, placed on no device)."""
    run = RunDir(run_path(run_dir))
    devices = devices if devices is not None else jax.devices()
    checkpointer = read_only_checkpointer(run)
    steps = sorted(checkpointer.all_steps(), reverse=True)
    if step is not None and step not in steps:
        raise UserError(f"{run.root} has no checkpoint at step {step}; it has {sorted(steps)}")
    try:
        for candidate in [step] if step is not None else steps:
            try:
                cfg = saved_config(checkpointer, run, candidate, overrides, len(devices))
                use_compilation_cache(cfg.compilation_cache_dir)
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
