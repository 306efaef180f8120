"""A TFDS builder for labelled task data in a user's JSONL or CSV files.

Each record holds text fields by role: `input`/`target` (prompt -> target) or `text`, optional
`text_pair` and `label` (classification); `data.fields` names the column of each role. Every
record of every file is read and checked before TFDS writes anything, so a bad line is one error
naming file and line and nothing half-built is left in the cache. Splits: explicit validation files,
or the same hash split as `text_files` (keyed by file and line). Labels become ids: ints stay
themselves, strings are numbered in sorted order of the training labels.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.datasets.common import fingerprint, split_by_hash
from jaxlm.errors import UserError

# Roles each task objective reads from a record, required and optional.
ROLES = {"seq2seq_lm": ("input", "target"), "seq2seq": ("input", "target"),
         "classify": ("text", "label")}
OPTIONAL_ROLES = {"seq2seq_lm": (), "seq2seq": (), "classify": ("text_pair",)}
FORMATS = ("jsonl", "csv")

Record = dict[str, Any]  # role -> str (text roles) or str | int (label)


@dataclasses.dataclass
class TaskConfig(tfds.core.BuilderConfig):
    root: str = ""  # record keys are file paths relative to this directory
    train_patterns: tuple[str, ...] = ()
    validation_patterns: tuple[str, ...] = ()  # empty: hash split of the train files' records
    file_format: str = "jsonl"
    objective: str = "classify"
    fields: tuple[tuple[str, str], ...] = ()  # (role, column) pairs
    validation_percent: float = 5.0
    inference: bool = False  # files to predict on: only the input (text) role is required


def roles(cfg: TaskConfig) -> tuple[str, ...]:
    return ROLES[cfg.objective] + OPTIONAL_ROLES[cfg.objective]


def _files(root: str, patterns: tuple[str, ...]) -> list[Path]:
    found = {Path(p) for pattern in patterns for p in glob.glob(str(Path(root) / pattern), recursive=True)}
    return sorted(p for p in found if p.is_file())


def make_config(root: Path, train: tuple[str, ...], validation: tuple[str, ...], **options) -> TaskConfig:
    """A config named after a fingerprint of its files and options (a changed file rebuilds)."""
    draft = TaskConfig(name="draft", root=str(root), train_patterns=train,
                       validation_patterns=validation, **options)
    files = _files(draft.root, train) + _files(draft.root, validation)
    tag = fingerprint(files, train, validation, sorted(options.items()))
    return dataclasses.replace(draft, name=f"task_{tag}")


def _where(path: Path, line: int) -> str:
    return f"{path} line {line}"


def _checked(raw: Any, path: Path, line: int, cfg: TaskConfig) -> Record:
    """The record's values by role; a missing field or a wrongly typed value is a UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{_where(path, line)}: expected a JSON object, got {type(raw).__name__}")
    fields = dict(cfg.fields)
    required = ROLES[cfg.objective][:1] if cfg.inference else ROLES[cfg.objective]
    record = {}
    for role in roles(cfg):
        column = fields.get(role, role)
        value = raw.get(column)
        if value is None:
            if role not in required and (cfg.inference or role not in fields):
                continue
            raise UserError(f"{_where(path, line)}: no field '{column}' (data.fields.{role}); "
                            f"fields here: {sorted(raw)}")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not isinstance(value, str) and not (role == "label" and is_int):
            raise UserError(f"{_where(path, line)}: field '{column}' must be "
                            f"{'a string or an int' if role == 'label' else 'a string'}, got {value!r}")
        record[role] = value
    return record


def _read_jsonl(path: Path, cfg: TaskConfig) -> list[tuple[int, Record]]:
    records = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{_where(path, line)}: not JSON ({err.msg}); write one object per line") from None
        records.append((line, _checked(raw, path, line, cfg)))
    return records


def _read_csv(path: Path, cfg: TaskConfig) -> list[tuple[int, Record]]:
    records = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or None in row.values():
                raise UserError(f"{_where(path, reader.line_num)}: {len(row) - (None in row)} "
                                f"columns but the header has {len(reader.fieldnames)}")
            label_column = dict(cfg.fields).get("label", "label")
            if row.get(label_column, "").lstrip("-").isdigit():
                row[label_column] = int(row[label_column])
            records.append((reader.line_num, _checked(row, path, reader.line_num, cfg)))
    return records


def read_records(path: Path, cfg: TaskConfig) -> list[tuple[int, Record]]:
    """(line, record) of every record of one file; UnicodeDecodeError and OSError are UserErrors."""
    try:
        return (_read_csv if cfg.file_format == "csv" else _read_jsonl)(path, cfg)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({err})") from None


def read_inference_file(path: Path, objective: str, fields: dict[str, str]) -> list[tuple[int, Record]]:
    """(line, record) of a file to run a model on (`.csv` is CSV, anything else JSONL)."""
    if not path.is_file():
        raise UserError(f"--input-file {path} does not exist; give a JSONL or CSV file")
    cfg = TaskConfig(name="inference", file_format="csv" if path.suffix.lower() == ".csv" else "jsonl",
                     objective=objective, fields=tuple(sorted(fields.items())), inference=True)
    records = read_records(path, cfg)
    if not records:
        raise UserError(f"--input-file {path} holds no records")
    return records


def _keyed(root: str, files: list[Path], cfg: TaskConfig) -> dict[str, tuple[Path, int, Record]]:
    return {f"{path.relative_to(root)}:{line}": (path, line, record)
            for path in files for line, record in read_records(path, cfg)}


def label_names(records: list[Record]) -> list[str]:
    """Id -> name: ints name themselves (0..max), strings are sorted; mixed is a UserError."""
    labels = {r["label"] for r in records}
    if all(isinstance(v, int) for v in labels):
        if min(labels) < 0:
            raise UserError(f"labels must be >= 0 when they are ints, got {min(labels)}")
        return [str(i) for i in range(max(labels) + 1)]
    if any(isinstance(v, int) for v in labels):
        raise UserError("labels mix ints and strings; write them all as one kind")
    return sorted(labels)


def load(cfg: TaskConfig) -> tuple[dict[str, list[tuple[str, Record]]], tuple[str, ...]]:
    """Checked records by split, labels as ids, and the label names (empty for seq2seq)."""
    identity = repr(cfg)  # its name holds a fingerprint of the files
    if identity not in _LOADED:
        _LOADED[identity] = _load(cfg)
    return _LOADED[identity]


_LOADED: dict[str, tuple] = {}


def _load(cfg: TaskConfig) -> tuple[dict[str, list[tuple[str, Record]]], tuple[str, ...]]:
    train_files = _files(cfg.root, cfg.train_patterns)
    records = _keyed(cfg.root, train_files, cfg)
    if cfg.validation_patterns:
        held_out = _keyed(cfg.root, _files(cfg.root, cfg.validation_patterns), cfg)
        splits = {"train": sorted(records), "validation": sorted(held_out)}
        records = {**records, **held_out}
    else:
        splits = split_by_hash(sorted(records), cfg.validation_percent)
    if not splits["train"]:
        raise UserError(f"data.paths: no records in {', '.join(map(str, train_files))}; add some")
    names: tuple[str, ...] = ()
    if "label" in ROLES[cfg.objective]:
        names = tuple(label_names([records[k][2] for k in splits["train"]]))
        if len(names) < 2:
            raise UserError(f"classification needs at least two labels; the training records have "
                            f"{list(names)}; add examples of other labels")
        records = {k: (p, line, _with_label_id(r, names, p, line)) for k, (p, line, r) in records.items()}
    return {split: [(k, records[k][2]) for k in keys] for split, keys in splits.items()}, names


def _with_label_id(record: Record, names: tuple[str, ...], path: Path, line: int) -> Record:
    name = str(record["label"])
    if name not in names:
        raise UserError(f"{_where(path, line)}: label {record['label']!r} does not occur in the "
                        f"training data (labels: {list(names)}); fix it or add training examples")
    return {**record, "label": names.index(name)}


def label_ids(records: list[tuple[int, Record]], names: list[str], path: Path) -> np.ndarray:
    """Ids of records' labels under a run's label names; an unknown one names its line."""
    return np.asarray([_with_label_id(r, tuple(names), path, line)["label"] for line, r in records],
                      np.int64)


class TaskFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A user's labelled records, one TFDS example per record."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {role: tfds.features.Text() for role in roles(self.builder_config) if role != "label"}
        if "label" in roles(self.builder_config):
            features["label"] = tfds.features.Scalar(np.int64)
        features["key"] = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    @classmethod
    def files(cls, cfg: TaskConfig) -> list[Path]:
        return sorted(set(_files(cfg.root, cfg.train_patterns + cfg.validation_patterns)))

    @classmethod
    def documents(cls, cfg: TaskConfig) -> dict[str, list]:
        """Records by split; reading them checks every line (called before anything is built)."""
        return load(cfg)[0]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        splits = self.documents(self.builder_config)
        return {name: self._generate_examples(rows) for name, rows in splits.items() if rows}

    def _generate_examples(self, rows: list[tuple[str, Record]]):
        text_roles = [r for r in roles(self.builder_config) if r != "label"]
        for key, record in rows:
            example = {role: record.get(role, "") for role in text_roles}
            if "label" in record:
                example["label"] = record["label"]
            yield key, {**example, "key": key}
