"""Which arithmetic a training worker uses: `train.amp: auto` resolved by what the worker's device runs natively.

bf16 autocast pays only where the hardware has bf16 instructions: on a CPU with AVX-512 BF16 or AMX (oneDNN's
native bf16 kernels) it made the quickstart teacher's step 0.74x of fp32, but on an AVX2-only CPU, where oneDNN
emulates it, 12.7x slower (benchmarks/RESULTS.md, "Precision by hardware"); on GPUs bf16 needs compute capability
8.0 (Ampere) or newer. Everywhere else `auto` trains in fp32. fp16 is never chosen by `auto`: it needs loss scaling
and has not been checked on this model's losses on a GPU here (`benchmarks/gpu_check.py` records it per GPU), so
pre-Ampere GPUs (V100, T4) train in fp32 unless the user asks for `train.amp: fp16`.

The rule is a pure function of `DeviceFacts` (`choose_amp`), so it is tested against a table of devices;
`device_facts` reads the facts of the device a worker actually has.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

# measured step-time ratios bf16 / fp32 where bf16 is emulated (teacher step, benchmarks/RESULTS.md): the order of
# magnitude the warning names
EMULATED_BF16_SLOWDOWN = {"cpu": "about 13x", "cuda": "several times"}


@dataclass(frozen=True)
class DeviceFacts:
    """What decides the precision: the device type, its name, native bf16, and a GPU's compute capability."""

    kind: str  # "cpu" or "cuda"
    name: str
    native_bf16: bool
    capability: tuple[int, int] | None = None  # CUDA only

    def describe(self) -> str:
        if self.kind == "cuda":
            major, minor = self.capability or (0, 0)
            return f"GPU {self.name} (compute capability {major}.{minor})"
        support = "native bf16" if self.native_bf16 else "no native bf16"
        return f"CPU {self.name} ({support})"


@dataclass(frozen=True)
class Precision:
    """A resolved choice: `amp` is "off", "bf16" or "fp16"; `reason` says why, `warning` is set when the choice is
    one the device emulates (slow)."""

    amp: str
    reason: str
    warning: str | None = None

    def line(self) -> str:
        name = {"off": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[self.amp]
        return f"precision: {name} ({self.reason})"


# oneDNN instruction sets below AVX-512 BF16: with ONEDNN_MAX_CPU_ISA capped at one of these, oneDNN emulates bf16
# even on a CPU that has it (the cap also makes this machine a stand-in for an AVX2-only one, benchmarks/RESULTS.md)
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                      "AVX512_CORE_VNNI"})


def cpu_has_native_bf16() -> bool:
    """x86: AVX-512 BF16 or AMX tiles, unless ONEDNN_MAX_CPU_ISA caps oneDNN below them; Arm: oneDNN's bf16 check
    (the BF16 extension). Not oneDNN's own x86 check, which also says yes for plain AVX-512 (Skylake), where bf16 is
    converted in software."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_BF16:
            return False
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux); elsewhere what `platform` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_facts(name: str, capability: tuple[int, int]) -> DeviceFacts:
    """A CUDA GPU: bf16 units from compute capability 8.0 (Ampere) on; V100 (7.0) and T4 (7.5) have none."""
    return DeviceFacts("cuda", name, tuple(capability) >= (8, 0), (int(capability[0]), int(capability[1])))


def device_facts(device: torch.device) -> DeviceFacts:
    """The facts of `device` as this process sees it."""
    if device.type == "cuda":
        return gpu_facts(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    return DeviceFacts("cpu", _cpu_name(), cpu_has_native_bf16())


def choose_amp(requested: str, facts: DeviceFacts) -> Precision:
    """Resolve `train.amp` for a device. `auto`: bf16 where it is native, fp32 elsewhere. An explicit value is
    kept; an explicit bf16 on a device that emulates it gets a one-line warning."""
    if requested == "auto":
        if facts.native_bf16:
            return Precision("bf16", f"auto: {facts.describe()}")
        return Precision("off", f"auto: {facts.describe()}")
    if requested == "bf16" and not facts.native_bf16:
        slower = EMULATED_BF16_SLOWDOWN.get(facts.kind, "much")
        return Precision("bf16", f"train.amp=bf16 on {facts.describe()}",
                         warning=f"train.amp=bf16 on {facts.describe()}: bf16 is emulated there, steps {slower} "
                                 "slower than fp32; use train.amp=auto (fp32 there)")
    if requested == "fp16" and facts.kind != "cuda":
        raise ValueError(f"train.amp=fp16 needs a GPU, not {facts.describe()}")
    return Precision(requested, f"train.amp={requested} on {facts.describe()}")
