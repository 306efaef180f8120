"""What the file-based builders share: a stable split by path hash and a source fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import tensorflow_datasets as tfds

TEXT_FEATURES = {"text": tfds.features.Text(), "path": tfds.features.Text()}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_by_hash(keys: list[str], validation_percent: float) -> dict[str, list[str]]:
    """Deterministic train/validation split of document keys by hash, the same on every machine.

    A corpus of two or more documents always keeps at least one of them for validation.
    """
    threshold = validation_percent / 100 * 2**64
    validation = [k for k in keys if _hash(k) < threshold]
    if not validation and validation_percent > 0 and len(keys) > 1:
        validation = [min(keys, key=_hash)]
    held_out = set(validation)
    return {"train": [k for k in keys if k not in held_out], "validation": validation}


def fingerprint(files: list[Path], *options: object) -> str:
    """Short digest of file names, sizes and mtimes plus options: a changed corpus rebuilds."""
    digest = hashlib.sha256(repr(options).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
