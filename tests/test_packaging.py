"""jaxlm as a user installs it, from a wheel or editable, in a fresh virtual environment, run from
another directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, xla_flags

BUILD_INPUTS = ("pyproject.toml", "README.md", "jaxlm", "configs")


@pytest.fixture(scope="module", params=["wheel", "editable"])
def installed(request, tmp_path_factory) -> tuple[Path, Path]:
    """(venv, where its jaxlm must come from): jaxlm installed from a copy of the checkout, as a
    freshly built wheel or editable; jax and the rest come from the system site-packages."""
    root = tmp_path_factory.mktemp(request.param)
    source = root / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root / "venv")
    install = [sys.executable, "-m", "pip", "--python", root / "venv" / "bin" / "python", "install",
               "-q", "--no-deps", "--no-index", "--ignore-installed", "--no-build-isolation"]
    if request.param == "editable":
        _run(*install, "-e", source)
        return root / "venv", source
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", root / "dist", source)
    (wheel,) = (root / "dist").glob("jaxlm-*.whl")
    _run(*install, wheel)
    return root / "venv", root / "venv"


def _run(*args, cwd=None):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, XLA_FLAGS=xla_flags(2)),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_the_venv_imports_its_install_not_the_checkout(installed, tmp_path):
    venv, origin = installed
    proc = _run(venv / "bin" / "python", "-c", "import jaxlm; print(jaxlm.__file__)", cwd=tmp_path)
    assert proc.stdout.strip().startswith(str(origin))


def test_help_names_the_shipped_default(installed, tmp_path):
    proc = _run(installed[0] / "bin" / "jaxlm", "train", "--help", cwd=tmp_path)
    assert "default: tiny_clm" in " ".join(proc.stdout.split())


def test_installed_jaxlm_trains_a_shipped_config_by_name(installed, tmp_path, corpus, cache_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings = {
        "model.d_model": 32, "model.n_heads": 2, "model.n_layers": 2, "model.d_ff": 64,
        "model.max_seq_len": 64, "data.dataset": "text_files", "data.paths": f"[{corpus}/*.py]",
        "data.validation_percent": 20, "data.seq_len": 32, "data.cache_dir": cache_dir,
        "train.steps": 3, "train.batch_size": 8, "train.eval_batches": 1,
        "train.run_dir": tmp_path / "run", "checkpoint.every": 3,
    }
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    _run(installed[0] / "bin" / "jaxlm", "train", "--config", "tiny_clm", "--no-progress",
         *overrides, cwd=elsewhere)
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    assert os.listdir(elsewhere) == []  # nothing written relative to the working directory
