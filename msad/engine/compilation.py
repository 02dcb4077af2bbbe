"""`train.compile`: torch.compile for the network's convolutional parts, when the run is long enough to repay it.

What is compiled is the backbone, the pyramid, the head and C-FF (`Trainable.compile_network`), the parts that hold
all of a step's convolutions; the loss's target assignment, with its data-dependent indexing, stays eager (it is
0.4 % of the step, benchmarks/RESULTS.md), so there are no graph breaks to pay for. Compiling costs minutes on a
2-core CPU before the first step (every input shape once: a teacher has two orientations at two resolutions), so
`auto` compiles only runs whose expected saving exceeds that cost: `iterations` above `AUTO_MIN_ITERATIONS`, from
the compile time and per-step saving measured by `benchmarks/cpu_step_modes.py` ("torch.compile" in
benchmarks/RESULTS.md). Compiled kernels are kept in `$MSAD_CACHE/torchinductor`, shared by every trial on the node,
so the next trial of the same model and shapes (a sweep's seeds, a resumed run) loads them instead of compiling.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from msad.files import cache_root

# The smallest run `auto` compiles, per (device kind, resolved train.amp): cold compile time / time saved per step,
# measured on the quickstart's teacher (2-core CPU, benchmarks/RESULTS.md "Fast on the user's hardware"), rounded
# up. Absent: never (bf16 on CPU saved too little to measure; no GPU has been measured yet, and
# `benchmarks/gpu_check.py` is where that number will come from).
AUTO_MIN_ITERATIONS = {("cpu", "off"): 15_000}
CACHE_ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"


@dataclass(frozen=True)
class CompileChoice:
    enabled: bool
    reason: str

    def line(self) -> str:
        return f"torch.compile: {'on' if self.enabled else 'off'} ({self.reason})"


def choose_compile(requested: str, iterations: int, device_kind: str, amp: str = "off",
                   has_compiler: bool = True) -> CompileChoice:
    """Resolve `train.compile` for a run of `iterations` steps on a `device_kind` ("cpu" or "cuda") device in the
    resolved arithmetic `amp`; `has_compiler`: a C++ compiler for Inductor's CPU kernels is on the PATH."""
    if requested == "off":
        return CompileChoice(False, "train.compile=off")
    if device_kind == "cpu" and not has_compiler:
        return CompileChoice(False, "no C++ compiler (c++, g++ or clang++) for Inductor's CPU kernels")
    if requested == "on":
        return CompileChoice(True, "train.compile=on")
    threshold = AUTO_MIN_ITERATIONS.get((device_kind, amp))
    if threshold is None:
        return CompileChoice(False, f"auto: no run length repays compiling measured for {device_kind} with amp {amp}")
    if iterations < threshold:
        return CompileChoice(False, f"auto: {iterations} iterations do not repay compiling (from {threshold})")
    return CompileChoice(True, f"auto: {iterations} iterations repay compiling (from {threshold})")


def has_cpp_compiler() -> bool:
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def use_shared_compile_cache() -> str:
    """Point Inductor's on-disk cache at `$MSAD_CACHE/torchinductor` unless the user chose a folder; returns it."""
    return os.environ.setdefault(CACHE_ENV_VAR, str(cache_root() / "torchinductor"))
