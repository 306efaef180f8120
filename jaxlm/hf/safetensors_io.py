"""Reading HF safetensors (one file or shards with an index) one tensor at a time, and writing them
tensor by tensor, so neither side ever holds a second copy of the whole model in host memory."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxlm.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype(np.float16): "F16"}


class HfTensors:
    """The tensors of a HF model directory by name; each read opens its file and closes it again
    (the memory map goes with it)."""

    def __init__(self, directory: Path):
        if (directory / INDEX).exists():
            try:
                weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise UserError(f"{directory / INDEX} is not a safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE).exists():
            files = [SINGLE]
        else:
            raise UserError(f"{directory} has no {SINGLE} or {INDEX} (only safetensors are read)")
        self.entries: dict[str, tuple[Path, str]] = {}  # name -> (file, name stored there)
        for file in files:
            for name in self._keys(directory / file):
                self.entries[name] = (directory / file, name)

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read {path}: {err}") from None

    def add_prefix(self, prefix: str) -> None:
        """Names as in the full model, for checkpoints saved as the base model (no prefix)."""
        if not any(name.startswith(prefix) for name in self.entries):
            self.entries = {(name if name.startswith("lm_head.") else prefix + name): entry
                            for name, entry in self.entries.items()}

    def names(self) -> set[str]:
        return set(self.entries)

    def get(self, name: str) -> np.ndarray:
        path, stored = self.entries[name]
        try:
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(stored)
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read tensor {stored} from {path}: {err}") from None


class ShardedWriter:
    """Writes tensors as they come into files of at most `max_shard_bytes` (one tensor may exceed
    it); `close()` names them model.safetensors, or model-0000k-of-0000n.safetensors plus the
    index when there are several."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.shards: list[dict[str, dict]] = []  # per shard: name -> header entry
        self._data = None
        self._size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._data is None or (self._size and self._size + array.nbytes > self.max_shard_bytes):
            self._finish_shard()
            self.shards.append({})
            self._data = (self.directory / f".shard{len(self.shards)}.data").open("wb")
            self._size = 0
        data = np.ascontiguousarray(array)
        self.shards[-1][name] = {"dtype": DTYPES[data.dtype], "shape": list(data.shape),
                                 "data_offsets": [self._size, self._size + data.nbytes]}
        self._data.write(data.reshape(-1).view(np.uint8).data)  # no bytes copy
        self._size += data.nbytes

    def _finish_shard(self) -> None:
        if self._data is not None:
            self._data.close()

    def close(self) -> None:
        self._finish_shard()
        count = len(self.shards)
        names = [SINGLE] if count == 1 else [
            f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        for k, (entries, name) in enumerate(zip(self.shards, names), 1):
            raw = self.directory / f".shard{k}.data"
            header = json.dumps({"__metadata__": {"format": "pt"}, **entries},
                                separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)
            with (self.directory / name).open("wb") as out, raw.open("rb") as data:
                out.write(struct.pack("<Q", len(header)) + header)
                shutil.copyfileobj(data, out, 16 << 20)
            raw.unlink()
        if count > 1:
            weight_map = {t: name for entries, name in zip(self.shards, names) for t in entries}
            total = sum(e["data_offsets"][1] - e["data_offsets"][0]
                        for entries in self.shards for e in entries.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2))
