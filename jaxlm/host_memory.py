"""How the process's C heap (glibc malloc) treats XLA:CPU's and Orbax's host buffers.

Both settings must be made before the threads that allocate start (a thread takes its heap arena
at its first allocation, and keeps it), so the CLI makes them before jax starts its backends.
No-ops where malloc is not glibc's (macOS, musl, a preloaded tcmalloc)."""

from __future__ import annotations

import ctypes
import glob
import os
import sys

from jaxlm.errors import UserError

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: freed memory above 2 GiB still returns
# Device files of the accelerators jax drives (NVIDIA, TPU through accel or VFIO, AMD ROCm).
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*",
                            "/dev/kfd")
SWITCH, KEEP = "JAXLM_MALLOC", "keep"  # JAXLM_MALLOC=keep: `keep_freed_memory` applies


def _mallopt(*settings: tuple[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def one_arena() -> bool:
    """Conversions hold a model's worth of host buffers that Orbax's and TensorStore's threads
    allocate and free; glibc gives each thread its own heap arena and returns little of them, so
    the peak grows with the thread count. One arena keeps GPT-2 124M's import at ~1.4x the
    checkpoint's size instead of 1.6-1.9x (docs/benchmarks.md)."""
    return _mallopt((M_ARENA_MAX, 1))


def computes_on_cpu(platforms: str | None = None) -> bool:
    """Whether jax will compute on the CPU, known before its backends start: the first of
    `platforms` (default: jax_platforms, JAX_PLATFORMS) where set, else whether the host has no
    accelerator."""
    import jax  # here: the CLI imports this module, and jax only where a command needs it

    platforms = jax.config.jax_platforms if platforms is None else platforms
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def keep_freed_memory() -> bool:
    """With JAXLM_MALLOC=keep, where the CPU computes: one glibc arena that neither maps nor
    trims big blocks, so a step's freed temp buffer is handed to the next step.

    XLA:CPU mallocs each call's temp buffer on a worker thread and frees it when the call ends;
    glibc maps a request over its mmap threshold (32 MiB at most) afresh and unmaps it on free,
    so every step faulted a big temp buffer's pages in again (25M: 1.2 GiB per step). Opt-in
    because it is a trade: faster steps with big temp buffers, slower ones with small buffers
    (device threads share the arena) and more resident memory (docs/benchmarks.md, "The C
    heap"). Returns whether glibc took the settings."""
    switch = os.environ.get(SWITCH, "")
    if switch not in ("", KEEP):
        raise UserError(f"{SWITCH}={switch!r} is not a setting: set it to {KEEP!r} (keep the C "
                        "heap's freed blocks for the next step) or leave it unset")
    if switch != KEEP or not computes_on_cpu():
        return False
    return _mallopt((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
