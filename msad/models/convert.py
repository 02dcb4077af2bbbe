"""Convert the original MSAD project's Detectron2 checkpoints (``model_final.pth``) to this package's names.

The original saves ``{"model": state_dict, ...}``. A teacher file holds ``T_backbone.*`` (slimmable ResNet-50 under
``bottom_up.features``, FPN ``fpn_lateral{2..5}`` / ``fpn_output{2..5}``, ``top_block.p6`` / ``p7``),
``T_fcos_head.*`` and the fusion ``SE.fc.{0,2}.weight``; a student file holds the same plus ``S_backbone.*`` and
``S_fcos_head.*``. Our modules were named to make this a prefix rename: the backbone keeps the slimmable layout,
the head keeps the FCOS attribute names, the pyramid has ``lateral.{k}`` / ``output.{k}`` / ``p6`` / ``p7`` and the
fusion ``fc``. Every key must match a rule; anything else is refused by name, so nothing is silently dropped.

The original reads Detectron2's default input: BGR, 0-255, minus (103.530, 116.280, 123.675), std 1. msad reads
RGB in 0-1 normalised with ImageNet's mean and std. 255 x ImageNet's mean is Detectron2's mean in reverse order,
so the original's input is, channel by channel, a scaling of ours: x_bgr[c] = 255 * std[2 - c] * x_rgb[2 - c]. The
stem conv is linear, so ``fold_input_normalisation`` moves that scaling into its weights, exactly; zero padding is
zero in both spaces. (The original saves no pixel_mean / pixel_std buffers; a file that does and disagrees with
Detectron2's defaults is refused.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from msad.data.transforms import DETECTRON2_PIXEL_MEAN, DETECTRON2_PIXEL_STD, IMAGENET_MEAN, IMAGENET_STD
from msad.errors import UserError
from msad.files import read_tensor_file

_PIXEL_STATS = {"pixel_mean": DETECTRON2_PIXEL_MEAN, "pixel_std": DETECTRON2_PIXEL_STD}
STEM_WEIGHT = "backbone.features.0.0.weight"

_HEAD_PARAMS = (
    r"(?:cls|bbox)_tower\.\d+\.(?:weight|bias)|cls_logits\.(?:weight|bias)|bbox_pred\.weight|ctrness\.weight"
    r"|scales\.\d+\.scale"
)


def _rules(prefix: str) -> list[tuple[re.Pattern[str], str]]:
    """(pattern on the original key, our key template) for one model, ``prefix`` "T" (teacher) or "S" (student)."""
    return [
        (re.compile(rf"{prefix}_backbone\.bottom_up\.(features\..+)"), r"backbone.\1"),
        (re.compile(rf"{prefix}_backbone\.fpn_lateral([2-5])\.(weight|bias)"), r"pyramid.lateral.\1.\2"),
        (re.compile(rf"{prefix}_backbone\.fpn_output([2-5])\.(weight|bias)"), r"pyramid.output.\1.\2"),
        (re.compile(rf"{prefix}_backbone\.top_block\.(p6|p7)\.(weight|bias)"), r"pyramid.\1.\2"),
        (re.compile(rf"{prefix}_fcos_head\.({_HEAD_PARAMS})"), r"head.\1"),
    ]


_TEACHER_RULES = [*_rules("T"), (re.compile(r"SE\.(fc\.[02]\.weight)"), r"fusion.\1")]
_STUDENT_RULES = _rules("S")


@dataclass
class ConvertedCheckpoint:
    """Weights of an original checkpoint in our names.

    Args:
        role: "student" if the file holds a student (``S_*`` keys), else "teacher".
        teacher: an ``MSADTeacher`` state dict (with ``fusion.*`` only if the file had ``SE.*``: build the teacher
            with ``fusion=False`` otherwise); None if the file has no teacher keys.
        student: an ``MSADStudent`` state dict; None for a teacher file.
    """

    role: str
    teacher: dict[str, Tensor] | None
    student: dict[str, Tensor] | None


def _check_pixel_stats(key: str, value: Tensor, source: str) -> None:
    expected = torch.tensor(_PIXEL_STATS[key])
    if value.numel() != 3 or not torch.allclose(value.flatten().float(), expected, atol=0.01):
        raise UserError(
            f"{source}: {key} is {value.flatten().tolist()}, not Detectron2's default {list(expected.tolist())} "
            "(BGR, 0-255), which the conversion folds into the stem; these weights expect other inputs"
        )


def fold_input_normalisation(stem_weight: Tensor) -> Tensor:
    """The stem conv weights that give, on msad's input (RGB, 0-1, ImageNet mean/std), what ``stem_weight`` gives
    on the original's (BGR, 0-255 minus Detectron2's mean, std 1): input channel c of ours takes the original's
    channel 2 - c, times 255 x ImageNet std[c] (derivation in the module docstring).

    Args:
        stem_weight: [out, 3, k, k] weights of the original's first conv.
    """
    # the means cancel only because 255 x ImageNet's mean is Detectron2's, reversed: check, not assume
    reversed_mean = torch.tensor(IMAGENET_MEAN).flip(0) * 255.0
    assert torch.allclose(reversed_mean, torch.tensor(DETECTRON2_PIXEL_MEAN), atol=1e-3), reversed_mean
    scale = torch.tensor(IMAGENET_STD, dtype=stem_weight.dtype) * 255.0 / torch.tensor(DETECTRON2_PIXEL_STD)
    return stem_weight.flip(1) * scale.view(1, 3, 1, 1)


def convert_original(state_dict: Mapping[str, object], source: str = "original checkpoint",
                     fold_input: bool = True) -> ConvertedCheckpoint:
    """Rename an original MSAD state dict to our teacher / student state dicts.

    Args:
        state_dict: the ``"model"`` entry of an original checkpoint (tensors keyed ``T_*``, ``S_*``, ``SE.*``).
        source: what it came from (a path), for error messages.
        fold_input: fold Detectron2's input normalisation into the stem, for msad's default input
            (`data.input_format: rgb_imagenet`); False keeps the stem for `bgr_255`, the original's own input.

    Raises:
        UserError: a value is not a tensor, a key matches no rule (naming the first), an expected part is missing,
            or the file's saved input normalisation differs from ours.
    """
    teacher: dict[str, Tensor] = {}
    student: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise UserError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
        if key in _PIXEL_STATS:
            _check_pixel_stats(key, value, source)
            continue
        for target, rules in ((teacher, _TEACHER_RULES), (student, _STUDENT_RULES)):
            ours = next((pattern.sub(template, key) for pattern, template in rules if pattern.fullmatch(key)), None)
            if ours is not None:
                target[ours] = value
                break
        else:
            raise UserError(f"{source} has key {key!r}, which matches no part of an MSAD teacher or student")
    for name, part in (("teacher", teacher), ("student", student)):
        prefixes = {key.split(".", 1)[0] for key in part}
        if part and not {"backbone", "pyramid", "head"} <= prefixes:
            raise UserError(f"{source}: the {name} keys cover only {sorted(prefixes)}; backbone, FPN and head needed")
    if not teacher and not student:
        raise UserError(f"{source} holds no MSAD weights (no T_backbone / S_backbone keys)")
    for part in (teacher, student) if fold_input else ():
        if STEM_WEIGHT in part:
            part[STEM_WEIGHT] = fold_input_normalisation(part[STEM_WEIGHT])
    return ConvertedCheckpoint(
        role="student" if student else "teacher", teacher=teacher or None, student=student or None
    )


def infer_width(converted_state: Mapping[str, Tensor]) -> float:
    """The slimmable width a converted state dict was trained at, read from the res5 lateral's input channels.

    Slimmable convs are stored at full width for every width, but the pyramid's laterals take the sliced channels:
    res5 has int(2048 * width) of them.
    """
    return converted_state["pyramid.lateral.5.weight"].shape[1] / 2048


def load_original(path: str | Path, fold_input: bool = True) -> ConvertedCheckpoint:
    """Read an original ``.pth`` file with ``torch.load(weights_only=True)`` and convert it.

    Args:
        path: a Detectron2 checkpoint of the original project (``{"model": state_dict, ...}``).
        fold_input: see ``convert_original``.
    """
    path = Path(path)
    data = read_tensor_file(path, "checkpoint")
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path} is a {type(data).__name__}, not a Detectron2 checkpoint dict")
    state = data.get("model", data)
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path}: 'model' is a {type(state).__name__}, not a state dict")
    return convert_original(state, source=str(path), fold_input=fold_input)
