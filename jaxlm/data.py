"""Data: a TFDS data source per split, fed through grain (shuffle, tokenize, pack, objective, batch).

Every dataset is random-access array_record read by `tfds.data_source`; grain iterators are
checkpointable, so a resumed run continues from the exact example where it stopped. Training rows
of text corpora are slices of one token stream (jaxlm.token_stream); task records are packed
whole, one stream per batch row.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from jaxlm.config import Config, DataConfig, target_length
from jaxlm.datasets import tasks as task_files
from jaxlm.datasets.corpus import CorpusConfig, PythonStdlib, TextFiles
from jaxlm.errors import UserError
from jaxlm.objectives import ExampleFn
from jaxlm.tasks import TASK_OBJECTIVES, Encoder
from jaxlm.token_stream import (ROW_LAYOUT, StreamRows, build_once, stream_batches, token_index,
                                worker_options)
from jaxlm.tokenizer import Tokenizer, padding_id, tokenizer_files

Example = dict[str, np.ndarray]
# Documents are read in the calling thread: with one stream per batch row, a prefetch thread pool
# per stream costs seconds to start and buys nothing on local array_record files.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Stream ids of eval data (training rows use their row index): fixed, so eval masks are too.
EVAL_STREAM = 1 << 32
LOCAL_DATASETS = ("python_stdlib", "text_files", "jsonl", "csv")
TASK_DATASETS = ("jsonl", "csv")
# Rows a first-fit packer of task examples keeps open.
PACKING_BINS = 4


def _rooted(cfg: DataConfig, *groups: tuple[str, ...]) -> tuple[Path, list[tuple[str, ...]]]:
    """The patterns' common fixed directory and each group of patterns relative to it."""
    if not cfg.paths:
        raise UserError(f"data.dataset is {cfg.dataset} but data.paths is empty; list files or globs")
    for pattern in (p for group in groups for p in group):
        _check_matches(pattern, glob.glob(str(Path(pattern).expanduser()), recursive=True))
    absolute = [[Path(p).expanduser().absolute() for p in group] for group in groups]
    # Document keys (and so the train/validation split) are relative to the patterns' common
    # fixed directory: the same corpus splits the same wherever it lives.
    root = Path(os.path.commonpath([_fixed_prefix(p) for group in absolute for p in group]))
    return root, [tuple(str(p.relative_to(root)) for p in group) for group in absolute]


def _task_config(cfg: DataConfig, objective: str) -> task_files.TaskConfig:
    root, (train, validation) = _rooted(cfg, cfg.paths, cfg.validation_paths)
    return task_files.make_config(
        root, train, validation, file_format=cfg.dataset, objective=objective,
        fields=tuple(sorted(cfg.fields.items())), validation_percent=cfg.validation_percent,
    )


def _text_files_config(cfg: DataConfig) -> CorpusConfig:
    root, (patterns,) = _rooted(cfg, cfg.paths)
    return TextFiles.make_config(
        root,
        patterns,
        split_paragraphs=cfg.split_paragraphs,
        validation_percent=cfg.validation_percent,
    )


def _check_matches(pattern: str, matches: list[str]) -> None:
    """A pattern must match files, and by names that are valid UTF-8 (documents are keyed and split
    by name), so a typo, a bare directory or an odd name is named here, not met as an empty
    corpus or a traceback."""
    if not matches:
        raise UserError(f"data.paths: no file matches '{pattern}'; fix the path or glob")
    files = [m for m in matches if os.path.isfile(m)]
    if not files:
        what = "matches only directories" if glob.has_magic(pattern) else "is a directory"
        example = f"{pattern.rstrip('/')}/**/*.txt"
        raise UserError(f"data.paths: '{pattern}' {what}; name the files, e.g. '{example}' "
                        "(with your files' extension)")
    for name in files:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            raise UserError(f"data.paths: file name {shown} is not valid UTF-8; rename the file "
                            f"or narrow '{pattern}' to leave it out") from None


def _fixed_prefix(pattern: Path) -> Path:
    """The directory part of a glob before its first wildcard."""
    parts = pattern.parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    return Path(*parts[: max(fixed, 1)])


def _corpus(cfg: DataConfig, objective: str = "") -> tuple[type, Any]:
    if cfg.dataset in TASK_DATASETS:
        return task_files.TaskFiles, _task_config(cfg, objective)
    if cfg.dataset == "python_stdlib":
        return PythonStdlib, PythonStdlib.make_config(
            PythonStdlib.default_root(), ("**/*.py",), validation_percent=cfg.validation_percent
        )
    return TextFiles, _text_files_config(cfg)


def _prepared_builder(cfg: DataConfig, objective: str) -> tfds.core.DatasetBuilder:
    """The builder of a jaxlm corpus, built into the cache on first use."""
    if "://" in cfg.cache_dir:
        raise UserError(
            f"data.cache_dir {cfg.cache_dir} must be a local directory: array_record, the corpus "
            "file format, reads and writes through POSIX files only (gs:// run directories work)"
        )
    builder_cls, corpus = _corpus(cfg, objective)
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.disable_progress_bar()
    data_dir = Path(cfg.cache_dir).expanduser()
    builder = builder_cls(config=corpus, data_dir=str(data_dir), file_format="array_record")
    if builder.is_prepared():
        return builder
    if not builder_cls.documents(corpus):  # read only when building: a big corpus takes seconds
        raise UserError(f"data.dataset {cfg.dataset}: the corpus is empty; point data.paths at text")

    def build() -> None:
        _remove_stale_builds(builder)
        builder.download_and_prepare()

    build_once(data_dir, f"{builder.name}-{corpus.name}", builder.is_prepared, build)
    return builder


def _remove_stale_builds(builder: tfds.core.DatasetBuilder) -> None:
    """Deletes what killed builds of this dataset config left (TFDS never does). Only called
    under the build lock: a live build of this config would hold it, so none is removed."""
    for stale in Path(builder.data_dir).parent.glob(f"{tfds.core.constants.INCOMPLETE_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def open_split(cfg: DataConfig, split: str, objective: str = "clm") -> Any:
    """Random-access source of one split; missing datasets or splits are UserErrors. Task
    datasets (jsonl, csv) give records (dicts by role) for `objective`, text datasets bytes."""
    if cfg.dataset in LOCAL_DATASETS:
        builder = _prepared_builder(cfg, objective)
        if split not in builder.info.splits:
            raise UserError(
                f"dataset {cfg.dataset} has no split '{split}' (splits: {list(builder.info.splits)});"
                " add documents or raise data.validation_percent"
            )
        source = builder.as_data_source(split)
        feature = None if cfg.dataset in TASK_DATASETS else "text"
    else:
        try:
            source = tfds.data_source(cfg.dataset, split=split, download=False)
        except (tfds.core.registered.DatasetNotFoundError, AssertionError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0]
            raise UserError(
                f"data.dataset '{cfg.dataset}' split '{split}' is not available offline "
                f"({first_line}); prepare it with tfds first or use python_stdlib / text_files"
            ) from None
        feature = cfg.text_feature
    if len(source) == 0:
        raise UserError(f"dataset {cfg.dataset} split '{split}' is empty; add more documents")
    return _FeatureSource(source, feature)


class _FeatureSource:
    """Exposes one text feature of a data source as bytes, the only thing the pipeline needs
    (feature None: the whole record, by role); `identity` names the split's content (TFDS's
    name/config/version, whose config of a local corpus fingerprints its files)."""

    def __init__(self, source: Any, feature: str | None):
        self.source, self.feature = source, feature
        info = getattr(source, "dataset_info", None)
        self.identity = None if info is None else f"{info.full_name}/{source.split}/{feature}"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        if self.feature is None:
            return self.source[index]
        text = self.source[index][self.feature]
        if isinstance(text, str):
            return text.encode("utf-8")
        return bytes(text)


def _tokenize_fn(tokenizer: Tokenizer) -> Callable[[bytes], Example]:
    bos, eos = tokenizer.bos_id, tokenizer.eos_id

    def tokenize(text: bytes) -> Example:
        ids = tokenizer.encode(text)
        return {"tokens": np.concatenate([[bos], ids, [eos]]).astype(np.int32)}

    return tokenize


def _packed(docs: grain.MapDataset, tokenizer: Tokenizer, seq_len: int,
            encoder: Encoder | None = None) -> grain.IterDataset:
    """Tokenized documents concatenated and cut into rows of `seq_len`, or with a task `encoder`
    encoded records packed whole into rows (first fit); grain pads with 0, which becomes the
    tokenizer's padding id (0 may be a regular token of another tokenizer)."""
    pad = padding_id(tokenizer)

    def fill_padding(row: Example) -> Example:
        filled = {k: np.where(row[f"{k}_segment_ids"] == 0, pad, row[k])
                  for k in ("tokens", "inputs", "decoder_inputs") if k in row}
        return {**row, **filled}

    if encoder is not None:
        return grain.experimental.FirstFitPackIterDataset(
            docs.map(encoder).to_iter_dataset(_READ_OPTIONS), length_struct=encoder.lengths,
            num_packing_bins=PACKING_BINS, shuffle_bins=False,
        ).map(fill_padding)
    return grain.experimental.ConcatThenSplitIterDataset(
        docs.map(_tokenize_fn(tokenizer)).to_iter_dataset(_READ_OPTIONS), length_struct={"tokens": seq_len}
    ).map(fill_padding)


def stack_rows(rows: tuple[Example, ...] | list[Example]) -> Example:
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def empty_batch(rows: int, seq_len: int, pad_id: int, token_types: bool = False,
                nsp: bool = False, target_len: int = 0) -> Example:
    """All padding (segment 0, weight 0): counts for nothing. `pad_id`: see tokenizer.padding_id;
    `token_types`: with the segment A/B ids of task and NSP batches; `nsp`: with the (zero-weight)
    next-sentence labels of mlm + data.nsp batches; `target_len`: an encoder-decoder's batch with
    decoder rows of that length."""
    ints = np.full((rows, seq_len), pad_id, np.int32)
    names = ("inputs", "targets", "segment_ids", "positions")
    batch = {**{k: ints for k in names}, "weights": np.zeros((rows, seq_len), np.float32)}
    if target_len:
        decoder = np.full((rows, target_len), pad_id, np.int32)
        batch.update(decoder_inputs=decoder, decoder_segment_ids=decoder, decoder_positions=decoder,
                     targets=decoder, weights=np.zeros((rows, target_len), np.float32))
    if token_types or nsp:
        batch["token_types"] = np.zeros((rows, seq_len), np.int32)
    if nsp:
        batch.update(nsp_targets=np.zeros((rows, seq_len), np.int32),
                     nsp_weights=np.zeros((rows, seq_len), np.float32))
    return batch


def config_empty_batch(cfg: Config, rows: int, pad_id: int) -> Example:
    """An all-padding batch of `cfg`'s shapes and keys."""
    return empty_batch(rows, cfg.data.seq_len, pad_id, has_token_types(cfg), cfg.data.nsp,
                       target_length(cfg))


def has_token_types(cfg: Config) -> bool:
    """Whether `cfg`'s batches carry token types (single-stack task records and NSP pairs do)."""
    return cfg.data.nsp or cfg.objective in ("seq2seq_lm", "classify")


def stream_cache_key(source: Any, tokenizer_spec: str) -> str | None:
    """What a split's cached token stream depends on: its content and the tokenizer's files."""
    identity = getattr(source, "identity", None)
    if identity is None:
        return None
    digest = hashlib.sha256(tokenizer_spec.split(":", 1)[0].encode())  # bytes | its kind
    for path in tokenizer_files(tokenizer_spec):
        digest.update(path.read_bytes())
    return f"{identity}\0{digest.hexdigest()}"


def train_pipeline(
    source: Any,
    tokenizer: Tokenizer,
    example_fn: ExampleFn,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    encoder: Encoder | None = None,
    cache_dir: str | None = None,
    cache_key: str | None = None,
) -> grain.IterDataset:
    """Endless batches of this process's rows of the global batch: of text, slices of the token
    stream (tokenized once into `cache_dir` under `cache_key`, else in memory); with `encoder`,
    of task records. The global batch is the same whatever the number of processes, and a process
    reads only what its rows hold, so runs on 1 host and on N hosts see identical data.
    """
    local = global_batch // process_count
    rows = range(process_index * local, (process_index + 1) * local)
    if encoder is None:
        index = token_index(source, tokenizer, cache_key, cache_dir, worker_count)
        packed = stream_batches(StreamRows(index, seq_len, seed), global_batch, rows.start, local)
        packed = packed.to_iter_dataset(_READ_OPTIONS)
    else:
        packed = _record_rows(source, tokenizer, seq_len, global_batch, seed, rows, worker_count,
                              encoder)

    # The objective runs here, after any workers: batch i holds example i of every row's stream,
    # so (row, i) keys its masks whatever the worker or process count (workers count apart).
    def objective(index: int, batch: Example) -> Example:
        return stack_rows(tuple(
            example_fn({k: v[j] for k, v in batch.items()}, (row, index)) for j, row in enumerate(rows)
        ))

    return packed.map_with_index(objective)


def _record_rows(source: Any, tokenizer: Tokenizer, seq_len: int, global_batch: int, seed: int,
                 rows: range, worker_count: int, encoder: Encoder) -> grain.IterDataset:
    """Task records packed whole: row r of every global batch from its own stream of records r,
    r+B, r+2B, ... (B = global batch), reshuffled each epoch."""
    if len(source) < global_batch:
        raise UserError(
            f"the training split has {len(source)} records, fewer than train.batch_size "
            f"({global_batch}); add records or lower the batch size"
        )
    streams = [
        _packed(
            grain.MapDataset.source(source)[row::global_batch]
            .seed((seed * 1_000_003 + row) % 2**32)
            .shuffle()
            .repeat(),
            tokenizer,
            seq_len,
            encoder,
        )
        for row in rows
    ]
    return _in_workers(grain.experimental.ZipIterDataset(streams).map(stack_rows), worker_count)


def _in_workers(batches: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """Batches made by `worker_count` grain processes (0: in this one). Each worker packs its own
    slice of every row's documents, so the batches differ from (but are as deterministic and as
    exactly resumable as) those of another worker count."""
    if not worker_count:
        return batches
    options = worker_options(worker_count)
    # Worker output lives in shared memory that grain reuses: own a copy before it is kept.
    return batches.mp_prefetch(options).map(lambda batch: {k: np.array(v) for k, v in batch.items()})


def device_prefetch(
    batches: grain.IterDataset, place: Callable[[Example], Any], size: int
) -> grain.IterDataset:
    """Batches put on the devices by `place` in a background thread, `size` ahead of the step, so
    the step never waits on the host. The iterator's checkpoint state is the one after the last
    batch handed out (not the last one prefetched), so a resumed run sees the same batches."""
    placed = batches.map(place)
    if not size:
        return placed
    return grain.experimental.ThreadPrefetchIterDataset(placed, prefetch_buffer_size=size)


def eval_pipeline(
    source: Any,
    tokenizer: Tokenizer,
    example_fn: ExampleFn,
    *,
    seq_len: int,
    local_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    encoder: Encoder | None = None,
) -> grain.IterDataset:
    """One pass over this process's documents (task records with `encoder`) in a fixed shuffled
    order (so a few eval batches sample many); the last batch is padded, so each counts once."""
    docs = grain.MapDataset.source(source)[process_index::process_count].seed(seed).shuffle()
    stream = EVAL_STREAM + process_index
    examples = _packed(docs, tokenizer, seq_len, encoder).map_with_index(
        lambda index, packed: example_fn(packed, (stream, index))
    )
    batches = examples.batch(local_batch)
    pad = padding_id(tokenizer)
    return batches.map(lambda b: pad_batch(b, local_batch, pad))


def pad_batch(batch: Example, rows: int, pad_id: int) -> Example:
    """Pads a short batch with all-padding rows (they count for nothing)."""
    missing = rows - len(batch["inputs"])
    if missing == 0:
        return batch
    target_len = batch["decoder_inputs"].shape[1] if "decoder_inputs" in batch else 0
    pad = empty_batch(missing, batch["inputs"].shape[1], pad_id, "token_types" in batch,
                      "nsp_targets" in batch, target_len)
    return {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}


def label_names(cfg: DataConfig) -> list[str]:
    """Class names by id of a classification dataset's training records (checked first)."""
    return list(task_files.load(_task_config(cfg, "classify"))[1])


def dataset_manifest(cfg: DataConfig, objective: str = "clm") -> dict[str, Any] | None:
    """What a checkpoint's data position refers to: each source file's content digest by its
    corpus-relative path (None for TFDS catalog datasets, which are versioned by TFDS)."""
    stream = {} if objective in TASK_OBJECTIVES else {"stream": ROW_LAYOUT}  # text rows
    if cfg.dataset not in LOCAL_DATASETS:
        return {"dataset": cfg.dataset, **stream} if stream else None
    builder_cls, corpus = _corpus(cfg, objective)
    files = {
        str(path.relative_to(corpus.root)): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for path in builder_cls.files(corpus)
    }
    return {"dataset": cfg.dataset, "files": files, **stream}
