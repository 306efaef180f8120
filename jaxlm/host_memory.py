"""How the process's C heap (glibc malloc) treats XLA:CPU's and Orbax's host buffers.

Both settings must be made before the threads that allocate start (a thread takes its heap arena
at its first allocation, and keeps it), so the CLI makes them before jax starts its backends.
No-ops where malloc is not glibc's (macOS, musl, a preloaded tcmalloc)."""

from __future__ import annotations

import ctypes
import glob
import os

import jax

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: freed memory above 2 GiB still returns
# Device files of the accelerators jax drives (NVIDIA, TPU through accel or VFIO, AMD ROCm).
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*",
                            "/dev/kfd")
OPT_OUT = "JAXLM_MALLOC"  # =system: leave glibc's defaults


def _mallopt(*settings: tuple[int, int]) -> bool:
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
    platforms = jax.config.jax_platforms if platforms is None else platforms
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def keep_freed_memory() -> bool:
    """XLA:CPU allocates each call's temp buffer (1.2 GiB for the 25M train step) with malloc on
    a worker thread and frees it when the call ends. glibc maps any request over its mmap
    threshold (32 MiB at most) afresh and unmaps it on free, so every step faulted all of its
    pages in again (25M: 318k page faults per step, a sixth of the two cores' time in the
    kernel). One arena that neither maps nor trims big blocks hands the same pages to the next
    step. Measured (docs/benchmarks.md): tiny_clm's step 74 -> 60 ms, the 25M step 1.9-2.1 ->
    1.63-1.68 s; the price is resident memory, as blocks freed by one step are partly reused
    for small ones and the heap grows for a few steps before it settles (25M on two devices:
    peak RSS 2.7 -> 4.0 GiB; one device: no change). Only where the CPU computes (an
    accelerator's temp buffers are device memory), unless JAXLM_MALLOC=system. Returns whether
    the settings were made."""
    if os.environ.get(OPT_OUT) == "system" or not computes_on_cpu():
        return False
    return _mallopt((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
