"""The deployed network: plain convs (BN folded), the pyramid, the head and, for the teacher, C-FF.

``DeployedNetwork.forward`` is exactly what the exported graphs compute: an image tensor in, per-level head outputs
out. Its input is what the network reads -- H for the teacher and plain FCOS, **L for the student** (the small
image a low-resolution camera delivers) -- and its outputs predict at strides 8..128 of H, as in training.
``DeployedDetector`` adds detections two ways:

- ``detect(images, image_sizes)``: decoding + NMS in TorchScript-compilable code on the network's own input, boxes
  in that input's pixels (for the student: L pixels, clipped to ``image_sizes`` given in L pixels). This is what
  the TorchScript file's ``detect`` runs.
- ``predict(images, image_sizes)``: the training model's ``predict`` signature and meaning (the H batch for every
  role; the student halves it itself; boxes in H pixels), with msad's own ``fcos_detections``, so evaluation code
  written for the training model runs unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msad.checkpoint import ROLES
from msad.data.transforms import to_low_resolution
from msad.deploy.postprocess import fcos_detections_scriptable
from msad.deploy.slicing import PlainResNet50, fold_backbone
from msad.models.detector import HIGH_LEVELS, LOW_LEVELS, FCOSDetector, pyramid_features
from msad.models.fcos import STRIDES, HeadOutputs, fcos_detections
from msad.models.fpn import FeaturePyramid
from msad.models.student import MSADStudent
from msad.models.teacher import MSADTeacher

# What each role's network reads: the student L, the others H (the teacher halves H itself for its L pass).
NETWORK_INPUT: dict[str, str] = {"student": "L", "teacher": "H", "fcos": "H"}
HeadTuple = tuple[list[Tensor], list[Tensor], list[Tensor]]


def role_of(model: nn.Module) -> str:
    """``student``, ``teacher`` or ``fcos`` for a training model; TypeError for anything else."""
    for cls, role in ((MSADStudent, "student"), (MSADTeacher, "teacher"), (FCOSDetector, "fcos")):
        if isinstance(model, cls):
            return role
    raise TypeError(f"expected an MSADStudent, MSADTeacher or FCOSDetector, got {type(model).__name__}")


def _low_resolution(images: Tensor, mode: str) -> Tensor:
    """``to_low_resolution`` without its even-size check, which a traced or exported graph cannot keep."""
    if mode == "nearest":
        return F.interpolate(images, scale_factor=0.5, mode="nearest")
    return F.interpolate(images, size=(images.shape[-2] // 2, images.shape[-1] // 2), mode="bilinear",
                         antialias=True, align_corners=False)


class DeployedNetwork(nn.Module):
    """Backbone (plain convs) + pyramid + head [+ C-FF]: image tensor -> (cls_logits, box_regression, centerness).

    Args:
        role: "student", "teacher" (its fused branch, the teacher's real output) or "fcos".
        backbone: the folded backbone.
        pyramid: the model's pyramid (only the levels the role reads are ever run).
        head: the model's FCOS head.
        fusion: the teacher's C-FF module; None otherwise (and for a teacher built without fusion).
        low_res_mode: how the teacher makes L from H ("nearest" or "antialias").
    """

    def __init__(self, role: str, backbone: PlainResNet50, pyramid: FeaturePyramid, head: nn.Module,
                 fusion: nn.Module | None, low_res_mode: str) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role, self.low_res_mode = role, low_res_mode
        self.backbone, self.pyramid, self.head, self.fusion = backbone, pyramid, head, fusion

    def forward(self, images: Tensor) -> HeadTuple:
        if self.role == "student":
            features = pyramid_features(self.backbone, self.pyramid, images, LOW_LEVELS)  # type: ignore[arg-type]
        else:
            features = pyramid_features(self.backbone, self.pyramid, images, HIGH_LEVELS)  # type: ignore[arg-type]
            if self.role == "teacher" and self.fusion is not None:
                low_images = _low_resolution(images, self.low_res_mode)
                low = pyramid_features(self.backbone, self.pyramid, low_images, LOW_LEVELS)  # type: ignore[arg-type]
                features, _ = self.fusion(features, low)
        outputs = self.head(features)
        return outputs.cls_logits, outputs.box_regression, outputs.centerness


class FlatOutputs(nn.Module):
    """The network with its 15 outputs as one flat tuple (cls_logits p*, box_regression p*, centerness p*): ONNX."""

    def __init__(self, network: DeployedNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        cls_logits, box_regression, centerness = self.network(images)
        return (*cls_logits, *box_regression, *centerness)


class DeployedDetector(nn.Module):
    """What ``msad.deploy.load_exported`` returns: the deployed network, in eval mode, with detection methods.

    Args:
        network: the deployed network.
        input_scale: network-input pixels per H pixel's worth of box coordinates: 2 for the student (its boxes are
            decoded at H strides, then halved into L pixels), 1 otherwise.
    """

    def __init__(self, network: DeployedNetwork, input_scale: int) -> None:
        super().__init__()
        self.network = network
        self.input_scale = input_scale
        self.strides: list[int] = list(STRIDES)

    @property
    def role(self) -> str:
        return self.network.role

    def forward(self, images: Tensor) -> HeadTuple:
        """Per-level head outputs of the network's input (L for the student, H otherwise)."""
        return self.network(images)

    @torch.no_grad()
    def detect(self, images: Tensor, image_sizes: Tensor, score_thresh: float = 0.05, pre_nms_topk: int = 1000,
               nms_thresh: float = 0.6, max_detections: int = 100) -> list[dict[str, Tensor]]:
        """Detections on the network's input, boxes in its pixels (what the TorchScript file's ``detect`` does).

        Args:
            images: [B, 3, h, w] the network's input (L for the student), padded like training batches.
            image_sizes: [B, 2] (h, w) of each image before padding, in the input's pixels.
        """
        outputs = self.network(images)
        return scaled_detections(outputs, self.strides, image_sizes, self.input_scale, score_thresh, pre_nms_topk,
                                 nms_thresh, max_detections)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]], **postprocess_kwargs) -> list[dict]:
        """The training model's ``predict``: the H batch in, detections in H pixels (teacher: the fused branch)."""
        inputs = to_low_resolution(images, self.network.low_res_mode) if self.role == "student" else images
        outputs = HeadOutputs(*self.network(inputs))
        return fcos_detections(outputs, STRIDES, image_sizes, **postprocess_kwargs)


def scaled_detections(outputs: HeadTuple, strides: list[int], image_sizes: Tensor, input_scale: int,
                      score_thresh: float, pre_nms_topk: int, nms_thresh: float,
                      max_detections: int) -> list[dict[str, Tensor]]:
    """Detections decoded at H strides and divided by ``input_scale`` (a power of two: exact in float)."""
    detections = fcos_detections_scriptable(outputs[0], outputs[1], outputs[2], strides, image_sizes * input_scale,
                                            score_thresh, pre_nms_topk, nms_thresh, max_detections)
    if input_scale != 1:
        for found in detections:
            found["boxes"] = found["boxes"] / input_scale
    return detections


def deploy_network(model: nn.Module) -> DeployedNetwork:
    """The deployed network of a training (or sliced) model at its active width; the model is left untouched.

    BN is folded with its running statistics, so the network computes the model's eval-mode outputs. A teacher
    built without fusion gives its H branch (what its ``predict`` calls fused).
    """
    role = role_of(model)
    fusion = getattr(model, "fusion", None)
    parts = copy.deepcopy(nn.ModuleDict({"pyramid": model.pyramid, "head": model.head,
                                         **({"fusion": fusion} if fusion is not None else {})}))
    network = DeployedNetwork(role, fold_backbone(model.backbone), parts["pyramid"], parts["head"],
                              parts["fusion"] if fusion is not None else None,
                              getattr(model, "low_res_mode", "nearest"))
    return network.eval().requires_grad_(False)


def deploy_detector(model: nn.Module) -> DeployedDetector:
    """``deploy_network`` with the detection methods, in eval mode."""
    network = deploy_network(model)
    return DeployedDetector(network, 2 if network.role == "student" else 1).eval()

