"""Joining a multi-process job (TPU pod hosts, SLURM tasks, several GPU processes, CPU + gloo)."""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils


def _cluster_detected() -> bool:
    """Environments where `jax.distributed.initialize()` finds its peers by itself."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def joins_job(coordinator: str | None) -> bool:
    """Whether this process is one of several (explicit coordinator or a detected cluster)."""
    return coordinator is not None or _cluster_detected()


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Calls `jax.distributed.initialize` when this run is one of several processes.

    Explicit flags win; otherwise TPU pods, SLURM and the standard JAX environment variables are
    detected. A single process on its own is left alone.
    """
    if not joins_job(coordinator):
        return
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    # CPU (gloo) collectives give up if a peer joins its first collective 30 s late, which a
    # loaded host can exceed (one process compiling while the other waits). Meet at a
    # coordination-service barrier (generous timeout) and run the first collective together.
    _coordination_client().wait_at_barrier("jaxlm-start", 600_000)
    multihost_utils.sync_global_devices("jaxlm-start")


def _coordination_client():
    from jax._src import distributed as jax_distributed  # the client has no public accessor

    return jax_distributed.global_state.client
