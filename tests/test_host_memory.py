import json
import statistics
import subprocess
import sys

import pytest

from conftest import REPO, xla_flags
from jaxlm import host_memory
from jaxlm.cli import main

# A process that keeps the C heap as the CLI does with JAXLM_MALLOC=keep, then calls a jitted
# function whose temp buffer (256 MiB, above what glibc serves without mmap) is freed after each
# call. The heap grows in some of the first calls (small blocks split freed big ones; a call's
# buffer may be freed after the next call allocated its own), then settles: most later calls
# fault nothing in.
REPEATED_CALLS = """
import json, resource
from jaxlm.host_memory import keep_freed_memory
kept = keep_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def temp_heavy(x):
    y = jax.lax.optimization_barrier(jnp.exp(x))
    return jnp.sum(y * y[::-1])

x = jnp.ones(2**25, jnp.float32)
temp = temp_heavy.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    temp_heavy(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "temp_pages": temp // 4096, "faults": faults}))
"""


def test_a_kept_heap_hands_the_freed_temp_buffer_to_the_next_call():
    done = subprocess.run([sys.executable, "-c", REPEATED_CALLS], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=True,
                          env={"PATH": "", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
                               host_memory.SWITCH: host_memory.KEEP})
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["kept"] and result["temp_pages"] * 4096 >= 2**28
    assert statistics.median(result["faults"][15:]) < result["temp_pages"] / 100


@pytest.mark.parametrize("platforms, device_files, on_cpu", [
    ("cpu", ["/dev/nvidia0"], True),
    ("cuda", [], False),
    ("tpu,cpu", [], False),
    ("", [], True),
    ("", ["/dev/accel0"], False),
])
def test_computes_on_cpu_follows_jax_platforms_then_the_host_devices(
        monkeypatch, tmp_path, platforms, device_files, on_cpu):
    for name in device_files:
        (tmp_path / name.removeprefix("/dev/")).touch()
    monkeypatch.setattr(host_memory, "ACCELERATOR_DEVICE_FILES",
                        tuple(f"{tmp_path}/{p.removeprefix('/dev/')}"
                              for p in host_memory.ACCELERATOR_DEVICE_FILES))
    assert host_memory.computes_on_cpu(platforms) is on_cpu


def test_computes_on_cpu_reads_jax_platforms():
    assert host_memory.computes_on_cpu() is True  # conftest sets JAX_PLATFORMS=cpu


@pytest.mark.parametrize("switch", [None, ""])
def test_glibcs_defaults_stay_unless_jaxlm_malloc_is_keep(monkeypatch, switch):
    if switch is None:
        monkeypatch.delenv(host_memory.SWITCH, raising=False)
    else:
        monkeypatch.setenv(host_memory.SWITCH, switch)
    monkeypatch.setattr(host_memory, "computes_on_cpu", lambda: True)
    monkeypatch.setattr(host_memory, "_mallopt", lambda *settings: pytest.fail("mallopt called"))
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("command", ["train", "eval"])
def test_an_unknown_jaxlm_malloc_stops_train_and_eval_with_one_line(monkeypatch, capsys, command):
    monkeypatch.setenv(host_memory.SWITCH, "kept")
    assert main([command, "--config" if command == "train" else "--run", "missing"]) == 2
    assert capsys.readouterr().err == (
        "jaxlm: error: JAXLM_MALLOC='kept' is not a setting: set it to 'keep' (keep the C heap's "
        "freed blocks for the next step) or leave it unset\n")
