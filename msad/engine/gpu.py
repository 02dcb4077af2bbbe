"""GPU preflight: can this worker run CUDA with the installed torch? Checked before a GPU run builds anything.

A node whose NVIDIA driver is older than the CUDA that torch was built for still reports its GPUs to Ray, so Ray
schedules GPU workers there and they fail later, deep inside nccl. Each GPU worker checks first and, if the node
cannot run the job, raises `GpuUnusableError` with one line naming the node, the driver found and the one needed;
`PreflightTorchConfig` runs the check before the nccl process group exists, and the run stops at once instead of
Ray Train failing later inside nccl with a message that does not name the driver.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

import torch
from ray.train.torch import TorchConfig

# Oldest Linux driver that runs each CUDA major release (CUDA minor-version compatibility: any 13.x toolkit runs
# on a 13.0 driver). From NVIDIA's CUDA Toolkit release notes, table "CUDA Toolkit and Minimum Required Driver
# Version for CUDA Minor Version Compatibility".
MIN_DRIVER_FOR_CUDA_MAJOR: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


class GpuUnusableError(RuntimeError):
    """This node cannot run the GPU job (no driver, driver too old, no visible GPU, CUDA broken). Not retried."""


def driver_cuda_version() -> int | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion: 12080 = 12.8), or None without a driver.

    Asked of libcuda directly: torch's own query fails exactly when the driver is too old for it.
    """
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            libcuda = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    return None


def driver_release() -> str | None:
    """The NVIDIA kernel driver's release (e.g. '570.133.20'), as nvidia-smi shows it; None where unknown."""
    try:
        text = PROC_DRIVER_VERSION.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", text)
    return match.group(1) if match else None


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_problem(torch_version: str, torch_cuda: str | None, driver_cuda: int | None,
                   release: str | None) -> str | None:
    """Why this torch build cannot run on this driver, or None if the versions fit.

    Args:
        torch_version: torch.__version__ (named in the message).
        torch_cuda: torch.version.cuda ('13.0'), None for a CPU build.
        driver_cuda: driver_cuda_version(), None when no driver is loaded.
        release: driver_release(), only for the message.
    """
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build; install a CUDA build of torch for distributed.use_gpu"
    needed_major = int(torch_cuda.split(".")[0])
    needed = f"CUDA {torch_cuda} (NVIDIA driver >= {MIN_DRIVER_FOR_CUDA_MAJOR.get(needed_major, '?')})"
    if driver_cuda is None:
        return f"no NVIDIA driver found (libcuda.so.1 not loadable); torch {torch_version} needs {needed}"
    if driver_cuda // 1000 < needed_major:
        found = f"NVIDIA driver {release or '(release unknown)'} supports CUDA {_cuda_text(driver_cuda)}"
        return (f"{found}, but torch {torch_version} needs {needed}; use a node image with a newer driver "
                "(cluster/README.md, 'GPU drivers') or install the torch build for this driver's CUDA")
    return None


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build carrying `arch_list` runs on a GPU of compute `capability` (CUDA's compatibility rules).

    A cubin `sm_XY` runs on the same major version with an equal or higher minor (sm_80 on sm_86); PTX `compute_XY`
    is compiled by the driver for any GPU of capability >= XY. Suffixed targets (sm_90a) run only on their exact GPU.
    """
    major, minor = capability
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(a|f)?", arch)
        if match is None:
            continue
        kind, number, suffix = match.group(1), int(match.group(2)), match.group(3)
        target = (number // 10, number % 10)
        if suffix and target == capability:
            return True
        if not suffix and kind == "sm" and target[0] == major and target[1] <= minor:
            return True
        if not suffix and kind == "compute" and target <= capability:
            return True
    return False


def check_gpu_usable(node: str) -> str:
    """Raise GpuUnusableError (one line, naming `node`) unless this process can run CUDA work; else describe the GPU.

    Checks, in order: a CUDA build of torch, a driver new enough for it, a visible GPU, and torch compiled for that
    GPU's architecture. It creates no CUDA context: workers see every GPU of their node at this point, and a context
    made here would sit on GPU 0 of each worker for the whole run.
    """
    problem = driver_problem(torch.__version__, torch.version.cuda, driver_cuda_version(), driver_release())
    if problem is None and not torch.cuda.is_available():
        problem = "CUDA is not available to torch (no GPU visible to this worker; check CUDA_VISIBLE_DEVICES)"
    if problem is None:
        major, minor = torch.cuda.get_device_capability(0)
        built = torch.cuda.get_arch_list()  # e.g. ['sm_80', 'sm_90', 'compute_90']: kernels and PTX it carries
        if built and not arch_supported((major, minor), built):
            problem = (f"{torch.cuda.get_device_name(0)} (sm_{major}{minor}) is not among the GPU architectures "
                       f"torch {torch.__version__} was built for ({', '.join(built)})")
    if problem is not None:
        raise GpuUnusableError(f"node {node}: {problem}")
    return f"{torch.cuda.get_device_name(0)} (driver {driver_release() or '?'}, CUDA {torch.version.cuda})"


def preflight_this_worker() -> str:
    """Run in each Ray Train worker (see `PreflightTorchConfig`): check this node, naming it by address and id."""
    import ray

    node = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"
    return check_gpu_usable(node)


class PreflightTorchConfig(TorchConfig):
    """Ray Train's TorchConfig that checks every worker's GPU before the nccl process group is created.

    Without it, a node that cannot run CUDA fails inside `init_process_group` ("ProcessGroupNCCL is only supported
    with GPUs"), which says nothing about the driver. An error raised while the worker group starts fails the run
    as a controller error, which Ray Train does not retry: the run stops in seconds with our one line.
    """

    @property
    def backend_cls(self) -> type:
        torch_backend = super().backend_cls

        class PreflightTorchBackend(torch_backend):  # type: ignore[misc, valid-type]
            def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
                if backend_config.backend == "nccl":
                    worker_group.execute(preflight_this_worker)
                super().on_start(worker_group, backend_config)

        return PreflightTorchBackend


def gpu_error_line(text: str) -> str | None:
    """Our one-line preflight message out of Ray's wrapped error text, if the run failed on it."""
    lines = [line.strip() for line in text.splitlines() if "GpuUnusableError" in line]
    return lines[-1].rsplit("GpuUnusableError", 1)[-1].lstrip("):").strip() if lines else None
