"""Converting the original Detectron2 checkpoints: a round trip through the original names, and strictness."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from msad.errors import UserError
from msad.models.convert import STEM_WEIGHT, convert_original, infer_width, load_original
from msad.models.state import load_state_strictly
from msad.models.student import MSADStudent
from msad.models.teacher import MSADTeacher

# head_convs=4: the original's tower layout (convs 0/3/6/9, GroupNorms 1/4/7/10).
TINY = {"width": 0.25, "fpn_channels": 32, "num_classes": 3, "head_convs": 4, "gn_groups": 8}

# Ours -> original, from the original Detectron2 checkpoint's key names (the inverse of what the converter does).
_TO_ORIGINAL = (
    (r"backbone\.(features\..+)", r"{p}_backbone.bottom_up.\1"),
    (r"pyramid\.lateral\.(\d)\.(.+)", r"{p}_backbone.fpn_lateral\1.\2"),
    (r"pyramid\.output\.(\d)\.(.+)", r"{p}_backbone.fpn_output\1.\2"),
    (r"pyramid\.(p6|p7)\.(.+)", r"{p}_backbone.top_block.\1.\2"),
    (r"head\.(.+)", r"{p}_fcos_head.\1"),
    (r"fusion\.(fc\.\d\.weight)", r"SE.\1"),
)


def _to_original(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    renamed = {}
    for key, value in state.items():
        for pattern, template in _TO_ORIGINAL:
            if re.fullmatch(pattern, key):
                renamed[re.sub(pattern, template.format(p=prefix), key)] = value.clone()
                break
        else:
            raise AssertionError(f"test mapping misses {key}")
    return renamed


@pytest.fixture(scope="module")
def trained_pair() -> tuple[MSADTeacher, MSADStudent]:
    torch.manual_seed(11)
    teacher, student = MSADTeacher(**TINY).eval(), MSADStudent(**TINY).eval()
    with torch.no_grad():  # make BN statistics and the box scales differ from a fresh model's
        for model in (teacher, student):
            for name, buffer in model.named_buffers():
                if "running_var" in name:
                    buffer.uniform_(0.5, 2.0)
            for scale in model.head.scales:
                scale.scale.uniform_(0.5, 2.0)
    return teacher, student


def _original_student_file(teacher: MSADTeacher, student: MSADStudent) -> dict[str, Tensor]:
    return {**_to_original(teacher.state_dict(), "T"), **_to_original(student.state_dict(), "S")}


def test_original_names_are_the_documented_ones(trained_pair: tuple[MSADTeacher, MSADStudent]) -> None:
    original = _to_original(trained_pair[0].state_dict(), "T")
    for key in ("T_backbone.bottom_up.features.0.0.weight", "T_backbone.bottom_up.features.0.1.bn.3.running_mean",
                "T_backbone.bottom_up.features.16.body.6.weight", "T_backbone.bottom_up.features.1.shortcut.0.weight",
                "T_backbone.fpn_lateral2.weight", "T_backbone.fpn_output5.bias", "T_backbone.top_block.p7.weight",
                "T_fcos_head.cls_tower.9.weight", "T_fcos_head.bbox_tower.10.bias", "T_fcos_head.cls_logits.bias",
                "T_fcos_head.bbox_pred.weight", "T_fcos_head.ctrness.weight", "T_fcos_head.scales.4.scale"):
        assert key in original, key
    assert original["SE.fc.0.weight"].shape == (32, 2 * TINY["fpn_channels"])
    assert original["SE.fc.2.weight"].shape == (2, 32)
    assert "T_fcos_head.bbox_pred.bias" not in original and "T_fcos_head.ctrness.bias" not in original


def test_round_trip_gives_identical_outputs(trained_pair: tuple[MSADTeacher, MSADStudent], tmp_path: Path) -> None:
    teacher, student = trained_pair
    path = tmp_path / "model_final.pth"
    torch.save({"model": _original_student_file(teacher, student), "iteration": 45000}, path)
    converted = load_original(path)
    assert converted.role == "student" and converted.teacher is not None and converted.student is not None
    assert infer_width(converted.student) == TINY["width"]

    torch.manual_seed(12)
    fresh_teacher, fresh_student = MSADTeacher(**TINY).eval(), MSADStudent(**TINY).eval()
    load_state_strictly(fresh_teacher, converted.teacher, str(path))
    load_state_strictly(fresh_student, converted.student, str(path))
    for ours, converted_state in ((teacher, converted.teacher), (student, converted.student)):
        assert converted_state.keys() == ours.state_dict().keys()
        assert all(torch.equal(converted_state[k], v) for k, v in ours.state_dict().items() if k != STEM_WEIGHT)


def test_stem_reads_msads_input_as_the_original_read_its_own(trained_pair: tuple[MSADTeacher, MSADStudent]) -> None:
    """The original's stem on Detectron2's input (BGR, 0-255 minus its mean, std 1), computed here from those
    definitions, equals the converted stem on msad's input (RGB, 0-1, ImageNet mean/std) of the same pixels."""
    from msad.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    original_stem = torch.randn(16, 3, 7, 7, generator=torch.Generator().manual_seed(3))
    state = _to_original(trained_pair[0].state_dict(), "T")
    state["T_backbone.bottom_up.features.0.0.weight"] = original_stem
    folded = convert_original(state).teacher[STEM_WEIGHT]
    pixels = torch.randint(0, 256, (1, 3, 40, 48), generator=torch.Generator().manual_seed(4)).float()  # RGB
    detectron2_input = pixels.flip(1) - torch.tensor([103.530, 116.280, 123.675]).view(1, 3, 1, 1)
    msad_input = (pixels / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    want = torch.nn.functional.conv2d(detectron2_input, original_stem, stride=2, padding=3)
    got = torch.nn.functional.conv2d(msad_input, folded, stride=2, padding=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


def test_teacher_file_converts_to_a_teacher(trained_pair: tuple[MSADTeacher, MSADStudent]) -> None:
    converted = convert_original(_to_original(trained_pair[0].state_dict(), "T"))
    assert converted.role == "teacher" and converted.student is None
    assert converted.teacher is not None
    assert converted.teacher.keys() == trained_pair[0].state_dict().keys()


def test_unknown_or_incomplete_keys_are_refused(trained_pair: tuple[MSADTeacher, MSADStudent]) -> None:
    original = _to_original(trained_pair[0].state_dict(), "T")
    with pytest.raises(UserError, match="'T_fcos_head.share_tower.0.weight'"):
        convert_original({**original, "T_fcos_head.share_tower.0.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="'T_backbone.bottom_up.classifier.0.weight'"):
        convert_original({**original, "T_backbone.bottom_up.classifier.0.weight": torch.zeros(1)})
    head_only = {k: v for k, v in original.items() if k.startswith("T_fcos_head.")}
    with pytest.raises(UserError, match="backbone, FPN and head needed"):
        convert_original(head_only)
    with pytest.raises(UserError, match="no MSAD weights"):
        convert_original({})
    # A converted state that lacks a key fails loading by name, before touching the model.
    converted = convert_original({k: v for k, v in original.items() if k != "T_backbone.fpn_output3.bias"})
    with pytest.raises(UserError, match="'pyramid.output.3.bias'"):
        load_state_strictly(MSADTeacher(**TINY), converted.teacher, "converted")


def test_saved_input_normalisation_is_checked(trained_pair: tuple[MSADTeacher, MSADStudent]) -> None:
    """The fold assumes Detectron2's default input; a file saying otherwise is refused, naming the buffer."""
    original = _to_original(trained_pair[0].state_dict(), "T")
    detectron2 = {"pixel_mean": torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1),
                  "pixel_std": torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1)}
    assert convert_original({**original, **detectron2}).role == "teacher"
    rgb = {"pixel_mean": torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1),
           "pixel_std": torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)}
    with pytest.raises(UserError, match="pixel_mean is .*not Detectron2's default"):
        convert_original({**original, **rgb})
    with pytest.raises(UserError, match="pixel_std is .*not Detectron2's default"):
        convert_original({**original, **detectron2, "pixel_std": rgb["pixel_std"]})


def test_numpy_checkpoint_gets_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "numpy.pth"
    torch.save({"model": {"T_fcos_head.ctrness.weight": np.zeros((1, 32, 3, 3), dtype=np.float32)}}, path)
    with pytest.raises(UserError, match="numpy arrays.*re-save"):
        load_original(path)
    with pytest.raises(UserError, match="does not exist"):
        load_original(tmp_path / "missing.pth")


def test_launch_convert_then_eval_runs_the_original_student_alone(tmp_path: Path, shapes_cache: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The user path for the original's released models: `launch.py convert`, then `launch.py eval`."""
    from msad.checkpoint import load_checkpoint
    from msad.cli import main

    shapes = {**TINY, "num_classes": 6}  # the built-in dataset's classes, so eval can score it
    teacher, student = MSADTeacher(**shapes).eval(), MSADStudent(**shapes).eval()
    original = tmp_path / "MSAD-R50-S025-1x.pth"
    torch.save({"model": _original_student_file(teacher, student)}, original)
    config = tmp_path / "model.yaml"
    config.write_text(
        f"model: {{width: {TINY['width']}, fpn_channels: {TINY['fpn_channels']}, gn_groups: {TINY['gn_groups']},"
        f" num_classes: 6}}\n"
        f"data: {{shapes: {{num_train: 8, num_val: 4, image_size: [96, 128], object_size: [8, 40],"
        f" cache_dir: '{shapes_cache}'}}, test_short_side: 128, num_workers: 0}}\n")
    out = tmp_path / "student.pt"
    assert main(["convert", str(config), "--original", str(original), "--output", str(out)]) == 0
    state = load_checkpoint(out)
    assert state["role"] == "student" and state["kind"] == "standalone"
    assert not any(k.startswith("fusion") for k in state["model"])  # the teacher is not carried along
    assert main(["convert", str(config), "--original", str(original), "--output", str(out)]) == 2  # no overwrite
    capsys.readouterr()
    assert main(["eval", str(config), "--weights", str(out), "--output", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["role"] == "student" and 0.0 <= metrics["AP"] <= 1.0


def test_convert_of_a_teacher_never_reads_model_pretrained(trained_pair: tuple[MSADTeacher, MSADStudent],
                                                          tmp_path: Path) -> None:
    """Every weight comes from the original file: a configured ImageNet file that is not on this machine is not
    needed (before, `convert` built the model with it and failed)."""
    from msad.checkpoint import load_checkpoint
    from msad.cli import main

    original = tmp_path / "MSAD-teacher.pth"
    torch.save({"model": _to_original(trained_pair[0].state_dict(), "T")}, original)
    config = tmp_path / "model.yaml"
    config.write_text(f"model: {{width: {TINY['width']}, fpn_channels: {TINY['fpn_channels']}, "
                      f"gn_groups: {TINY['gn_groups']}, num_classes: {TINY['num_classes']}}}\n")
    out = tmp_path / "teacher.pt"
    assert main(["convert", str(config), "--original", str(original), "--output", str(out),
                 "model.pretrained=/nowhere/s_resnet50_0.25_0.5_0.75_1.0.pt"]) == 0
    state = load_checkpoint(out)
    assert state["role"] == "teacher" and state["config"]["model"]["pretrained"].startswith("/nowhere/")
    assert all(torch.equal(state["model"][k], v) for k, v in trained_pair[0].state_dict().items()
               if k != STEM_WEIGHT)  # the stem takes the input normalisation (test_stem_reads_msads_input...)
