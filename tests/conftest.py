"""Shared fixtures. 8 host CPU devices are forced before jax is imported, so every test that shards
runs on a real multi-device mesh. XLA compiles at backend optimisation level 0: the suite's tiny
programs spend more time compiling than running, and this halves their compile time (the default
level is what users get; every comparison in the tests is between programs compiled alike: the
jaxlm processes tests start get the same level through `xla_flags`)."""

import os


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test process or of a jaxlm process a test starts: `devices` host devices."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig  # noqa: E402
from jaxlm.config import CheckpointConfig  # noqa: E402
from jaxlm.data import open_split, train_pipeline  # noqa: E402
from jaxlm.objectives import example_fn, row_length  # noqa: E402
from jaxlm.run import resolve  # noqa: E402
from jaxlm.sharding import global_batch  # noqa: E402
from jaxlm.state import make_setup  # noqa: E402
from jaxlm.tokenizer import ByteTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORDS = "def class return self import from for while if else yield lambda None True".split()


def write_corpus(directory: Path, n_files: int = 12, seed: int = 0) -> Path:
    """Small Python-like files whose content is a deterministic function of `seed`."""
    import random

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [
            f"def f{i}_{j}(x):\n    return {' '.join(rng.choices(WORDS, k=rng.randint(2, 9)))}\n"
            for j in range(rng.randint(3, 12))
        ]
        (directory / f"mod{i}.py").write_text("\n".join(lines))
    return directory


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests need XLA_FLAGS to force 8 host devices"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds_cache")


def tiny_config(corpus: Path, cache_dir: Path, run_dir: Path, **train) -> Config:
    """A model small enough that a step takes milliseconds on CPU."""
    return Config(
        name="test",
        seed=0,
        compilation_cache_dir=str(cache_dir / "xla"),
        model=ModelConfig(vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64,
                          scan_layers=True),  # the path of deep models (test_model unrolls it)
        data=DataConfig(
            dataset="text_files",
            paths=(str(corpus / "*.py"),),
            validation_percent=20.0,
            seq_len=32,
            cache_dir=str(cache_dir),
        ),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
        train=dataclasses.replace(
            TrainConfig(run_dir=str(run_dir), steps=6, batch_size=8, log_every=2, eval_every=0,
                        eval_batches=2),
            **train,
        ),
        checkpoint=CheckpointConfig(every=3, keep=5),
    )


def setup_and_batches(cfg, devices=None, n=1):
    """The step's setup and `n` batches of the objective's own pipeline, as `train` makes them."""
    cfg = resolve(cfg, ByteTokenizer())
    setup = make_setup(cfg, devices)
    source = open_split(cfg.data, "train")
    it = iter(train_pipeline(source, ByteTokenizer(), example_fn(cfg, ByteTokenizer(), source),
                             seq_len=row_length(cfg), global_batch=cfg.train.batch_size, seed=0))
    return setup, [global_batch(next(it), setup.batch_sharding) for _ in range(n)]


def step_moves_params_by_gradients(cfg: Config) -> Config:
    """Adam with eps 1, full learning rate from step 0, no clipping or decay: the first step
    moves each param by about minus its gradient (|g| << 1), so params after it compare the
    gradients (the default warmup starts at learning rate 0, so nothing would move)."""
    optimizer = dataclasses.replace(cfg.optimizer, learning_rate=1.0, warmup_steps=0, eps=1.0,
                                    weight_decay=0.0, grad_clip=0.0)
    return dataclasses.replace(cfg, optimizer=optimizer)


@pytest.fixture
def tiny_cfg(corpus, cache_dir, tmp_path) -> Config:
    return tiny_config(corpus, cache_dir, tmp_path / "run")


def config_file(tmp_path, corpus, cache_dir, **sections):
    """A tiny-model YAML config on the test corpus; `sections` update its sections."""
    raw = {
        "name": "cli",
        "compilation_cache_dir": str(cache_dir / "xla"),
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64,
                  "scan_layers": True},
        "data": {"dataset": "text_files", "paths": [str(corpus / "*.py")], "seq_len": 32,
                 "validation_percent": 20.0, "cache_dir": str(cache_dir)},
        "train": {"run_dir": str(tmp_path / "run"), "steps": 8, "batch_size": 8, "log_every": 4,
                  "eval_every": 0, "eval_batches": 2},
        "checkpoint": {"every": 4},
    }
    for section, values in sections.items():
        raw[section].update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli_env():
    return dict(os.environ, XLA_FLAGS=xla_flags(2))


def jaxlm_cli(*args, env: dict[str, str] | None = None):
    """Runs `python -m jaxlm ARGS` to completion, as a user would (2 CPU devices; `env` adds
    environment variables)."""
    return subprocess.run([sys.executable, "-m", "jaxlm", *map(str, args)], capture_output=True,
                          text=True, env={**_cli_env(), **(env or {})}, cwd=REPO, timeout=300)


def start_jaxlm(log: Path, *args):
    """Starts `python -m jaxlm ARGS` in the background (for signals and kills), output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "jaxlm", *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, env=_cli_env(), cwd=REPO)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes under `directory` by relative path (the run lock's holder note aside)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2-style (byte-level BPE, <|endoftext|> only) tokenizer.json."""
    from hf_tokenizer_files import byte_level_bpe

    return byte_level_bpe(tmp_path_factory.mktemp("hf_gpt2"))


@pytest.fixture(scope="session")
def hf_bert(tmp_path_factory) -> Path:
    """A tiny BERT-style (WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK]) tokenizer.json."""
    from hf_tokenizer_files import wordpiece_bert

    return wordpiece_bert(tmp_path_factory.mktemp("hf_bert"))


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory, corpus, cache_dir) -> dict[str, Path]:
    """Two finished runs for reports: 'finished' in one session, 'resumed' stopped at step 3 and
    continued to 6 with another learning rate (checkpoints 3 and 6, an eval at each)."""
    from jaxlm.train import train

    root = tmp_path_factory.mktemp("finished_runs")
    runs = {}
    for name, lr in (("finished", 3e-3), ("resumed", 1e-2)):
        cfg = tiny_config(corpus, cache_dir, root / name, eval_every=3)
        cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=lr))
        if name == "resumed":
            train(cfg, show_progress=False, stop_at=3)
        train(cfg, show_progress=False)
        runs[name] = root / name
    return runs
