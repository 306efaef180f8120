"""JAX's persistent compilation cache, so a second `eval`, `generate` or resumed `train` on the same
run loads its compiled programs instead of compiling them again."""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

# Cache every program that took longer than this to compile: small enough that a tiny model's
# step is kept, large enough that the one-op programs jnp dispatches are not written to disk.
MIN_COMPILE_SECONDS = 0.1


def use_compilation_cache(directory: str) -> None:
    """Points JAX's cache at `directory` ("" turns it off). JAX reads the setting once, at its first
    compile, so a different directory later in the same process needs the cache reset."""
    path = os.path.expanduser(directory) if directory else None  # a gs:// path stays one
    if jax.config.jax_compilation_cache_dir == path:
        return
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()
