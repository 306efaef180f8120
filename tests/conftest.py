"""Shared fixtures. 8 host CPU devices are forced before jax is imported, so every test that shards
runs on a real multi-device mesh."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig  # noqa: E402
from jaxlm.config import CheckpointConfig  # noqa: E402

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
        model=ModelConfig(vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64),
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


@pytest.fixture
def tiny_cfg(corpus, cache_dir, tmp_path) -> Config:
    return tiny_config(corpus, cache_dir, tmp_path / "run")
