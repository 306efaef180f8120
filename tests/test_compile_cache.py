"""The persistent compilation cache: a second command on a run loads its programs, not compiles."""

import jax
import pytest

from conftest import jaxlm_cli
from jaxlm.compile_cache import use_compilation_cache
from jaxlm.errors import UserError

LOG_COMPILES = {"JAX_LOG_COMPILES": "true"}  # jax then logs each persistent-cache hit


def test_a_second_eval_loads_the_eval_step_from_the_cache(finished_runs, tmp_path):
    cache = tmp_path / "xla"
    args = ("eval", "--run", finished_runs["finished"], "--batches", "1",
            "--set", f"compilation_cache_dir={cache}")
    first = jaxlm_cli(*args, env=LOG_COMPILES)
    assert first.returncode == 0, first.stderr
    assert "cache hit for 'jit_eval_step'" not in first.stderr
    assert any(p.name.startswith("jit_eval_step") for p in cache.iterdir())
    second = jaxlm_cli(*args, env=LOG_COMPILES)
    assert second.returncode == 0, second.stderr
    assert "cache hit for 'jit_eval_step'" in second.stderr


def test_an_empty_directory_turns_the_cache_off(tmp_path):
    use_compilation_cache(str(tmp_path / "xla"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    use_compilation_cache("")
    assert jax.config.jax_compilation_cache_dir is None


def test_a_file_as_the_cache_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="compilation_cache_dir .* cannot be created"):
        use_compilation_cache(str(tmp_path / "afile"))
