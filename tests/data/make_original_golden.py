"""Generate tests/data/original_golden_w025.pt by running the original MSAD code (dvlab-research/MSAD) on CPU.

The fixture is the independent reference for `tests/test_original_golden.py`: a checkpoint in the original's own
format (random weights), the inputs, and what the original's TFCOS (teacher) and SFCOS (student) compute from them,
level by level. Nothing of the original is imported by msad or by the test; CI never runs this script.

    python tests/data/make_original_golden.py --msad ~/src/MSAD --detectron2 ~/src/detectron2 --deps /tmp/d2deps

- `--msad`: a checkout of https://github.com/dvlab-research/MSAD (made with commit a65fc09, its newest).
- `--detectron2`: a checkout of https://github.com/facebookresearch/detectron2 at be792b95 (the commit the
  original's README names), used as source only: nothing is compiled; `detectron2._C` is replaced by an empty
  module in this process (deformable conv, ROIAlign and rotated boxes need it; MSAD's FCOS does not).
- `--deps`: a folder holding Detectron2's pure-Python dependencies (`pip install --target DIR --no-deps fvcore
  iopath yacs termcolor tabulate portalocker tqdm cloudpickle`), kept out of the project's environment.

Run it with msad's own virtualenv (for torch): the original's package is also named `msad`, so this script puts
the checkout first on `sys.path` and never imports the project. Size choices keep the file small and stay within
what the original's configs allow: width 0.25 with `SLRESNETS.WIDTH_MULT_LIST [0.25]` (tensors at that width only),
FPN 64 channels (its `SE` block, whose input width the original fixes at 512 = 2 x 256, is the original's own
`SELayer` made with `in_channel=128`), 6 classes, plain BN (identical to SyncBN in eval on one process). Weights
are drawn at random and stored as int8 with one float32 scale per tensor (`quantised`); the original runs on the
dequantised values, int8 * scale in float32, which the test rebuilds bit for bit, so both sides use the same weights.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

OUT = Path(__file__).resolve().parent / "original_golden_w025.pt"


def import_original(msad: Path, detectron2: Path, deps: Path | None) -> types.ModuleType:
    sys.path[:0] = [str(msad), str(detectron2), *([str(deps)] if deps else [])]
    sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
    import PIL.Image

    PIL.Image.LINEAR, PIL.Image.ANTIALIAS = PIL.Image.BILINEAR, PIL.Image.LANCZOS  # removed in Pillow 10
    import msad as original

    assert Path(original.__file__).is_relative_to(msad), f"imported {original.__file__}, not the original"
    return original


def build(original: types.ModuleType, msad_root: Path, config: str):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    original.add_msad_config(cfg)
    cfg.merge_from_file(str(msad_root / "configs" / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.SLRESNETS.NORM", "BN",
                         "MODEL.SLRESNETS.WIDTH_MULT_LIST", "[0.25]", "MODEL.FPN.OUT_CHANNELS", "64",
                         "MODEL.FCOS.NUM_CLASSES", "6"])
    model = build_model(cfg)
    arch = sys.modules[type(model).__module__]
    model.SE = arch.SELayer(in_channel=128, reduction=16)  # the original's class; 2 x 64 channels in
    return model


def randomise(model, generator) -> None:
    """Weights and BN statistics away from their init, so that every parameter matters."""
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                value = torch.rand(tensor.shape, generator=generator) + 0.5
            elif name.endswith("running_mean"):
                value = torch.randn(tensor.shape, generator=generator) * 0.1
            elif name.endswith(".scale"):  # FCOS per-level scales
                value = torch.rand(tensor.shape, generator=generator) + 0.5
            elif tensor.dim() == 1:  # norm affine and conv biases
                base = 1.0 if ("bn" in name or "tower" in name) and name.endswith("weight") else 0.0
                value = base + torch.randn(tensor.shape, generator=generator) * 0.1
            else:  # conv and linear weights: He-like, so activations stay O(1) through 50 layers
                fan_in = tensor[0].numel()
                value = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            tensor.copy_(value)


def quantised(tensor):
    """(int8 values, float32 scale) with `values.float() * scale` the tensor's new value (set by the caller)."""
    import torch

    scale = (tensor.abs().max() / 127).clamp_min(1e-12).float()
    values = torch.round(tensor / scale).clamp(-127, 127)
    if (tensor > 0).all():  # variances and scales stay positive
        values = values.clamp_min(1)
    return values.to(torch.int8), scale


def quantise_in_place(model) -> dict:
    """Every float tensor of the state becomes int8 * scale; returns {key: (int8 values, scale)}."""
    import torch

    stored = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values, scale = quantised(tensor)
                tensor.copy_(values.float() * scale)
                stored[name] = (values, scale)
            else:
                stored[name] = (tensor.clone(), None)
    return stored


def calibrate_batch_norm(model, backbones, inputs) -> None:
    """Running statistics measured on the inputs (H and L, as the model feeds them), then float16-rounded:
    random statistics would let activations grow ~255x per stem (the original reads 0-255 pixels) and saturate."""
    import torch
    from torch import nn

    with torch.no_grad():
        high, low = model.preprocess_image([{"image": image} for image in inputs[:1]])
        for backbone in backbones:
            norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the calibration batches
            backbone.train()
            for image in inputs:
                high, low = model.preprocess_image([{"image": image}])
                backbone(high.tensor)
                backbone(low.tensor)
            backbone.eval()
            for norm in norms:
                norm.momentum = 0.1


class Recorder:
    """Forward hooks that keep what a module returns, call by call."""

    def __init__(self, **modules) -> None:
        self.calls: dict[str, list] = {name: [] for name in modules}
        for name, module in modules.items():
            module.register_forward_hook(lambda _m, _i, out, name=name: self.calls[name].append(out))


def detections(instances) -> dict:
    return {"boxes": instances.pred_boxes.tensor.clone(), "scores": instances.scores.clone(),
            "classes": instances.pred_classes.clone()}


def images(generator) -> list:
    """Two BGR uint8 images of different sizes: smooth colour fields plus noise (not pure noise)."""
    import torch
    import torch.nn.functional as F

    out = []
    for height, width in ((96, 128), (112, 80)):
        coarse = torch.rand(1, 3, height // 16, width // 16, generator=generator)
        smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        noisy = smooth * 200 + torch.rand(3, height, width, generator=generator) * 55
        out.append(noisy.clamp(0, 255).to(torch.uint8))
    return out


GT_BOXES = (  # per image: (x1, y1, x2, y2) in pixels, class; sizes spread over P3 (<= 64) and P4 (64..128)
    ([[8.0, 10.0, 40.0, 30.0], [50.0, 20.0, 120.0, 90.0], [70.0, 60.0, 86.0, 72.0]], [0, 3, 5]),
    ([[5.0, 5.0, 75.0, 100.0], [20.0, 30.0, 44.0, 50.0]], [2, 1]),
)


def train_batch(inputs) -> list:
    """The images with ground truth, as the original's DatasetMapper hands them to the model in training."""
    import torch
    from detectron2.structures import Boxes, Instances

    batch = []
    for image, (boxes, classes) in zip(inputs, GT_BOXES, strict=True):
        instances = Instances(tuple(image.shape[1:]))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        batch.append({"image": image, "instances": instances})
    return batch


def training_losses(model, batch) -> dict:
    """One training forward of the original on both images (train mode: BN uses the batch's statistics, as the
    original trains); the model's state is restored afterwards, so BN's running statistics do not move."""
    import torch

    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        losses = {k: v.detach().clone() for k, v in model(batch).items()}
    model.load_state_dict(state)
    model.eval()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--msad", type=Path, required=True)
    parser.add_argument("--detectron2", type=Path, required=True)
    parser.add_argument("--deps", type=Path)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    original = import_original(args.msad.resolve(), args.detectron2.resolve(), args.deps)
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = images(generator)
    student = build(original, args.msad, "SLR025-50-S.yaml").eval()
    randomise(student, generator)
    calibrate_batch_norm(student, [student.T_backbone, student.S_backbone], inputs)
    with torch.no_grad():  # detections above the 0.05 threshold at random weights: lift the class prior
        student.S_fcos_head.cls_logits.bias.fill_(-1.0)
        student.T_fcos_head.cls_logits.bias.fill_(-1.0)
    stored = quantise_in_place(student)
    state = {k: v.clone() for k, v in student.state_dict().items()}  # the original's student file: T_*, SE, S_*
    teacher = build(original, args.msad, "SLR025-50-T.yaml").eval()
    missing = teacher.load_state_dict({k: v for k, v in state.items() if not k.startswith("S_")}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys

    record_t = Recorder(backbone=teacher.T_backbone, se=teacher.SE, head=teacher.T_fcos_head)
    record_s = Recorder(backbone=student.S_backbone, head=student.S_fcos_head)
    teacher_out, student_out = [], []
    with torch.no_grad():
        for image in inputs:  # one image per forward, as the original evaluates
            height, width = image.shape[1:]
            batch = [{"image": image, "height": height, "width": width}]
            t_det = detections(teacher(batch)[0]["instances"])
            high, low = record_t.calls["backbone"][-2:]
            heads = record_t.calls["head"][-3:]
            teacher_out.append({
                "high": [high[k] for k in teacher.h_in_features], "low": [low[k] for k in teacher.l_in_features],
                "fusion_weights": torch.stack([s.view(-1) for s in record_t.calls["se"][-5:]]),  # [levels, 2]
                "heads": {branch: {"cls_logits": h[0], "box_regression": h[1], "centerness": h[2]}
                          for branch, h in zip(("high", "low", "fused"), heads, strict=True)},
                "detections": t_det,
            })
            s_det = detections(student(batch)[0]["instances"])
            (low_s,) = record_s.calls["backbone"][-1:]
            (head_s,) = record_s.calls["head"][-1:]
            student_out.append({
                "low": [low_s[k] for k in student.l_in_features],
                "heads": {"student": {"cls_logits": head_s[0], "box_regression": head_s[1],
                                      "centerness": head_s[2]}},
                "detections": s_det,
            })
    batch = train_batch(inputs)
    teacher_losses = training_losses(teacher, batch)
    student.count = 500  # the original's KD ramp (count / 500) finished: the KD term at full weight
    student_losses = training_losses(student, batch)
    data = {
        "checkpoint_int8": {k: values for k, (values, _) in stored.items()},  # the original's keys
        "checkpoint_scales": {k: scale for k, (_, scale) in stored.items() if scale is not None},
        "images_bgr": inputs,
        "teacher": teacher_out,
        "student": student_out,
        "gt": [{"boxes": torch.tensor(boxes), "labels": torch.tensor(classes)} for boxes, classes in GT_BOXES],
        "teacher_losses": teacher_losses,  # loss_fcos_{cls,loc,ctr}_{hr,lr,fr}, the fr terms x JOINT_WEIGHT 0.4
        "student_losses": student_losses,  # loss_fcos_{cls,loc,ctr}_st and loss_kd (alpha 0.2, T 3, ramp done)
        "settings": {"width": 0.25, "fpn_channels": 64, "fusion_hidden": 8, "num_classes": 6, "gn_groups": 32,
                     "size_divisibility": 256, "score_threshold": 0.05, "pre_nms_topk": 1000, "nms_threshold": 0.6,
                     "detections_per_image": 100, "made_with": "dvlab-research/MSAD a65fc09, detectron2 be792b95"},
    }
    torch.save(data, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {summary(data)}")


def summary(data: dict) -> str:
    """What `main` prints of the fixture after its path and size: detections per image and the losses, rounded.
    tests/test_original_golden.py pins this line of the committed fixture (and its SHA-256): a regenerated fixture
    fails that test until both are updated there."""
    return (f"teacher detections {[len(t['detections']['scores']) for t in data['teacher']]}, "
            f"student detections {[len(s['detections']['scores']) for s in data['student']]}; "
            f"teacher losses {({k: round(v.item(), 4) for k, v in data['teacher_losses'].items()})}; "
            f"student losses {({k: round(v.item(), 4) for k, v in data['student_losses'].items()})}")


if __name__ == "__main__":
    main()
