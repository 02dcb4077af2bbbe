"""``launch.py export``: a training checkpoint -> a deployable file (``pt``, ``torchscript`` or ``onnx``), checked.

Every format is built from the sliced model (``msad.deploy.slicing``) and, before a byte reaches ``--output``, run
on check images -- two deterministic random images (N(0, 1), the normalised input space) of the checkpoint's
evaluation size, H padded to ``data.size_divisibility``, with zero padding as in training batches -- next to the
**eager training model** the checkpoint describes. A file that fails is not written (one-line UserError).

Tolerances (fp32):

- head outputs (every level's cls logits, box regression, centerness): max |exported - eager| <=
  ``HEAD_RTOL`` x max(1, max |eager|) per tensor. Folding BN into the convs and another runtime's kernels move
  outputs by ~1e-6 relative (measured up to 2e-6 at width 1.0), so 1e-4 leaves a 50x margin and still catches any
  wrong weight, slice or layer.
- detections (the training model's post-processing, score 0.05, NMS 0.6, 100 per image): the same number per image
  and one-to-one the same label, score within ``SCORE_ATOL`` and box corners within ``BOX_ATOL`` pixels. Order is
  not compared: two detections whose scores differ by less than the numerical noise may swap places.

What each file holds:

- ``pt``: ``torch.load(path, weights_only=True)`` gives a checkpoint dict (``kind: sliced``): the single-width
  model's state dict (BN kept, not folded, so ``launch.py eval`` and training read it as an ordinary checkpoint),
  the config that rebuilds it (``model.width_list: [w]``), role, width, iteration, metrics and the source
  checkpoint. ``msad.deploy.load_exported(path)`` returns the eval-mode ``DeployedDetector`` (BN folded).
- ``torchscript``: ``torch.jit.load(path)`` with torch alone (no msad, no torchvision). ``forward(images)`` gives
  the per-level head outputs (tuple of three lists of 5 tensors, strides 8..128 of H); ``detect(images,
  image_sizes)`` adds FCOS decoding and NMS (pure-torch NMS, ``msad.deploy.postprocess``) and returns per image
  {"boxes", "scores", "labels"}. The student's input is L and its boxes are in L pixels; the teacher (fused
  branch) and plain FCOS read H. ``msad.json`` in the archive's extra files says role, width, input and strides.
- ``onnx``: the network only, input ``images`` [B, 3, h, w] (all three dynamic), 15 outputs
  ``cls_logits_s8..s128``, ``box_regression_s8..s128``, ``centerness_s8..s128``. Decoding and NMS are not in the
  graph: the score-ordered, data-dependent greedy NMS does not export, and ONNX's NonMaxSuppression is a different
  algorithm (per-class box limit, its own IoU rounding), so it could not give the training model's detections.
  Post-process the outputs with ``msad.deploy.postprocess.fcos_detections_scriptable`` (or msad's
  ``fcos_detections``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msad.build import model_from_checkpoint
from msad.checkpoint import ROLES, SLICED_KIND, checkpoint_dict, load_checkpoint, save_checkpoint
from msad.config import Config, config_from_dict
from msad.deploy.runtime import (
    NETWORK_INPUT,
    DeployedDetector,
    FlatOutputs,
    deploy_detector,
    role_of,
    scaled_detections,
)
from msad.deploy.slicing import slice_model
from msad.errors import UserError
from msad.models.fcos import STRIDES, HeadOutputs, fcos_detections

FORMATS: tuple[str, ...] = ("pt", "torchscript", "onnx")
HEAD_RTOL = 1e-4
SCORE_ATOL = 1e-4
BOX_ATOL = 1e-2
CHECK_IMAGES = 2
CHECK_SEED = 0
OUTPUT_NAMES: tuple[str, ...] = tuple(f"{kind}_s{s}" for kind in ("cls_logits", "box_regression", "centerness")
                                      for s in STRIDES)


@dataclass
class ExportResult:
    """What was written and how it compared with the eager training model."""

    path: Path
    format: str
    role: str
    width: float
    bytes: int
    max_head_error: float  # the largest max |exported - eager| / max(1, max |eager|) over the head outputs
    detections: int  # detections on the check images (each matched one-to-one)

    def summary(self) -> str:
        found = (f"the same {self.detections} detections" if self.detections else
                 "no detections from either at the 0.05 score threshold (an untrained model?)")
        return (f"wrote {self.path} ({self.format}, {self.role} width {self.width:g}, {self.bytes / 1e6:.1f} MB); "
                f"checked against the training model on {CHECK_IMAGES} images: head outputs within "
                f"{self.max_head_error:.1e} (relative), {found}")


# ---------------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def sliced_config(cfg: Config) -> Config:
    """``cfg`` with ``model.width_list: [width]``: the config of the single-width model."""
    data = cfg.to_dict()
    data["model"]["width_list"] = [cfg.model.width]
    return config_from_dict(data)


def load_training_model(checkpoint: str | Path, roles: tuple[str, ...] = ROLES) -> tuple[nn.Module, dict, Config]:
    """The eval-mode model a checkpoint (training, standalone or sliced) describes, its state and its config."""
    state = load_checkpoint(checkpoint)  # missing / corrupt / not msad: one-line UserError
    model, cfg = model_from_checkpoint(state, checkpoint, roles)
    return model, state, cfg


def sliced_state(model: nn.Module, state: dict, cfg: Config, source: str | Path) -> dict[str, Any]:
    """The ``pt`` file's dict: the single-width model's weights and config, no optimizer, no other widths."""
    weights = {k: v.detach().clone() for k, v in slice_model(model).state_dict().items()}
    return checkpoint_dict(
        SLICED_KIND, state["role"], sliced_config(cfg), weights, state.get("iteration", 0), state.get("metrics", {}),
        source=str(source),
        source_width_list=state.get("source_width_list", [float(w) for w in model.backbone.width_list]))


def load_sliced_model(path: str | Path) -> nn.Module:
    """The single-width training-class model of a ``pt`` export (BN not folded), eval mode."""
    state = load_checkpoint(path)
    if state.get("kind") != SLICED_KIND:
        raise UserError(f"{path}: not a sliced export (field 'kind' is {state.get('kind')!r}, expected "
                        f"{SLICED_KIND!r}); write one with `launch.py export CKPT --output FILE`")
    return model_from_checkpoint(state, path)[0]


def load_exported(path: str | Path) -> DeployedDetector:
    """The deployable module of a ``pt`` export: eval mode, BN folded; ``predict`` as the training model's.

    ``msad.deploy.load_exported("student.pt").predict(images, image_sizes)``.
    """
    path = Path(path)
    if path.is_file() and _is_torchscript(path):
        raise UserError(f"{path}: a TorchScript file; load it with torch.jit.load (load_exported reads 'pt' exports)")
    return deploy_detector(load_sliced_model(path))


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name.endswith("/code/") for name in archive.namelist())


# ---------------------------------------------------------------------------------------------------------------------
# Check images and comparisons
# ---------------------------------------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def check_batch(cfg: Config) -> tuple[Tensor, list[tuple[int, int]]]:
    """Deterministic H batch of the checkpoint's evaluation size: two landscape images, zero-padded, even sizes.

    Even sizes make L exactly half, so the student's detections in L pixels are the training model's H boxes / 2.
    """
    short = cfg.data.test_short_side
    long = min(cfg.data.max_size, _round_up(int(short * 1.5), 2))
    sizes = [(short - short % 2, long - long % 2), (_round_up(int(short * 0.75), 2), _round_up(int(long * 0.8), 2))]
    div = cfg.data.size_divisibility
    canvas = (_round_up(max(h for h, _ in sizes), div), _round_up(max(w for _, w in sizes), div))
    generator = torch.Generator().manual_seed(CHECK_SEED)
    images = torch.zeros(len(sizes), 3, *canvas)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
    return images, sizes


@torch.no_grad()
def eager_reference(model: nn.Module, images: Tensor, sizes: list[tuple[int, int]]) -> tuple[HeadOutputs, list[dict]]:
    """The training model's own head outputs (teacher: fused branch) and ``predict`` detections."""
    role = role_of(model)
    if role == "teacher":
        outputs = model.head(model.fuse_aligned_levels(images).fused)
        detections = model.predict(images, sizes, branch="fused")
    else:
        outputs = model.head_outputs(images)
        detections = model.predict(images, sizes)
    return outputs, detections


def network_input(role: str, images: Tensor, low_res_mode: str) -> Tensor:
    """What the deployed network reads of an H batch: L for the student, H otherwise."""
    from msad.data.transforms import to_low_resolution

    return to_low_resolution(images, low_res_mode) if NETWORK_INPUT[role] == "L" else images


def _flat(outputs: HeadOutputs | tuple[list[Tensor], list[Tensor], list[Tensor]] | list[Tensor]) -> list[Tensor]:
    if isinstance(outputs, HeadOutputs):
        return [*outputs.cls_logits, *outputs.box_regression, *outputs.centerness]
    if len(outputs) == 3 and isinstance(outputs[0], (list, tuple)):
        return [t for group in outputs for t in group]
    return list(outputs)


def head_error(reference: HeadOutputs, outputs: HeadOutputs | tuple[list[Tensor], ...] | list[Tensor]) -> float:
    """Largest max |out - ref| / max(1, max |ref|) over all 15 head tensors (shapes must match)."""
    flat_ref, flat_out = _flat(reference), _flat(outputs)
    if len(flat_out) != len(flat_ref):
        raise _CheckFailed(f"{len(flat_out)} head outputs, the training model has {len(flat_ref)}")
    worst = 0.0
    for name, ref, out in zip(OUTPUT_NAMES, flat_ref, flat_out, strict=True):
        out, ref = torch.as_tensor(out).detach(), ref.detach()
        if tuple(out.shape) != tuple(ref.shape):
            raise _CheckFailed(f"head output {name} has shape {tuple(out.shape)}, the training model's "
                               f"{tuple(ref.shape)}")
        error = float((out.float() - ref.float()).abs().max()) / max(1.0, float(ref.abs().max()))
        if not math.isfinite(error):
            raise _CheckFailed(f"head output {name} is not finite")
        worst = max(worst, error)
    return worst


def match_detections(reference: list[dict], found: list[dict], scale: float = 1.0) -> int:
    """Raise _CheckFailed unless every image's detections pair one-to-one (label, score, box); returns the count.

    ``scale`` multiplies ``found``'s boxes first (2 for a student's L-pixel boxes against H-pixel ones).
    """
    total = 0
    for image, (ref, got) in enumerate(zip(reference, found, strict=True)):
        if len(ref["boxes"]) != len(got["boxes"]):
            raise _CheckFailed(f"image {image}: {len(got['boxes'])} detections, the training model gives "
                               f"{len(ref['boxes'])}")
        free = torch.ones(len(got["boxes"]), dtype=torch.bool)
        for k in range(len(ref["boxes"])):
            same = (free & (got["labels"] == ref["labels"][k])
                    & ((got["scores"].float() - ref["scores"][k].float()).abs() <= SCORE_ATOL)
                    & ((got["boxes"].float() * scale - ref["boxes"][k].float()).abs().amax(1) <= BOX_ATOL))
            if not bool(same.any()):
                raise _CheckFailed(f"image {image}: the training model's detection {k} (label "
                                   f"{int(ref['labels'][k])}, score {float(ref['scores'][k]):.4f}) has no match")
            free[int(same.nonzero()[0])] = False
        total += len(ref["boxes"])
    return total


class _CheckFailed(Exception):
    """An exported model that does not compute what the training model computes."""


# ---------------------------------------------------------------------------------------------------------------------
# The three formats
# ---------------------------------------------------------------------------------------------------------------------


class _TorchScriptDetector(nn.Module):
    """The scripted wrapper: the traced network as ``forward`` and decoding + NMS as ``detect``."""

    def __init__(self, network: torch.jit.ScriptModule, input_scale: int) -> None:
        super().__init__()
        self.network = network
        self.input_scale = input_scale
        self.strides = list(STRIDES)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        return self.network(images)

    @torch.jit.export
    def detect(self, images: Tensor, image_sizes: Tensor, score_thresh: float = 0.05, pre_nms_topk: int = 1000,
               nms_thresh: float = 0.6, max_detections: int = 100) -> list[dict[str, Tensor]]:
        with torch.no_grad():
            outputs = self.network(images)
            return scaled_detections(outputs, self.strides, image_sizes, self.input_scale, score_thresh,
                                     pre_nms_topk, nms_thresh, max_detections)


def _quiet_export() -> warnings.catch_warnings:
    """Tracing and exporting warn about deprecations and GroupNorm's size check; none applies to a fixed network."""
    caught = warnings.catch_warnings()
    caught.__enter__()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    return caught


def build_torchscript(detector: DeployedDetector, example: Tensor, metadata: dict[str, Any], path: Path) -> None:
    """Trace the network on ``example``, script the wrapper with ``detect``, save with ``msad.json`` metadata."""
    caught = _quiet_export()
    try:
        traced = torch.jit.trace(detector.network, example, check_trace=False)
        scripted = torch.jit.script(_TorchScriptDetector(traced, detector.input_scale).eval())
        torch.jit.save(scripted, str(path), _extra_files={"msad.json": json.dumps(metadata)})
    finally:
        caught.__exit__(None, None, None)


def build_onnx(detector: DeployedDetector, example: Tensor, path: Path) -> None:
    """Export the network (dynamo exporter, dynamic batch, height and width) to ``path``."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(f"--format onnx needs the 'deploy' extra (pip install -e '.[deploy]'): {err}") from None
    dynamic = {"images": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    caught = _quiet_export()
    try:
        program = torch.onnx.export(FlatOutputs(detector.network).eval(), (example,), dynamo=True,
                                    dynamic_shapes=dynamic, input_names=["images"], output_names=list(OUTPUT_NAMES),
                                    report=False, verbose=False)
        program.save(str(path))
    finally:
        caught.__exit__(None, None, None)


def _onnx_session(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--format onnx checks the file with onnxruntime, which is not installed; pip install -e "
                        "'.[deploy]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_file(fmt: str, path: Path, role: str, low_res_mode: str, images: Tensor, sizes: list[tuple[int, int]],
                reference: HeadOutputs, reference_detections: list[dict]) -> tuple[float, int]:
    """Load the written temp file as a user would and compare it with the eager training model."""
    inputs = network_input(role, images, low_res_mode)
    scale = 2 if NETWORK_INPUT[role] == "L" else 1
    input_sizes = torch.tensor(sizes) // scale
    if fmt == "pt":
        sliced = load_sliced_model(path)
        sliced_outputs, sliced_detections = eager_reference(sliced, images, sizes)
        error = head_error(reference, sliced_outputs)
        match_detections(reference_detections, sliced_detections)
        detector = load_exported(path)
        with torch.no_grad():
            error = max(error, head_error(reference, detector(inputs)))
        return error, match_detections(reference_detections, detector.predict(images, sizes))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path))
        with torch.no_grad():
            error = head_error(reference, module(inputs))
        return error, match_detections(reference_detections, module.detect(inputs, input_sizes), scale)
    session = _onnx_session(path)
    outputs = [torch.from_numpy(a) for a in session.run(None, {"images": inputs.numpy()})]
    error = head_error(reference, outputs)
    n = len(STRIDES)
    found = fcos_detections(HeadOutputs(outputs[:n], outputs[n:2 * n], outputs[2 * n:]), STRIDES, sizes)
    return error, match_detections(reference_detections, found)


class _ExporterFailed(Exception):
    """torch.jit or torch.onnx could not turn the network into a file (e.g. an op it does not support)."""


def _run_exporter(fmt: str, detector: DeployedDetector, example: Tensor, metadata: dict[str, Any], path: Path) -> None:
    try:
        if fmt == "torchscript":
            build_torchscript(detector, example, metadata, path)
        else:
            build_onnx(detector, example, path)
    except UserError:
        raise
    except Exception as err:  # the exporter's own message, first line: which op or construct it refused
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _ExporterFailed(f"the {fmt} exporter failed on the {metadata['role']} network: "
                              f"{type(err).__name__}: {first}") from err


def export_checkpoint(checkpoint: str | Path, output: str | Path, fmt: str = "pt",
                      roles: tuple[str, ...] = ROLES) -> ExportResult:
    """Write ``checkpoint``'s model at its width as ``fmt`` to ``output``, only if it matches the training model.

    Args:
        checkpoint: a training (or standalone, or sliced) checkpoint of a student, teacher or plain FCOS.
        output: the file to write; refused if it exists.
        fmt: "pt", "torchscript" or "onnx".
        roles: the roles accepted (the teacher hand-off takes teachers only).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: unknown export format; allowed: {', '.join(FORMATS)}")
    output = Path(output)
    if output.exists():
        raise UserError(f"{output}: already exists; choose another --output (nothing was overwritten)")
    if not output.parent.is_dir():
        raise UserError(f"{output}: folder {output.parent} does not exist")
    model, state, cfg = load_training_model(checkpoint, roles)
    role = state["role"]
    images, sizes = check_batch(cfg)
    reference, reference_detections = eager_reference(model, images, sizes)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        detector = deploy_detector(model)
        example = network_input(role, images, cfg.data.low_res_mode)
        if fmt == "pt":
            data = sliced_state(model, state, cfg, checkpoint)
            torch.save(data, tmp)
        else:
            metadata = {"role": role, "width": cfg.model.width, "input": NETWORK_INPUT[role], "strides": list(STRIDES),
                        "input_format": cfg.data.input_format, "low_res_mode": cfg.data.low_res_mode,
                        "num_classes": cfg.model.num_classes, "source": str(checkpoint)}
            _run_exporter(fmt, detector, example, metadata, tmp)
        error, count = _check_file(fmt, tmp, role, cfg.data.low_res_mode, images, sizes, reference,
                                   reference_detections)
        if error > HEAD_RTOL:
            raise _CheckFailed(f"head outputs differ by {error:.2e} (relative), above the tolerance {HEAD_RTOL:g}")
        if fmt == "pt":
            save_checkpoint(data, output)  # atomic, with the SHA-256 sidecar every msad checkpoint has
        else:
            os.replace(tmp, output)
    except _CheckFailed as failed:
        raise UserError(f"{output}: not written: the {fmt} export of {checkpoint} does not match the training "
                        f"model: {failed}") from None
    except _ExporterFailed as failed:
        raise UserError(f"{output}: not written: {failed}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(output, fmt, role, cfg.model.width, output.stat().st_size, error, count)


def export_standalone_student(checkpoint: str | Path, output: str | Path) -> Path:
    """A student for deployment: the ``pt`` format of ``export_checkpoint``, students only.

    Weights at the student's width only (no other widths, no teacher, no optimizer) and the config that rebuilds
    them, checked against the training model before it is written.
    """
    return export_checkpoint(checkpoint, output, "pt", roles=("student",)).path
