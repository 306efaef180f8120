"""AOT compile of the real train step for TPU slices on this CPU-only machine, through libtpu's
compile-only topology description (libtpu comes with the dev extra)."""

import select
import subprocess
import sys

import pytest
from conftest import REPO, _cli_env, config_file, jaxlm_cli

from jaxlm.cli import main
from jaxlm.errors import UserError
from jaxlm.topology import parse


@pytest.mark.parametrize("name, libtpu_name, hbm_gib", [
    ("v5e-256", "v5e:16x16", 16), ("v5litepod-16", "v5e:4x4", 16), ("v5e-1", "v5e:1x1", 16),
    ("v6e-64", "v6e:8x8", 32), ("v4-8", "v4:2x2x1", 32), ("v4-32", "v4:2x2x4", 32),
    ("v4-256", "v4:4x4x8", 32), ("v5p-128", "v5p:4x4x4", 95), ("v5e:2x4", "v5e:2x4", 16),
])
def test_slice_names_map_to_libtpu_topologies(name, libtpu_name, hbm_gib):
    generation, topology = parse(name)
    assert topology == libtpu_name and generation.hbm_gib == hbm_gib


@pytest.mark.parametrize("name", ["v5e-3", "v4-6", "tpu-8", "v5e:2x4x4x4"])
def test_a_name_that_is_no_slice_is_a_one_line_error(name):
    with pytest.raises(UserError, match="TPU slice"):
        parse(name)


@pytest.mark.parametrize("name, devices", [("v5e-8", 8), ("v4-8", 4)])
def test_the_tiny_config_compiles_for_a_small_slice_on_cpu(name, devices, tmp_path, corpus, cache_dir):
    cfg = config_file(tmp_path, corpus, cache_dir)
    proc = jaxlm_cli("train", "--dry-run", "--topology", name, "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"compiling for {name} (" in lines[0] and f", {devices} devices)" in lines[0]
    assert f"mesh: {{'data': {devices}, 'fsdp': 1, 'tensor': 1}}" in lines
    assert any(line.startswith("compiled_peak_bytes_estimate: ") for line in lines)
    assert lines[-1].startswith(f"fits in {16 if name == 'v5e-8' else 32} GiB HBM per device: peak estimate")
    assert proc.stderr == ""  # libtpu's complaints about the absent TPU VM are kept quiet


def test_a_config_that_does_not_fit_exits_1_with_the_numbers(tmp_path, corpus, cache_dir):
    cfg = config_file(tmp_path, corpus, cache_dir, model={"d_model": 8192, "d_ff": 32768, "n_heads": 64})
    proc = jaxlm_cli("train", "--dry-run", "--topology", "v5e-4", "--config", cfg)
    assert proc.returncode == 1, proc.stderr
    assert "params_bytes_per_device: " in proc.stdout
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith("does not fit in 16 GiB HBM per device: ") and "G" in verdict


def test_without_libtpu_exit_2_says_what_to_install(tmp_path, corpus, cache_dir, monkeypatch, capsys):
    from jax._src import xla_bridge
    from jax._src.lib import xla_client

    assert not xla_client.pjrt_plugin_loaded("tpu")  # the tests above compiled in subprocesses
    monkeypatch.setattr(xla_bridge, "get_tpu_library_path", lambda: None)  # as without libtpu
    cfg = config_file(tmp_path, corpus, cache_dir)
    assert main(["train", "--dry-run", "--topology", "v5e-8", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "jaxlm: error: compiling for --topology v5e-8 needs libtpu, which is not installed: "
        "pip install -e \".[tpu]\" (or pip install 'jax[tpu]'); it runs on a CPU-only machine too"]


HOLD_LIBTPU = """
from jaxlm.topology import describe
describe("v5e-8")
print("holding", flush=True)
input()
"""


def test_a_dry_run_while_another_process_holds_libtpu_is_a_one_line_error(tmp_path, corpus,
                                                                          cache_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LIBTPU], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_cli_env(), cwd=REPO)
    try:
        assert select.select([holder.stdout], [], [], 120)[0], "the holder never took libtpu"
        assert holder.stdout.readline() == "holding\n"
        cfg = config_file(tmp_path, corpus, cache_dir)
        proc = jaxlm_cli("train", "--dry-run", "--topology", "v5e-8", "--config", cfg)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("jaxlm: error: libtpu could not take its lock file (")
    assert line.endswith("another process on this machine may hold libtpu; run the dry run when "
                         "it has ended, or remove the file if none does")


def test_topology_without_dry_run_is_refused(capsys):
    assert main(["train", "--topology", "v5e-8"]) == 2
    assert "use it with --dry-run" in capsys.readouterr().err
