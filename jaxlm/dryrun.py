"""`jaxlm train --dry-run`: compile the sharded train step without data and report what a job
would need per device, so a pod job's fit is checked before it is launched."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlm.config import Config
from jaxlm.data import config_empty_batch
from jaxlm.state import Setup, check_batch_size, make_setup, make_train_step


def _per_device_bytes(tree: Any) -> int:
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def _param_table(setup: Setup) -> list[str]:
    shardings = dict(nnx.to_flat_state(setup.shardings["params"]))
    lines = []
    for path, variable in nnx.to_flat_state(setup.abstract["params"]):
        logical = variable.get_metadata().get("out_sharding")
        lines.append(
            f"  {'.'.join(map(str, path)):<36} {str(tuple(variable.shape)):<20} "
            f"{str(logical):<36} {shardings[path].get_value().spec}"
        )
    return lines


def dry_run(cfg: Config, devices: list[jax.Device] | None = None,
            hbm_bytes: int | None = None) -> dict[str, Any]:
    """Lowers and compiles one train step for the configured mesh on `devices` (default: all; or
    the compile-only devices of a TPU topology); prints and returns the report, with whether the
    step fits in `hbm_bytes` per device (default: the first device's memory limit, if it has one)."""
    setup = make_setup(cfg, devices)
    check_batch_size(cfg, setup)
    shapes_only = config_empty_batch(cfg, cfg.train.batch_size, 0)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
                      for k, v in shapes_only.items()}
    abstract_state = setup.abstract_sharded()
    report = {
        "mesh": dict(setup.mesh.shape),
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract["params"])),
        "params_bytes_per_device": _per_device_bytes(abstract_state["params"]),
        "optimizer_bytes_per_device": _per_device_bytes(abstract_state["opt"]),
        "batch_bytes_per_device": _per_device_bytes(abstract_batch),
    }
    hbm_bytes = hbm_bytes or _memory_limit(setup.mesh.devices.flat[0])
    if hbm_bytes:
        report["hbm_bytes_per_device"] = hbm_bytes
    try:
        compiled = make_train_step(setup).lower(abstract_state, abstract_batch).compile()
    except jax.errors.JaxRuntimeError as err:  # the TPU compiler refuses what exceeds HBM
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        report |= {"fits": False, "compiler": str(err).strip().splitlines()[0]}
    else:
        report |= _compiled_memory(compiled.memory_analysis())
        if hbm_bytes and "compiled_peak_bytes_estimate" in report:
            report["fits"] = report["compiled_peak_bytes_estimate"] <= hbm_bytes
    if jax.process_index() == 0:
        _print(setup, report)
    return report


def _compiled_memory(memory: Any) -> dict[str, int]:
    if memory is None:
        return {}
    return {
        "compiled_argument_bytes": memory.argument_size_in_bytes,
        "compiled_output_bytes": memory.output_size_in_bytes,
        "compiled_alias_bytes": memory.alias_size_in_bytes,
        "compiled_temp_bytes": memory.temp_size_in_bytes,
        "compiled_peak_bytes_estimate": memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes,
    }


def _memory_limit(device: jax.Device) -> int | None:
    """Bytes a device can hold, where its runtime says (GPUs and TPUs do; CPU does not)."""
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - compile-only and CPU devices have no stats to give
        return None


def _print(setup: Setup, report: dict[str, Any]) -> None:
    print(f"  {'param':<36} {'shape':<20} {'logical axes':<36} mesh sharding")
    print("\n".join(_param_table(setup)))
    for key, value in report.items():
        if key not in ("fits", "compiler"):
            shown = f"{value / 2**20:,.1f} MiB" if key.endswith("bytes") or "bytes_" in key else value
            print(f"{key}: {shown}")
    if "fits" not in report:
        return
    limit = report.get("hbm_bytes_per_device")
    hbm = f"{limit / 2**30:,.0f} GiB HBM per device" if limit else "device memory"
    if "compiler" in report:
        print(f"does not fit in {hbm}: {report['compiler']}")
    else:
        peak = report["compiled_peak_bytes_estimate"] / 2**30
        print(f"{'fits' if report['fits'] else 'does not fit'} in {hbm}: peak estimate {peak:,.2f} GiB")
