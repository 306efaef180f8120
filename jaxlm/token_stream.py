"""Training rows of a text corpus as slices of one endless token stream.

The split is tokenized once (each document as [bos] ids [eos]) into a flat token file under
`data.cache_dir` (keyed by the split's identity and the tokenizer's files), or into memory. Epoch e
of the stream is every document in a seeded shuffled order, concatenated; row g of the stream is
its tokens [g L, (g+1) L). Batch i is rows i B .. (i+1) B - 1, and a process builds only its own
rows, reading only the documents they overlap. So any corpus of one document or more serves any
batch size, the global batch is the same for any process count, and a batch is a pure function
of its index (the data iterator's checkpoint state is that index; grain workers only tokenize,
so their number cannot change the batches).

What it trades: each host tokenizes the whole split once (in grain workers when
`data.worker_count` > 0) before its first batch; afterwards a start reads the cached file.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import grain
import numpy as np
from absl import flags as absl_flags

from jaxlm.errors import UserError
from jaxlm.tokenizer import Tokenizer

Example = dict[str, np.ndarray]
# Part of the cache key: bump when the file layout or the tokenization rule changes.
FORMAT = "token-stream-1"
# Epoch orders (and their cumulative lengths) kept per stream: a batch of a corpus larger than
# the batch spans at most two (a smaller corpus recomputes its few documents' orders).
_EPOCHS_KEPT = 2


class TokenIndex:
    """Every document's tokens, end to end (`tokens`), and where each starts (`offsets`, n + 1)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens, self.offsets = tokens, offsets
        self.lengths = np.diff(offsets)
        self.total = int(offsets[-1])

    def __len__(self) -> int:
        return len(self.lengths)


def _token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)


def _tokenized(source: Any, tokenizer: Tokenizer, worker_count: int) -> grain.IterDataset:
    """Each document's [bos] ids [eos], in document order (grain workers keep the order)."""
    bos, eos, dtype = tokenizer.bos_id, tokenizer.eos_id, _token_dtype(tokenizer)

    def tokenize(text: bytes) -> np.ndarray:
        return np.concatenate([[bos], tokenizer.encode(text), [eos]]).astype(dtype)

    docs = grain.MapDataset.source(source).map(tokenize).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return docs.mp_prefetch(worker_options(worker_count)) if worker_count else docs


def worker_options(worker_count: int) -> grain.MultiprocessingOptions:
    """grain's options for `worker_count` worker processes."""
    if not absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; we are no absl app
    return grain.MultiprocessingOptions(num_workers=worker_count)


def _write_index(source: Any, tokenizer: Tokenizer, worker_count: int, directory: Path) -> None:
    """tokens.bin (every document's tokens, end to end), offsets.npy, then meta.json: a directory
    with meta.json is complete."""
    offsets = array.array("q", [0])  # 8 bytes a document, however many there are
    with (directory / "tokens.bin").open("wb") as out:
        for ids in _tokenized(source, tokenizer, worker_count):
            ids.tofile(out)
            offsets.append(offsets[-1] + len(ids))
    np.save(directory / "offsets.npy", np.frombuffer(offsets, np.int64))
    (directory / "meta.json").write_text(json.dumps({"dtype": _token_dtype(tokenizer).name,
                                                     "documents": len(source)}))


def _complete(directory: Path) -> bool:
    """Whether `directory` holds a whole index (its token file as long as its offsets say)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        count = int(np.load(directory / "offsets.npy", mmap_mode="r")[-1])
        size = (directory / "tokens.bin").stat().st_size
    except (OSError, ValueError, KeyError):
        return False
    return size == count * np.dtype(meta["dtype"]).itemsize


def _read_index(directory: Path) -> TokenIndex:
    """The index in `directory`, its tokens memory-mapped (read as rows need them)."""
    dtype = np.dtype(json.loads((directory / "meta.json").read_text())["dtype"])
    offsets = np.load(directory / "offsets.npy")
    tokens = (np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(int(offsets[-1]),))
              if offsets[-1] else np.zeros(0, dtype))
    return TokenIndex(tokens, offsets)


def token_index(source: Any, tokenizer: Tokenizer, cache_key: str | None, cache_dir: str | None,
                worker_count: int = 0) -> TokenIndex:
    """The split's token index: read from `cache_dir`'s copy for `cache_key` (the split and the
    tokenizer), built there first if missing (one builder per host at a time), or built in
    memory without a cache directory."""
    if cache_dir is None or cache_key is None:
        pieces = list(_tokenized(source, tokenizer, worker_count))
        offsets = np.cumsum([0] + [len(p) for p in pieces])
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, _token_dtype(tokenizer))
        return TokenIndex(tokens, offsets)
    root = Path(cache_dir).expanduser() / "tokens"
    key = hashlib.sha256(f"{FORMAT}\0{cache_key}".encode()).hexdigest()[:16]
    final = root / key

    def build() -> None:
        for leftover in [final, *root.glob(f".{key}-*")]:  # a damaged index, killed builds
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            _write_index(source, tokenizer, worker_count, staging)
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide it from other users
            os.replace(staging, final)
        except OSError as err:  # a full disk: nothing half-written is left to be read
            raise UserError(f"writing the token cache in {root} failed ({err.strerror}); free "
                            "space there or point data.cache_dir elsewhere") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    build_once(root, key, lambda: _complete(final), build)
    return _read_index(final)


def build_once(directory: Path, name: str, built: Callable[[], bool],
               build: Callable[[], None]) -> None:
    """Runs `build` unless `built()`. Processes sharing the disk build one after the other (an
    flock on `directory`/.NAME.lock): the first builds, the rest find it built."""
    if built():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / f".{name}.lock", "w")
    except OSError as err:
        raise UserError(f"data.cache_dir {directory} is not writable: {err.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built():
            build()


class StreamRows:
    """Rows of `seq_len` tokens of the shuffled, concatenated documents of `index`, in the
    layout of grain's packers: tokens, tokens_segment_ids (1, 2, ... per document in the row)
    and tokens_positions (restarting per document and per row)."""

    def __init__(self, index: TokenIndex, seq_len: int, seed: int):
        if index.total == 0:
            raise UserError("the training split has no tokens; add text to the corpus")
        self.index, self.seq_len, self.seed = index, seq_len, seed
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token counts with a leading 0) of `epoch`."""
        if epoch not in self._epochs:
            if len(self._epochs) >= _EPOCHS_KEPT:
                del self._epochs[min(self._epochs)]
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
            self._epochs[epoch] = order, np.concatenate([[0], np.cumsum(self.index.lengths[order])])
        return self._epochs[epoch]

    def _span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, document number per token) of stream positions [start, stop)."""
        tokens, documents, document = [], [], 0
        while start < stop:
            epoch, within = divmod(start, self.index.total)
            take = min(stop - start, self.index.total - within)
            order, cumulative = self._epoch(epoch)
            first = int(np.searchsorted(cumulative, within, side="right")) - 1
            last = int(np.searchsorted(cumulative, within + take, side="left"))
            for k in range(first, last):
                doc = order[k]
                lo = max(within, cumulative[k]) - cumulative[k]
                hi = min(within + take, cumulative[k + 1]) - cumulative[k]
                piece = self.index.tokens[self.index.offsets[doc] + lo: self.index.offsets[doc] + hi]
                tokens.append(piece)
                documents.append(np.full(len(piece), document, np.int64))
                document += 1
            start += take
        return np.concatenate(tokens).astype(np.int32), np.concatenate(documents)

    def rows(self, first_row: int, count: int) -> Example:
        """Stream rows first_row .. first_row + count - 1."""
        length = self.seq_len
        tokens, documents = self._span(first_row * length, (first_row + count) * length)
        flat = np.arange(count * length)
        starts = np.ones(count * length, bool)
        starts[1:] = documents[1:] != documents[:-1]
        starts[::length] = True
        positions = flat - np.maximum.accumulate(np.where(starts, flat, 0))
        segments = np.cumsum(starts).reshape(count, length)
        segments = segments - segments[:, :1] + 1
        return {"tokens": tokens.reshape(count, length),
                "tokens_segment_ids": segments.astype(np.int32),
                "tokens_positions": positions.reshape(count, length).astype(np.int32)}


def stream_batches(rows: StreamRows, global_batch: int, first_row: int,
                   local_rows: int) -> grain.MapDataset:
    """Batch i: this process's rows first_row .. first_row + local_rows - 1 of global batch i."""
    return grain.MapDataset.range(2**62).map(
        lambda i: rows.rows(i * global_batch + first_row, local_rows))
