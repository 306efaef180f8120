"""The device mesh and logical-axis rules: the one module that knows mesh axis names.

The model names logical axes on its params; config maps each logical axis to mesh axes; this module
turns both into NamedShardings for params, optimizer state and batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import MeshConfig
from jaxlm.errors import UserError

BATCH = "batch"  # logical name of the leading axis of every input batch
MESH_AXES = ("data", "fsdp", "tensor")  # the mesh axes the rules may map logical axes onto
# Each device replicates what the mesh does not split (by default params and optimizer state).
MAX_AUTO_CPU_DEVICES = 8

# (mesh, rules) while a step is traced, so the model can constrain activations by logical names.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "jaxlm_sharding", default=None
)
# A device of the mesh being traced for, kept inside per-device shard_maps too.
_DEVICE: contextvars.ContextVar[jax.Device | None] = contextvars.ContextVar(
    "jaxlm_device", default=None
)


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """Mesh with the configured named axes; one size may be -1 for 'the remaining devices'."""
    devices = devices if devices is not None else jax.devices()
    sizes = mesh_sizes(cfg, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(AxisType.Auto,) * len(sizes),
        devices=devices,
    )


def mesh_sizes(cfg: MeshConfig, device_count: int) -> dict[str, int]:
    """The mesh axes' sizes over `device_count` devices (the -1 axis filled in)."""
    sizes = dict(cfg.axes)
    unknown = [name for name in sizes if name not in MESH_AXES]
    if unknown:
        raise UserError(f"mesh.axes: unknown axis '{unknown[0]}'; the mesh axes are "
                        f"{', '.join(MESH_AXES)}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise UserError(f"mesh.axes: only one axis may be -1, got {fill}")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise UserError(f"mesh.axes.{name} must be positive or -1, got {size}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if device_count % known:
        raise UserError(
            f"mesh.axes {sizes} need a multiple of {known} devices but {device_count} are present; "
            "change mesh.axes so their product divides the device count"
        )
    if fill:
        sizes[fill[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise UserError(
            f"mesh.axes {sizes} use {math.prod(sizes.values())} devices but {device_count} are "
            "present; set one axis to -1 or make the product equal the device count"
        )
    return sizes


def use_cpu_devices(cfg: MeshConfig, batch_size: int, microbatches: int,
                    single_process: bool) -> None:
    """Sets how many XLA:CPU devices jax makes (before its backends start): mesh.cpu_devices, or
    with null on a single process `auto_cpu_devices`. A count XLA_FLAGS or JAX_NUM_CPU_DEVICES
    already gives wins, and so do backends already started (jaxlm called inside a program that
    used jax). Accelerator hosts are unaffected: their mesh is made of their accelerators."""
    from jax._src import xla_bridge  # no public way to ask whether the backends have started

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if jax.config.jax_num_cpu_devices != -1 or (cfg.cpu_devices is None and not single_process):
        return
    if xla_bridge.backends_are_initialized():
        if cfg.cpu_devices is not None:
            raise UserError("mesh.cpu_devices applies when jax starts; this process already "
                            "started it: run `jaxlm train` in a new process")
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = cfg.cpu_devices or auto_cpu_devices(cfg, batch_size, microbatches, cores or 1)
    jax.config.update("jax_num_cpu_devices", count)


def auto_cpu_devices(cfg: MeshConfig, batch_size: int, microbatches: int, cores: int) -> int:
    """How many XLA:CPU devices a single-process CPU run makes: one per core (at most
    MAX_AUTO_CPU_DEVICES) that the batch divides, where the mesh's -1 axis only splits the batch
    (data parallelism over the cores beats one device running each small op on all of them,
    docs/benchmarks.md); else 1, jax's default."""
    fill = [axis for axis, size in cfg.axes.items() if size == -1]
    batch_axes = cfg.rules.get(BATCH, ())
    if len(fill) != 1 or fill[0] not in batch_axes or any(
            fill[0] in axes for name, axes in cfg.rules.items() if name != BATCH):
        return 1
    for count in range(min(cores, MAX_AUTO_CPU_DEVICES), 1, -1):
        try:
            sizes = mesh_sizes(cfg, count)
        except UserError:
            continue
        shards = math.prod(sizes.get(axis, 1) for axis in batch_axes)
        if batch_size % (shards * microbatches) == 0:
            return count
    return 1


def fit_axes(axes: dict[str, int], device_count: int) -> dict[str, int]:
    """Mesh axes like `axes` for `device_count` devices (a run's mesh where it is read back).

    Each fixed size keeps its largest divisor that still fits the devices left, in order, so
    model-parallel axes survive where they can; the axis that was -1 (else the first) takes the
    remaining devices. Sizes only shrink to divisors, so params that split before still split.
    """
    rest = next((name for name, size in axes.items() if size == -1), next(iter(axes)))
    fitted, left = {}, device_count
    for name, size in axes.items():
        if name != rest:
            fitted[name] = math.gcd(size, left)
            left //= fitted[name]
    return {name: fitted.get(name, left) for name in axes}


def axis_rules(cfg: MeshConfig, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """Logical -> mesh rules in the form `nnx.logical_axis_rules` takes."""
    rules = []
    for logical, mesh_axes in cfg.rules.items():
        for axis in mesh_axes:
            if axis not in mesh.axis_names:
                raise UserError(
                    f"mesh.rules.{logical} names mesh axis '{axis}', which is not one of "
                    f"{list(mesh.axis_names)}"
                )
        rules.append((logical, mesh_axes if mesh_axes else None))
    return tuple(rules)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: tuple) -> Any:
    """NamedShardings for an (abstract) nnx state whose Variables carry logical axis names."""
    with nnx.logical_axis_rules(rules):
        return nnx.get_named_sharding(abstract_state, mesh)


def batch_sharding(mesh: Mesh, rules: tuple) -> NamedSharding:
    """Batch rows split over the mesh axes the 'batch' rule names; the rest replicated."""
    mesh_axes = dict(rules).get(BATCH)
    return NamedSharding(mesh, PartitionSpec(mesh_axes))


def batch_shards(batch: NamedSharding) -> int:
    """How many slices the batch rows are split into."""
    return math.prod(batch.mesh.shape[a] for a in _batch_axes(batch))


def _batch_axes(batch: NamedSharding) -> tuple[str, ...]:
    """The mesh axes the batch rows are split over (its spec's first entry, as a tuple)."""
    axes = batch.spec[0] if batch.spec else None
    return (axes,) if isinstance(axes, str) else (axes or ())


def summed_over_batch_shards(fn: Callable, batch: NamedSharding) -> Callable:
    """`fn(replicated, rows)` run on each device's rows of the batch, its outputs (a pytree)
    summed over the batch's mesh axes in one all-reduce of one flat buffer.

    For data parallelism on XLA:CPU, where an all-reduce pays a device rendezvous per operand:
    a 4-layer model's 38 gradients and sums take 3.2 ms to reduce as XLA's combined all-reduce,
    0.6 ms as one buffer of the same bytes. Inside, every array is one device's, so activation
    layouts are not constrained. The buffer has the leaves' promoted dtype (float32 where any
    leaf is), so bfloat16 gradients are summed in float32."""
    axes = _batch_axes(batch)

    def local(replicated: Any, rows: Any) -> Any:
        token, device = _ACTIVE.set(None), _DEVICE.set(batch.mesh.devices.flat[0])
        try:
            out = fn(replicated, rows)
        finally:
            _ACTIVE.reset(token)
            _DEVICE.reset(device)
        flat, unravel = ravel_pytree(out)
        return unravel(jax.lax.psum(flat, axes))

    return jax.shard_map(local, mesh=batch.mesh, in_specs=(PartitionSpec(), batch.spec),
                         out_specs=PartitionSpec(), check_vma=False)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows into global arrays laid out by `sharding`."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()
    }


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: tuple) -> Iterator[None]:
    """Within this block, `constrain` lays activations out on `mesh` by `rules`."""
    token, device = _ACTIVE.set((mesh, rules)), _DEVICE.set(mesh.devices.flat[0])
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _DEVICE.reset(device)


def compute_device() -> jax.Device:
    """A device of the mesh being traced for: within `activation_sharding` or
    `summed_over_batch_shards` its mesh's (a dry run compiles for a TPU slice on a CPU host),
    else jax's default."""
    return _DEVICE.get() or jax.devices()[0]


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical axis names (no-op outside `activation_sharding`)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _spec(logical, rules)))


def shard_map_by_logical(
    fn: Callable, in_axes: tuple[tuple[str | None, ...], ...], out_axes: tuple[str | None, ...]
) -> Callable:
    """`fn` run on each device's shard, split by logical names, for kernels XLA cannot partition
    (Pallas calls); plain `fn` outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return fn
    mesh, rules = active
    in_specs = tuple(_spec(logical, rules) for logical in in_axes)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=_spec(out_axes, rules), check_vma=False
    )


def _spec(logical: tuple[str | None, ...], rules: tuple) -> PartitionSpec:
    mapping = dict(rules)
    return PartitionSpec(*(mapping.get(name) if name else None for name in logical))


def check_divisible(abstract_params: Any, mesh: Mesh, rules: tuple) -> None:
    """Every sharded param dimension must split evenly over its mesh axes."""
    mapping = dict(rules)
    for path, variable in nnx.to_flat_state(abstract_params):
        logical = variable.get_metadata().get("out_sharding") or ()
        for dim, name in zip(variable.shape, logical):
            axes = mapping.get(name) or ()
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                raise UserError(
                    f"param {'.'.join(map(str, path))} has a '{name}' dimension of {dim}, not "
                    f"divisible by mesh axes {list(axes)} (size {size}); change mesh.rules.{name} "
                    "or mesh.axes, or resize the model"
                )
