"""TPU slices described without having them: `jaxlm train --dry-run --topology v5e-256` compiles
the real train step for that slice on any machine (a CPU laptop included) through libtpu's
compile-only topology description.

Slice names are Cloud TPU's accelerator types: v5e-N / v6e-N count chips (2-D tori), v4-N / v5p-N
count TensorCores, two per chip (3-D tori, one JAX device per chip as on the pods). libtpu's own
names (`v5e:16x16`, `v4:4x4x8`) are accepted as they are.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from jaxlm.errors import UserError

INSTALL = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Generation:
    libtpu: str  # libtpu's name of the chip
    cores_in_name: int  # TensorCores per chip that the slice name counts
    dims: int  # torus dimensions
    hbm_gib: int  # HBM per chip (one JAX device)
    options: tuple = ()  # libtpu topology options


GENERATIONS = {
    "v4": Generation("v4", 2, 3, 32, (("chip_config_name", "megacore"),)),
    "v5p": Generation("v5p", 2, 3, 95),
    "v5e": Generation("v5e", 1, 2, 16),
    "v5litepod": Generation("v5e", 1, 2, 16),
    "v6e": Generation("v6e", 1, 2, 32),
}
_SLICE = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")
_LIBTPU = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    libtpu_name: str  # e.g. v5e:16x16
    hbm_bytes: int  # per device
    devices: list  # compile-only TPU devices


def torus(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's shape of a slice of `chips` chips: from 2x2(x1), the smallest side (the last
    of equals) doubles, e.g. 256 chips -> 16x16 or 4x8x8."""
    if dims == 2 and chips == 1:
        return (1, 1)
    if chips < 4 or chips & (chips - 1):
        raise UserError(f"a slice of {chips} chips is not a TPU slice size (1 or a power of two >= 4)")
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        index = max(i for i, side in enumerate(shape) if side == smallest)
        shape[index] *= 2
    return tuple(shape)


def parse(name: str) -> tuple[Generation, str]:
    """(generation, libtpu topology name) of a slice name such as v5e-256, v4-32 or v5e:4x4."""
    if match := _LIBTPU.match(name):
        return GENERATIONS[match[1]], name
    match = _SLICE.match(name)
    if not match:
        raise UserError(
            f"--topology {name!r} is not a TPU slice: use a Cloud TPU type such as v5e-256, v6e-64, "
            "v4-32 or v5p-128, or a libtpu topology such as v5e:4x4"
        )
    generation, count = GENERATIONS[match[1]], int(match[2])
    if count % generation.cores_in_name:
        raise UserError(f"--topology {name}: {match[1]} slices count {generation.cores_in_name} cores per chip")
    shape = torus(count // generation.cores_in_name, generation.dims)
    return generation, f"{generation.libtpu}:{'x'.join(map(str, shape))}"


def describe(name: str) -> Topology:
    """The compile-only devices of a TPU slice; libtpu missing is a UserError saying what to install."""
    generation, libtpu_name = parse(name)
    # Off a TPU VM, libtpu looks for the VM's own slice and workers and prints errors about not
    # finding them; a compile-only description needs neither (a TPU VM's own values are kept).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(libtpu_name, "tpu", **dict(generation.options)).devices
    except RuntimeError as err:  # jax's JaxRuntimeError (libtpu's own errors) included
        reason = _why_no_topology(err, name, libtpu_name)
        if reason is None:
            raise
        raise UserError(reason) from None
    return Topology(name, libtpu_name, generation.hbm_gib * 2**30, list(devices))


def _why_no_topology(err: RuntimeError, name: str, libtpu_name: str) -> str | None:
    """What to tell the user for a failure to describe the slice; None: not a known failure."""
    message = str(err)
    first_line = message.partition("\n")[0]
    if "TPU support not installed" in message:
        return (f"compiling for --topology {name} needs libtpu, which is not installed: {INSTALL} "
                "(or pip install 'jax[tpu]'); it runs on a CPU-only machine too")
    if "libtpu_lockfile" in message:
        return (f"libtpu could not take its lock file ({first_line}): another process on this "
                "machine may hold libtpu; run the dry run when it has ended, or remove the file "
                "if none does")
    if isinstance(err, jax.errors.JaxRuntimeError):
        return f"libtpu has no topology {libtpu_name} ({first_line})"
    return None
