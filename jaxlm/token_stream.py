"""Training rows of a text corpus as slices of one endless token stream.

The split is tokenized once (each document as [bos] ids [eos]) into a flat token file under
`data.cache_dir` (keyed by the split's identity and the tokenizer's files), or into memory. Epoch e
of the stream is every document in a seeded shuffled order, concatenated; row g of the stream is
its tokens [g L, (g+1) L). Batch i is training rows i B .. (i+1) B - 1, each a stream row drawn
without replacement from a window of ~8M stream tokens, and a process builds only its own rows,
reading only the tokens they hold. So any corpus of one document or more serves any
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
# Epoch orders (and their cumulative lengths) and window permutations kept per stream: most
# batches span one or two of each (others recompute one; results never depend on the cache).
_KEPT = 2
# Training rows are drawn from windows of about this many stream tokens (see StreamRows).
SHUFFLE_WINDOW_TOKENS = 2**23
# What a checkpoint's data position means (its dataset manifest): a change restarts the data.
ROW_LAYOUT = f"{FORMAT}, rows drawn from windows of {SHUFFLE_WINDOW_TOKENS} tokens"
_WINDOW_SALT = 0x5EED  # keeps the windows' permutations apart from the epochs' orders


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
    and tokens_positions (restarting per document and per row).

    Training row r is a stream row drawn without replacement from r's window of the stream
    (SHUFFLE_WINDOW_TOKENS or the corpus's size, a seeded permutation per window): consecutive
    stream rows are mostly one document, so a batch of them holds one or two documents, its rows
    correlated, and learning slows (tiny_clm, 1200 steps: eval loss 1.71 against 1.30)."""

    def __init__(self, index: TokenIndex, seq_len: int, seed: int):
        if index.total == 0:
            raise UserError("the training split has no tokens; add text to the corpus")
        self.index, self.seq_len, self.seed = index, seq_len, seed
        # A corpus smaller than the window: windows of about an epoch, so rows repeat only
        # once most of the corpus has been seen. (A batch of more rows than a window holds
        # whole windows: thousands of documents.)
        self.window_rows = max(1, min(SHUFFLE_WINDOW_TOKENS, index.total) // seq_len)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token counts with a leading 0) of `epoch`."""
        def make() -> tuple[np.ndarray, np.ndarray]:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
            return order, np.concatenate([[0], np.cumsum(self.index.lengths[order])])

        return _kept(self._epochs, epoch, make)

    def stream_rows(self, training_rows: np.ndarray) -> np.ndarray:
        """The stream row of each training row (a bijection, window by window)."""
        windows, within = np.divmod(training_rows, self.window_rows)
        picked = np.empty_like(training_rows)
        for window in map(int, np.unique(windows)):
            at = windows == window
            picked[at] = window * self.window_rows + self._window_order(window)[within[at]]
        return picked

    def _window_order(self, window: int) -> np.ndarray:
        def make() -> np.ndarray:
            rng = np.random.default_rng([self.seed, _WINDOW_SALT, window])
            return rng.permutation(self.window_rows)

        return _kept(self._windows, window, make)

    def _tokens_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token, document number) at each stream position; the number tells documents apart."""
        epochs, within = np.divmod(positions, self.index.total)
        tokens, documents = np.empty(len(positions), np.int32), np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            order, cumulative = self._epoch(int(epoch))
            k = np.searchsorted(cumulative, within[at], side="right") - 1
            starts = self.index.offsets[order[k]] - cumulative[k]
            tokens[at] = self.index.tokens[starts + within[at]]
            documents[at] = epoch * len(self.index) + k
        return tokens, documents

    def rows(self, stream_rows: np.ndarray) -> Example:
        """Those stream rows (row g: stream tokens [g L, (g+1) L))."""
        count, length = len(stream_rows), self.seq_len
        # int64 positions: exact up to 2**63 tokens of stream (~10**9 years of training)
        positions = (stream_rows[:, None] * length + np.arange(length)).ravel()
        tokens, documents = self._tokens_at(positions)
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


def _kept(cache: dict[int, Any], key: int, make: Callable[[], Any]) -> Any:
    """cache[key], made if missing; the lowest keys beyond the newest _KEPT are dropped."""
    if key not in cache:
        if len(cache) >= _KEPT:
            del cache[min(cache)]
        cache[key] = make()
    return cache[key]


def stream_batches(rows: StreamRows, global_batch: int, first_row: int,
                   local_rows: int) -> grain.MapDataset:
    """Batch i: this process's rows first_row .. first_row + local_rows - 1 of global batch i."""
    return grain.MapDataset.range(2**62).map(lambda i: rows.rows(rows.stream_rows(
        np.arange(i * global_batch + first_row, i * global_batch + first_row + local_rows))))
