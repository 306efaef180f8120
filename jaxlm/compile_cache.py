"""JAX's persistent compilation cache, so a second `eval`, `generate` or resumed `train` on the same
run loads its compiled programs instead of compiling them again."""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from jaxlm.errors import UserError
from jaxlm.storage import is_remote

# Cache every program that took longer than this to compile: small enough that a tiny model's
# step is kept, large enough that the one-op programs jnp dispatches are not written to disk.
MIN_COMPILE_SECONDS = 0.1


def use_compilation_cache(directory: str) -> None:
    """Points JAX's cache at `directory` ("" turns it off). JAX reads the setting once, at its first
    compile, so a different directory later in the same process needs the cache reset."""
    path = os.path.expanduser(directory) if directory else None  # a gs:// path stays one
    if jax.config.jax_compilation_cache_dir == path:
        return
    if path is not None and not is_remote(path):
        _check_writable(path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()


def _check_writable(path: str) -> None:
    """A local cache directory that cannot be written is refused before any work: JAX would only
    warn at every compile and compile without it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"compilation_cache_dir {path} cannot be created ({err.strerror}); point "
                        "it at a writable directory, or set it to '' to compile without it") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"compilation_cache_dir {path} is not writable; point it at a writable "
                        "directory, or set it to '' to compile without it")
