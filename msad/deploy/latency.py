"""Latency of the deployed networks on this machine, and the FLOPs they do, for ``launch.py capacity --latency``
and ``benchmarks/latency.py``.

What is timed is one network forward at batch 1 (decoding and NMS are not: they depend on the weights, and random
weights would time a post-processing no trained model sees): the teacher's fused branch (backbone + pyramid on H
and on L = H / 2, C-FF, head once), the student on L, plain FCOS on H. FLOPs are counted on the very module and
input shapes timed, with ``torch.utils.flop_counter`` as ``msad.models.capacity`` does (a FLOP is a multiply or an
add; convs and matmuls only): for the student and FCOS that is ``msad.models.capacity.detector_gflops``; for the
teacher it is less, since the deployed teacher runs its head once (fused) where training runs it on H, L and fused.
Models are the paper's (FPN 256 channels, 80 classes) unless told otherwise, with random weights.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from msad.models.detector import FCOSDetector
from msad.models.slimmable import WIDTHS
from msad.models.student import MSADStudent
from msad.models.teacher import MSADTeacher

# H and L image sizes: the paper's (H 800 x 1333, L 400 x 667) and this project's CPU configs' (H 256 x 384).
SIZES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "paper": ((800, 1333), (400, 667)),
    "cpu": ((256, 384), (128, 192)),
}
MODELS: tuple[str, ...] = ("teacher", "student", "fcos")
RESOLUTION: dict[str, str] = {"teacher": "H & L", "student": "L", "fcos": "H"}


def input_size(model: str, sizes: str) -> tuple[int, int]:
    """The image the model's deployed network reads at a size set.

    The teacher's H is made even (800 x 1334 for the paper's 1333), since it halves H exactly; its L is then the
    paper's 400 x 667.
    """
    high, low = SIZES[sizes]
    if model == "student":
        return low
    if model == "teacher":
        return high[0] + high[0] % 2, high[1] + high[1] % 2
    return high


def random_training_model(model: str, width: float, fpn_channels: int = 256, num_classes: int = 80,
                          seed: int = 0) -> nn.Module:
    """A randomly initialised training model of ``model`` at ``width`` (all four widths' weights), eval mode."""
    torch.manual_seed(seed)
    cls = {"teacher": MSADTeacher, "student": MSADStudent, "fcos": FCOSDetector}[model]
    return cls(width=width, width_list=WIDTHS, fpn_channels=fpn_channels, num_classes=num_classes).eval()


def training_forward(model: nn.Module) -> Callable[[Tensor], object]:
    """The eager training model computing what the deployed network computes, from the network's input."""
    if isinstance(model, MSADTeacher):
        return lambda images: model.head(model.fuse_aligned_levels(images).fused)
    if isinstance(model, MSADStudent):
        from msad.models.detector import LOW_LEVELS, pyramid_features

        return lambda low: model.head(pyramid_features(model.backbone, model.pyramid, low, LOW_LEVELS))
    return model.head_outputs


def count_gflops(run: Callable[[Tensor], object], example: Tensor) -> float:
    """GFLOPs (2 x MACs, convs and matmuls) of one call of ``run`` on ``example``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(example)
    return counter.get_total_flops() / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class LatencyRow:
    """One model at one width: milliseconds of the training model and of the deployed (TorchScript) network."""

    width: float
    model: str
    size: tuple[int, int]
    gflops: float
    eager_ms: float
    torchscript_ms: float


def measure(model_name: str, width: float, sizes: str = "cpu", repeats: int = 3, warmup: int = 1,
            fpn_channels: int = 256, num_classes: int = 80) -> LatencyRow:
    """Time one model in this process (CPU): the eager training model and the traced deployed network."""
    import warnings

    from msad.deploy.runtime import deploy_network

    model = random_training_model(model_name, width, fpn_channels, num_classes)
    example = torch.randn(1, 3, *input_size(model_name, sizes), generator=torch.Generator().manual_seed(0))
    eager = training_forward(model)
    network = deploy_network(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, example, check_trace=False)
    device = torch.device("cpu")
    with torch.no_grad():
        eager_s = median_seconds(lambda: eager(example), repeats, warmup, device)
        traced_s = median_seconds(lambda: traced(example), repeats, warmup + 1, device)  # +1: the JIT's profiling run
    return LatencyRow(width, model_name, tuple(example.shape[-2:]), count_gflops(network, example), eager_s * 1e3,
                      traced_s * 1e3)


def latency_table(rows: list[LatencyRow], sizes: str) -> str:
    """Aligned text: per width, the teacher's and the student's milliseconds, GFLOPs and their ratios."""
    header = ("width", "model", "input", "GFLOPs", "eager ms", "TorchScript ms", "ms/GFLOP")
    body = [(f"{r.width:.2f}", f"{r.model} ({RESOLUTION[r.model]})", f"{r.size[0]}x{r.size[1]}", f"{r.gflops:.2f}",
             f"{r.eager_ms:.1f}", f"{r.torchscript_ms:.1f}", f"{r.torchscript_ms / max(r.gflops, 1e-9):.2f}")
            for r in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    align = ("<", "<", "<", ">", ">", ">", ">")
    lines = ["  ".join(f"{cell:{a}{n}}" for cell, a, n in zip(line, align, widths, strict=True)).rstrip()
             for line in (header, *body)]
    by_width: dict[float, dict[str, LatencyRow]] = {}
    for r in rows:
        by_width.setdefault(r.width, {})[r.model] = r
    for width, pair in by_width.items():
        if "teacher" in pair and "student" in pair:
            t, s = pair["teacher"], pair["student"]
            lines.append(f"width {width:.2f}: student/teacher latency {s.torchscript_ms / t.torchscript_ms:.2f} "
                         f"(TorchScript), FLOPs ratio {s.gflops / t.gflops:.2f}")
    return f"measured latency on this machine, batch 1, {sizes} sizes (torch threads: {torch.get_num_threads()})\n" + \
        "\n".join(lines)
