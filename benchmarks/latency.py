"""Inference latency, peak memory and file size of the teacher, the student and plain FCOS, eager and exported.

For each size set (the paper's H 800x1333 / L 400x667, the CPU configs' H 256x384 / L 128x192), width and model --
the fused teacher (reads H, makes L itself), the student (reads L), plain FCOS (reads H) -- and runtime:

- ``eager``: the training model (slimmable convs sliced at run time, BN per width), ``torch.no_grad``;
- ``deployed``: the sliced network with BN folded (``msad.deploy``), eager;
- ``torchscript``: the file ``launch.py export --format torchscript`` writes, ``torch.jit.load``-ed;
- ``onnxruntime``: the ``--format onnx`` file in onnxruntime (CPU only; skipped when not installed),

it reports:

- the median latency of one network forward at ``--batch`` (decoding and NMS are not timed; see
  ``msad.deploy.latency``);
- memory, each measurement in a fresh subprocess: on CPU what loading added to the RSS, the peak RSS during the
  forwards above the RSS after loading, and the process's peak (VmHWM, reset through /proc/self/clear_refs: Linux
  carries a parent's ``ru_maxrss`` into its children, so a child's ``ru_maxrss`` starts at the parent's peak); on
  CUDA ``max_memory_allocated`` above what the loaded model holds;
- the size of the file each runtime loads (eager: the training state dict, what ``launch.py export`` wrote before
  slicing);
- the GFLOPs of the timed network (counted on it, as ``msad.models.capacity`` counts) and ms per GFLOP;
- last, per size set, width and runtime, the goal line: student latency / teacher latency <= 1.2 x their FLOPs
  ratio.

Models have random weights (timing does not depend on them), the paper's FPN 256 channels and 80 classes.

    python benchmarks/latency.py --sizes cpu --widths 0.25 1.0 --repeats 7
    python benchmarks/latency.py --sizes paper --widths 0.25 --repeats 3
    python benchmarks/latency.py --device cuda --dtype bf16 --batch 8 --sizes paper
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from msad.deploy.latency import MODELS, RESOLUTION, count_gflops, input_size, median_seconds, random_training_model
from msad.models.slimmable import WIDTHS

RUNTIMES = ("eager", "deployed", "torchscript", "onnxruntime")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GOAL_FACTOR = 1.2


def _status_mb(field: str) -> float | None:
    """A /proc/self/status field (VmRSS, VmHWM) in MB; None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Current RSS in MB, with the peak (VmHWM) reset to it where Linux allows (/proc/self/clear_refs).

    Why not ru_maxrss alone: Linux carries a parent's maximum RSS over fork and execve, so a fresh subprocess of a
    large parent starts at the parent's peak and its growth is invisible; VmHWM belongs to the new image only.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    current = _status_mb("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss() -> float:
    """Peak RSS in MB since the last reset (VmHWM), else ru_maxrss."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one runtime, one model, one size, in a fresh process
# ---------------------------------------------------------------------------------------------------------------------


def _load_runtime(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A callable images -> outputs for the spec's runtime, loaded from the parent's files."""
    from msad.deploy.latency import training_forward

    runtime, model_name, width = spec["runtime"], spec["model"], spec["width"]
    if runtime == "eager":
        model = random_training_model(model_name, width, spec["fpn_channels"], spec["num_classes"])
        model.load_state_dict(torch.load(spec["files"]["eager"], map_location="cpu", weights_only=True))
        model = model.to(device=device, dtype=dtype)
        return training_forward(model)
    if runtime == "deployed":
        from msad.deploy.runtime import deploy_network

        single = build_single_width(model_name, width, spec["fpn_channels"], spec["num_classes"])
        single.load_state_dict(torch.load(spec["files"]["deployed"], map_location="cpu", weights_only=True))
        network = deploy_network(single).to(device=device, dtype=dtype)
        del single
        return network
    if runtime == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(spec["files"]["torchscript"], map_location=device)
        return module.to(dtype=dtype)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(spec["files"]["onnxruntime"], options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images.numpy()})


def build_single_width(model_name: str, width: float, fpn_channels: int, num_classes: int) -> torch.nn.Module:
    """The one-width model the ``pt`` export rebuilds (``model.width_list: [w]``)."""
    from msad.models.detector import FCOSDetector
    from msad.models.student import MSADStudent
    from msad.models.teacher import MSADTeacher

    cls = {"teacher": MSADTeacher, "student": MSADStudent, "fcos": FCOSDetector}[model_name]
    return cls(width=width, width_list=(width,), fpn_channels=fpn_channels, num_classes=num_classes).eval()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one spec in this (fresh) process; returns the numbers."""
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    torch.set_num_threads(spec["threads"])
    base_rss = reset_peak_rss()
    with torch.no_grad():
        run = _load_runtime(spec, device, dtype)
        images = torch.randn(spec["batch"], 3, *spec["size"], generator=torch.Generator().manual_seed(0))
        images = images.to(device=device, dtype=dtype if spec["runtime"] != "onnxruntime" else torch.float32)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            loaded = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        load_peak = peak_rss()
        loaded_rss = reset_peak_rss()
        warmup = spec["warmup"] + (1 if spec["runtime"] == "torchscript" else 0)  # the JIT's profiling run
        seconds = median_seconds(lambda: run(images), spec["repeats"], warmup, device)
        run_peak = peak_rss()
    result = {"median_ms": seconds * 1e3, "loaded_mb": loaded_rss - base_rss,
              "peak_rss_mb": max(load_peak, run_peak)}
    if device.type == "cuda":
        result["run_memory_mb"] = (torch.cuda.max_memory_allocated(device) - loaded) / 2**20
    else:
        result["run_memory_mb"] = run_peak - loaded_rss
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Parent: build the files, run the workers, print the tables
# ---------------------------------------------------------------------------------------------------------------------


def prepare_files(model_name: str, width: float, args: argparse.Namespace, folder: Path,
                  runtimes: list[str]) -> dict[str, str]:
    """Write what each runtime loads: training weights, sliced weights, TorchScript, ONNX."""
    from msad.deploy.export import build_onnx, build_torchscript
    from msad.deploy.runtime import deploy_detector
    from msad.deploy.slicing import slice_model

    model = random_training_model(model_name, width, args.fpn_channels, args.num_classes)
    stem = folder / f"{model_name}-w{width:g}"
    files = {"eager": f"{stem}-training.pt", "deployed": f"{stem}-sliced.pt"}
    torch.save(model.state_dict(), files["eager"])
    torch.save(slice_model(model).state_dict(), files["deployed"])
    detector = deploy_detector(model)
    example = torch.randn(1, 3, *input_size(model_name, "cpu"))
    if "torchscript" in runtimes:
        files["torchscript"] = f"{stem}.torchscript"
        build_torchscript(detector, example, {"role": model_name, "width": width}, Path(files["torchscript"]))
    if "onnxruntime" in runtimes:
        files["onnxruntime"] = f"{stem}.onnx"
        build_onnx(detector, example, Path(files["onnxruntime"]))
    return files


def network_gflops(model_name: str, width: float, size: tuple[int, int], args: argparse.Namespace) -> float:
    """GFLOPs of the deployed network at batch 1 (shapes only, on the meta device)."""
    from msad.deploy.runtime import deploy_network

    model = random_training_model(model_name, width, args.fpn_channels, args.num_classes)
    network = copy.deepcopy(deploy_network(model))
    network = network.to("meta")
    return count_gflops(network, torch.empty(1, 3, *size, device="meta"))


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], goals: list[str], header: str) -> str:
    cols = ("sizes", "width", "model", "input", "runtime", "median ms", "GFLOPs", "ms/GFLOP", "loaded MB",
            "run peak MB", "process peak MB", "file MB")
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c not in ("sizes", "model",
             "runtime", "input") else "---" for c in cols) + "|"]
    for r in rows:
        if "error" in r:
            cells = [r["sizes"], f"{r['width']:g}", f"{r['model']} ({RESOLUTION[r['model']]})", r["input"],
                     r["runtime"], f"failed: {r['error']}", "", "", "", "", "", ""]
        else:
            cells = [r["sizes"], f"{r['width']:g}", f"{r['model']} ({RESOLUTION[r['model']]})", r["input"],
                     r["runtime"], f"{r['median_ms']:.1f}", f"{r['gflops']:.2f}",
                     f"{r['median_ms'] / r['gflops']:.2f}", f"{r['loaded_mb']:.0f}", f"{r['run_memory_mb']:.0f}",
                     f"{r['peak_rss_mb']:.0f}",
                     f"{r['file_mb']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + goals)


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per size set, width and runtime: student/teacher latency against 1.2 x their FLOPs ratio."""
    found: dict[tuple[str, float, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            found.setdefault((r["sizes"], r["width"], r["runtime"]), {})[r["model"]] = r
    lines = []
    for (sizes, width, runtime), by_model in found.items():
        if "teacher" in by_model and "student" in by_model:
            t, s = by_model["teacher"], by_model["student"]
            latency, flops = s["median_ms"] / t["median_ms"], s["gflops"] / t["gflops"]
            verdict = "meets" if latency <= GOAL_FACTOR * flops else "misses"
            lines.append(f"- {sizes} w{width:g} {runtime}: student/teacher latency {latency:.2f}, FLOPs ratio "
                         f"{flops:.2f}, goal <= {GOAL_FACTOR * flops:.2f}: {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", choices=["cpu", "paper", "both"], default="cpu")
    parser.add_argument("--widths", type=float, nargs="+", default=list(WIDTHS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first (TorchScript gets one more)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="torch runtimes; onnxruntime is fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime intra-op threads")
    parser.add_argument("--fpn-channels", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement subprocess")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if any(w not in WIDTHS for w in args.widths):
        parser.error(f"--widths must be drawn from {list(WIDTHS)}")
    runtimes = list(args.runtimes)
    if "onnxruntime" in runtimes:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            runtimes.remove("onnxruntime")
            print("onnxruntime not installed: skipped (pip install -e '.[deploy]')", file=sys.stderr)
        if args.device == "cuda" and "onnxruntime" in runtimes:
            runtimes.remove("onnxruntime")
            print("onnxruntime: CPU only here; skipped on --device cuda", file=sys.stderr)
    size_sets = ["cpu", "paper"] if args.sizes == "both" else [args.sizes]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="msad-latency-") as tmp:
        for width in args.widths:
            for model_name in args.models:
                files = prepare_files(model_name, width, args, Path(tmp), runtimes)
                for sizes in size_sets:
                    size = input_size(model_name, sizes)
                    gflops = network_gflops(model_name, width, size, args) * args.batch
                    for runtime in runtimes:
                        spec = {"runtime": runtime, "model": model_name, "width": width, "size": list(size),
                                "files": files, "device": args.device, "dtype": args.dtype, "batch": args.batch,
                                "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                                "fpn_channels": args.fpn_channels, "num_classes": args.num_classes}
                        row = {"sizes": sizes, "width": width, "model": model_name, "input": f"{size[0]}x{size[1]}",
                               "runtime": runtime, "gflops": gflops,
                               "file_mb": Path(files[runtime]).stat().st_size / 1e6, **run_worker(spec, args.timeout)}
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    header = (f"{args.device} {args.dtype}, batch {args.batch}, {args.threads} thread(s), {args.repeats} timed runs "
              f"(median) after {args.warmup} warm-up, FPN {args.fpn_channels}, {args.num_classes} classes, torch "
              f"{torch.__version__}; {time.perf_counter() - started:.0f} s in all")
    print(markdown(rows, goal_lines(rows), header))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
