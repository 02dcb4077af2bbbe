"""GPU preflight: a GPU run on a node that cannot run the installed torch stops in seconds with one line.

The version rule is checked against NVIDIA's published minimum drivers (CUDA Toolkit release notes: CUDA 12.x needs
>= 525.60.13, CUDA 13.x >= 580.65.06 under minor-version compatibility), written here by hand. The end-to-end test
declares a GPU on a real Ray node of this GPU-less machine: Ray schedules the GPU worker there, exactly as on a
cluster node whose driver is missing or too old.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msad.engine.gpu import GpuUnusableError, check_gpu_usable, driver_problem, gpu_error_line

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("torch_cuda, driver_cuda, release, expected", [
    ("13.0", 13000, "580.65.06", None),  # CUDA 13.0's own GA driver
    ("13.0", 13020, "595.71.05", None),  # a newer 13.x driver runs a 13.0 build
    ("12.8", 13000, "580.82.07", None),  # a 13.x driver runs 12.x builds
    ("12.8", 12080, "570.133.20", None),
    ("12.8", 12040, "550.54.14", None),  # minor-version compatibility within 12.x
    ("13.0", 12080, "570.133.20", "NVIDIA driver 570.133.20 supports CUDA 12.8, but torch 2.14.1+cu130 needs "
                                  "CUDA 13.0 (NVIDIA driver >= 580.65.06)"),
    ("12.8", 11080, "470.256.02", "NVIDIA driver 470.256.02 supports CUDA 11.8, but torch 2.14.1+cu130 needs "
                                  "CUDA 12.8 (NVIDIA driver >= 525.60.13)"),
    ("13.0", None, None, "no NVIDIA driver found (libcuda.so.1 not loadable); torch 2.14.1+cu130 needs CUDA 13.0 "
                         "(NVIDIA driver >= 580.65.06)"),
    (None, None, None, "torch 2.14.1+cu130 is a CPU build; install a CUDA build of torch for distributed.use_gpu"),
])
def test_driver_rule(torch_cuda: str | None, driver_cuda: int | None, release: str | None,
                     expected: str | None) -> None:
    problem = driver_problem("2.14.1+cu130", torch_cuda, driver_cuda, release)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(expected)


@pytest.mark.parametrize("capability, arch_list, expected", [
    ((9, 0), ["sm_80", "sm_90", "compute_90"], True),
    ((8, 6), ["sm_80", "sm_90"], True),  # sm_80 cubins run on sm_86 (same major, higher minor)
    ((8, 0), ["sm_86", "sm_90"], False),  # not on a lower minor
    ((12, 0), ["sm_80", "sm_90", "compute_90"], True),  # PTX compiles for any newer GPU
    ((12, 0), ["sm_80", "sm_90"], False),  # cubins only: no kernel for a newer major
    ((7, 0), ["sm_75", "sm_80", "compute_80"], False),  # older than every target
    ((9, 0), ["sm_90a"], True), ((10, 0), ["sm_90a"], False),  # arch-specific targets: that GPU only
])
def test_architecture_rule(capability: tuple[int, int], arch_list: list[str], expected: bool) -> None:
    from msad.engine.gpu import arch_supported

    assert arch_supported(capability, arch_list) is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_check_without_cuda_names_node_and_need() -> None:
    with pytest.raises(GpuUnusableError) as info:
        check_gpu_usable("10.0.0.7 (node-a)")
    message = str(info.value)
    assert message.startswith("node 10.0.0.7 (node-a): ")
    assert f"torch {torch.__version__}" in message and "\n" not in message
    if torch.version.cuda:
        assert f"needs CUDA {torch.version.cuda}" in message


def test_error_line_out_of_rays_wrapped_text() -> None:
    text = ("Training failed due to controller error:\nray::execute.preflight_this_worker() (pid=1, ip=10.0.0.7)\n"
            "  File \"x.py\", line 3, in f\nmsad.engine.gpu.GpuUnusableError: node 10.0.0.7 (ab12): no NVIDIA driver "
            "found (libcuda.so.1 not loadable)\n")
    assert gpu_error_line(text) == "node 10.0.0.7 (ab12): no NVIDIA driver found (libcuda.so.1 not loadable)"
    assert gpu_error_line("RuntimeError: something else") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a node that cannot run CUDA")
def test_gpu_run_on_a_node_without_a_driver_stops_in_seconds(tmp_path: Path, shapes_cache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    holder = subprocess.Popen([sys.executable, str(REPO / "tests" / "data" / "two_node_cluster.py"),
                               "--head-cpus", "2", "--head-gpus", "1", "--worker-nodes", "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = holder.stdout.readline().strip()
        assert address, "the cluster with a declared GPU did not start"
        started = time.monotonic()
        # `--address auto` with RAY_ADDRESS set: what a `ray job submit` entrypoint on a cluster's head sees
        proc = subprocess.run([
            sys.executable, str(REPO / "launch.py"), "train", str(REPO / "configs" / "teacher_w025_cpu.yaml"),
            "--address", "auto", "distributed.use_gpu=true", "distributed.max_failures=3",
            f"distributed.storage_path={tmp_path}", f"data.shapes.cache_dir={shapes_cache}",
            "data.shapes.num_train=24", "data.shapes.num_val=6", "data.shapes.image_size=[96,128]",
            "data.shapes.object_size=[8,40]", "data.train_short_sides=[128]", "data.test_short_side=128",
            "data.num_workers=0", "model.fpn_channels=32", "model.gn_groups=8"],
            cwd=tmp_path, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - started
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # Ray's own logs aside
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-6000:]
    (last,) = errors
    assert last.startswith("error: run ") and " failed: node " in last, proc.stderr[-3000:]
    assert "no NVIDIA driver found" in last and "NVIDIA driver >= " in last
    assert "ProcessGroupNCCL" not in proc.stderr  # stopped before nccl, not inside it
    assert elapsed < 90  # Ray start-up plus one attempt: max_failures=3 retries were not spent on it
