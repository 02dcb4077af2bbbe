"""Deployment: slicing against the eager slimmable model, the three export formats, the sliced-teacher hand-off and
the export command's one-line errors. Real models (tiny: FPN 32, 2 head convs), the built-in dataset, no mocks.

The random models are made "trained-like" first: BN statistics and affine away from the identity (else folding BN
would be a no-op and go untested) and decisive class/centerness logits (else nothing passes the 0.05 score
threshold, and "identical detections" would compare empty lists).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from msad.build import (
    build_model,
    build_optimizer,
    build_train_dataset,
    build_val_dataset,
    load_frozen_teacher,
    resolve_data_paths,
)
from msad.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from msad.cli import main
from msad.config import Config, config_from_dict
from msad.data.transforms import Batch, collate, to_low_resolution
from msad.deploy import export as export_module
from msad.deploy import (
    export_checkpoint,
    export_sliced_teacher,
    load_exported,
    load_sliced_teacher,
    slice_model,
)
from msad.deploy.export import HEAD_RTOL, check_batch, export_standalone_student, head_error, match_detections
from msad.deploy.latency import count_gflops, latency_table, measure
from msad.deploy.runtime import deploy_network
from msad.errors import UserError
from msad.models.fcos import STRIDES, HeadOutputs, fcos_detections
from msad.models.slimmable import WIDTHS
from msad.models.student import (
    check_teacher_matches,
    init_from_teacher,
    init_student_from_teacher,
    run_frozen_teacher,
)

TINY = ("model.head_convs=2",)


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """BN of every width away from the identity; class and centerness logits spread out (see the module doc)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for tensor, low, high in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5),
                                          (m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1)):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
        model.head.cls_logits.weight.mul_(40.0)
        model.head.cls_logits.bias.fill_(-1.0)
        model.head.ctrness.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these models are small, and two threads on a busy 2-core machine run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def configs(tiny_config, shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Config]:
    tmp = tmp_path_factory.mktemp("deploy_cfg")
    return {role: tiny_config(tmp, shapes_cache, role, role, *TINY) for role in ("student", "teacher", "fcos")}


@pytest.fixture(scope="module")
def val_batch(configs: dict[str, Config]) -> Batch:
    """The built-in dataset's 6 val images at H 128 (padded to 256), one batch."""
    cfg = configs["student"]
    dataset = build_val_dataset(cfg, resolve_data_paths(cfg.data))
    return collate([dataset[i] for i in range(len(dataset))], cfg.data.size_divisibility)


def _model(cfg: Config, seed: int, *overrides: str) -> nn.Module:
    from msad.config import config_from_dict, deep_merge, parse_overrides

    if overrides:
        cfg = config_from_dict(deep_merge(cfg.to_dict(), parse_overrides(list(overrides))))
    torch.manual_seed(seed)
    return trained_like(build_model(cfg, load_pretrained=False), seed).eval()


def _save_training_checkpoint(model: nn.Module, cfg: Config, path: Path) -> Path:
    return save_checkpoint({"version": 1, "kind": "training", "role": cfg.train.role, "width": cfg.model.width,
                            "iteration": 6, "config": cfg.to_dict(), "model": model.state_dict(), "metrics": {}}, path)


@pytest.fixture(scope="module")
def checkpoints(configs: dict[str, Config], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("deploy_ckpt")
    return {role: _save_training_checkpoint(_model(cfg, seed), cfg, tmp / f"{role}" / "checkpoint.pt")
            for seed, (role, cfg) in enumerate(configs.items(), start=11)}


def _all_equal(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in ("boxes", "scores", "labels"))


# The comparisons below are this file's own, written with plain torch (and torchvision's box_iou), so that a test
# that says "matches eager" is not checked by the exporter's gate (msad.deploy.export.head_error and
# match_detections), the code under test. The tolerances are the README's (export section), written out here.
EXPORT_RTOL = 1e-4  # head outputs: max |exported - eager| <= 1e-4 x max(1, max |eager|), per tensor
SCORE_TOL, BOX_TOL = 1e-4, 1e-2  # detections: scores within 1e-4, box corners within 1e-2 pixels


def _head_tensors(outputs) -> list[torch.Tensor]:
    """The 15 head tensors (cls logits, box regression, centerness; levels finest first) of any output layout."""
    if isinstance(outputs, HeadOutputs):
        return [*outputs.cls_logits, *outputs.box_regression, *outputs.centerness]
    if len(outputs) == 3:  # the network's and TorchScript's (cls, box, ctr) tuple of per-level lists
        return [tensor for group in outputs for tensor in group]
    return list(outputs)  # ONNX: 15 flat outputs


def _relative_head_errors(reference: HeadOutputs, outputs) -> list[float]:
    """Per head tensor, max |out - ref| / max(1, max |ref|): the exporter's measure, computed here."""
    refs, outs = _head_tensors(reference), _head_tensors(outputs)
    assert len(refs) == len(outs) == 3 * len(STRIDES)
    errors = []
    for ref, out in zip(refs, outs, strict=True):
        assert out.shape == ref.shape
        errors.append(((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1.0)).item())
    return errors


def _assert_heads_close(reference: HeadOutputs, outputs) -> None:
    """torch.testing.assert_close on each head tensor with atol EXPORT_RTOL x the eager tensor's scale."""
    for index, (ref, out) in enumerate(zip(_head_tensors(reference), _head_tensors(outputs), strict=True)):
        atol = EXPORT_RTOL * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.0, atol=atol,
                                   msg=lambda m, index=index: f"head tensor {index}: {m}")


def _assert_same_detections(reference: list[dict], found: list[dict], scale: float = 1.0) -> int:
    """Per image the same detections in any order: each eager detection paired with the found one of its class
    that overlaps it most (torchvision's box_iou; within a class NMS leaves no two boxes above IoU 0.6, so the
    pairing is unambiguous), one-to-one, scores within SCORE_TOL and corners within BOX_TOL pixels. ``scale``
    multiplies the found boxes first (2: a student's L-pixel boxes against H pixels). Returns the count."""
    total = 0
    for image, (ref, got) in enumerate(zip(reference, found, strict=True)):
        assert len(got["boxes"]) == len(ref["boxes"]), f"image {image}: {len(got['boxes'])} vs {len(ref['boxes'])}"
        if len(ref["boxes"]) == 0:
            continue
        boxes = got["boxes"].float() * scale
        overlap = box_iou(ref["boxes"].float(), boxes)
        overlap[ref["labels"][:, None] != got["labels"][None, :]] = -1.0
        pair = overlap.argmax(1)
        assert torch.equal(pair.sort().values, torch.arange(len(pair))), f"image {image}: not one-to-one"
        assert torch.equal(got["labels"][pair], ref["labels"]), f"image {image}: labels differ"
        torch.testing.assert_close(got["scores"][pair].float(), ref["scores"].float(), rtol=0.0, atol=SCORE_TOL)
        torch.testing.assert_close(boxes[pair], ref["boxes"].float(), rtol=0.0, atol=BOX_TOL)
        total += len(ref["boxes"])
    return total


@pytest.mark.parametrize("width", WIDTHS)
def test_sliced_student_detects_exactly_as_the_training_student(configs, val_batch: Batch, width: float) -> None:
    model = _model(configs["student"], 3, f"model.width={width}")
    sliced = slice_model(model)
    reference = model.predict(val_batch.images, val_batch.image_sizes)
    assert sum(len(d["boxes"]) for d in reference) > 20  # a real comparison, not of empty lists
    assert _all_equal(sliced.predict(val_batch.images, val_batch.image_sizes), reference)
    # the layout of the single-width model: its keys and shapes, nothing of the other widths
    single = type(model)(width=width, width_list=(width,), fpn_channels=32, num_classes=6, head_convs=2, gn_groups=8)
    assert {k: v.shape for k, v in sliced.state_dict().items()} == {k: v.shape for k, v in single.state_dict().items()}
    # BN folded into plain convs: within tolerance, and the same detections
    network = deploy_network(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    with torch.no_grad():
        outputs = network(to_low_resolution(val_batch.images))
    eager_heads = model.head_outputs(val_batch.images)
    _assert_heads_close(eager_heads, outputs)
    assert head_error(eager_heads, outputs) <= HEAD_RTOL  # and the exporter's gate agrees
    found = fcos_detections(HeadOutputs(*outputs), STRIDES, val_batch.image_sizes)
    assert _assert_same_detections(reference, found) == sum(len(d["boxes"]) for d in reference)
    assert match_detections(reference, found) == sum(len(d["boxes"]) for d in reference)


def test_pt_export_is_a_tenth_of_the_old_file_and_an_ordinary_checkpoint(checkpoints, configs, val_batch,
                                                                          tmp_path: Path) -> None:
    state = load_checkpoint(checkpoints["student"])
    old = tmp_path / "old.pt"
    torch.save(state["model"], old)  # what export wrote before slicing: the training model's whole state dict
    assert main(["export", str(checkpoints["student"]), "--output", str(tmp_path / "student.pt")]) == 0
    exported = tmp_path / "student.pt"
    assert exported.stat().st_size * 10 <= old.stat().st_size
    data = torch.load(exported, map_location="cpu", weights_only=True)
    assert data["kind"] == "sliced" and data["config"]["model"]["width_list"] == [0.25]
    assert not {"optimizer", "scheduler"} & set(data)
    # what `launch.py eval` does with a checkpoint: rebuild from its config, load its weights strictly
    rebuilt = build_model(checkpoint_config(data, exported), load_pretrained=False).eval()
    rebuilt.load_state_dict(data["model"])
    training = build_model(configs["student"], load_pretrained=False).eval()
    training.load_state_dict(state["model"])
    reference = training.predict(val_batch.images, val_batch.image_sizes)
    assert _all_equal(rebuilt.predict(val_batch.images, val_batch.image_sizes), reference)
    detector = load_exported(exported)
    assert not detector.training
    deployed = detector.predict(val_batch.images, val_batch.image_sizes)
    assert _assert_same_detections(reference, deployed) == match_detections(reference, deployed) > 0


ISOLATED = textwrap.dedent("""
    import json, sys
    class Block:  # neither msad nor torchvision may be imported: the file must run with torch alone
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("msad", "torchvision"):
                raise ImportError("blocked " + name)
    sys.meta_path.insert(0, Block())
    import torch
    torch.set_num_threads(1)
    extra = {"msad.json": ""}
    module = torch.jit.load(sys.argv[1], _extra_files=extra)
    inputs = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        heads = module(inputs["images"])
    detections = module.detect(inputs["images"], inputs["sizes"])
    torch.save({"heads": heads, "detections": detections, "meta": json.loads(extra["msad.json"])}, sys.argv[3])
""")


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_torchscript_runs_with_torch_alone_and_matches_eager(role, checkpoints, configs, val_batch, tmp_path) -> None:
    exported = tmp_path / f"{role}.ts"
    result = export_checkpoint(checkpoints[role], exported, "torchscript")
    model = build_model(configs[role], load_pretrained=False).eval()
    model.load_state_dict(load_checkpoint(checkpoints[role])["model"])

    def eager_heads(images: torch.Tensor) -> HeadOutputs:
        with torch.no_grad():
            return (model.head_outputs(images) if role == "student"
                    else model.head(model.fuse_aligned_levels(images).fused))

    # what the exporter reports is what it measured: the file and the eager model on its check images, recomputed
    # here (the exporter refuses errors above its tolerance, so reading `result.max_head_error <= HEAD_RTOL` back
    # would check nothing)
    check_images, check_sizes = check_batch(configs[role])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(exported))
    check_inputs = to_low_resolution(check_images) if role == "student" else check_images
    with torch.no_grad():
        errors = _relative_head_errors(eager_heads(check_images), module(check_inputs))
    assert 0 < max(errors) <= EXPORT_RTOL  # BN folded: not bit-identical, but within the tolerance
    assert result.max_head_error == pytest.approx(max(errors), rel=1e-3)
    check_scale = 2 if role == "student" else 1
    found = module.detect(check_inputs, torch.tensor(check_sizes) // check_scale)
    assert result.detections == _assert_same_detections(model.predict(check_images, check_sizes), found,
                                                         check_scale) > 0
    batch = collate([(image[:, :h, :w], {}) for image, (h, w) in zip(val_batch.images[:2], val_batch.image_sizes[:2],
                                                                      strict=True)], 256)  # two images: TorchScript's
    # interpreter runs the many small ops of NMS several times slower than Python does
    images = to_low_resolution(batch.images) if role == "student" else batch.images
    scale = 2 if role == "student" else 1
    sizes = torch.tensor(batch.image_sizes) // scale
    torch.save({"images": images, "sizes": sizes}, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-I", "-c", ISOLATED, str(exported), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], cwd=tmp_path, check=True, timeout=120)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["meta"]["role"] == role and out["meta"]["input"] == ("L" if role == "student" else "H")
    reference = eager_heads(batch.images)
    _assert_heads_close(reference, out["heads"])
    assert head_error(reference, out["heads"]) <= HEAD_RTOL
    expected = model.predict(batch.images, batch.image_sizes)
    assert _assert_same_detections(expected, out["detections"], scale) == sum(len(d["boxes"]) for d in expected) > 0
    assert match_detections(expected, out["detections"], scale) == sum(len(d["boxes"]) for d in expected)


def test_onnx_matches_eager_in_onnxruntime(checkpoints, configs, val_batch, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    exported = tmp_path / "student.onnx"
    assert main(["export", str(checkpoints["student"]), "--output", str(exported), "--format", "onnx"]) == 0
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    low = to_low_resolution(val_batch.images)
    outputs = [torch.from_numpy(a) for a in session.run(None, {"images": low.numpy()})]
    model = build_model(configs["student"], load_pretrained=False).eval()
    model.load_state_dict(load_checkpoint(checkpoints["student"])["model"])
    with torch.no_grad():
        eager = model.head_outputs(val_batch.images)
    _assert_heads_close(eager, outputs)
    assert head_error(eager, outputs) <= HEAD_RTOL
    found = fcos_detections(HeadOutputs(outputs[:5], outputs[5:10], outputs[10:]), STRIDES, val_batch.image_sizes)
    expected = model.predict(val_batch.images, val_batch.image_sizes)
    assert _assert_same_detections(expected, found) == sum(len(d["boxes"]) for d in expected) > 0
    assert match_detections(expected, found) == sum(len(d["boxes"]) for d in expected)


@pytest.mark.parametrize("batch_statistics", [False, True])
def test_student_distils_from_the_sliced_teacher_as_from_the_training_checkpoint(
        batch_statistics: bool, checkpoints, configs, tmp_path: Path) -> None:
    run_dir = tmp_path / "checkpoint_0000006"  # a copy of the teacher's checkpoint folder
    run_dir.mkdir()
    for name in ("checkpoint.pt", "checkpoint.pt.sha256"):
        (run_dir / name).write_bytes((checkpoints["teacher"].parent / name).read_bytes())
    sliced_path = export_sliced_teacher(run_dir / "checkpoint.pt")
    assert sliced_path == run_dir / "teacher_sliced.pt"  # next to its checkpoint
    assert sliced_path.stat().st_size * 10 <= checkpoints["teacher"].stat().st_size
    sliced = load_sliced_teacher(sliced_path)
    # what a student run does with either file (msad.build.build_trainable): the sliced one loads as the same teacher
    via_loop = load_frozen_teacher(config_from_dict({**configs["student"].to_dict(), "train": {
        **configs["student"].to_dict()["train"], "teacher_checkpoint": str(sliced_path)}}), torch.device("cpu"))
    assert type(via_loop.backbone) is type(sliced.backbone) and not via_loop.training
    assert all(torch.equal(a, b) for a, b in zip(via_loop.state_dict().values(), sliced.state_dict().values(),
                                                  strict=True))
    state = load_checkpoint(checkpoints["teacher"])
    training = build_model(checkpoint_config(state, checkpoints["teacher"]), load_pretrained=False)
    training.load_state_dict(state["model"])
    training.requires_grad_(False).eval()

    cfg = configs["student"]
    train_set = build_train_dataset(cfg, resolve_data_paths(cfg.data))
    torch.manual_seed(0)
    batch = collate([train_set[i] for i in range(2)], cfg.data.size_divisibility)
    students = []
    for teacher, seed in ((training, 21), (sliced, 22)):  # different seeds: only what the teacher gives may matter
        torch.manual_seed(seed)
        student = build_model(cfg, load_pretrained=False)
        check_teacher_matches(student, teacher)
        if teacher is training:
            init_from_teacher(student, training.state_dict(), training.width)
        else:
            init_student_from_teacher(student, teacher)
        students.append((student.train(), teacher, build_optimizer(cfg, student)))
    history = []
    for _ in range(2):
        step = []
        for student, teacher, optimizer in students:
            features = run_frozen_teacher(teacher, batch.images, batch_statistics)
            losses = student(batch.images, batch.targets, features, kd_weight=0.2)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            step.append({k: v.detach() for k, v in losses.items()})
        history.append(step)
    for via_training, via_sliced in history:
        assert via_training["loss_kd"] > 0
        assert all(torch.equal(via_training[k], via_sliced[k]) for k in via_training), (via_training, via_sliced)


def test_sliced_teacher_is_refused_by_a_student_of_another_width(checkpoints, configs, tmp_path: Path) -> None:
    sliced = load_sliced_teacher(export_sliced_teacher(checkpoints["teacher"], tmp_path / "t.pt"))
    torch.manual_seed(0)
    other = _model(configs["student"], 0, "model.width=0.5")
    with pytest.raises(UserError, match="differs from its teacher's"):
        check_teacher_matches(other, sliced)
    with pytest.raises(UserError, match="differs from student width"):
        init_student_from_teacher(other, sliced)


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_export_errors_are_one_line(checkpoints, configs, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out.pt")
    assert "no-such.pt: checkpoint not found" in _one_line_error(["export", str(tmp_path / "no-such.pt"),
                                                                  "--output", out], capsys)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoints["student"].read_bytes()[:5000])
    assert "truncated.pt: unreadable checkpoint" in _one_line_error(["export", str(truncated), "--output", out],
                                                                    capsys)
    altered = tmp_path / "altered" / "checkpoint.pt"
    altered.parent.mkdir()
    altered.write_bytes(checkpoints["student"].read_bytes())
    (altered.parent / "checkpoint.pt.sha256").write_text("0" * 64 + "  checkpoint.pt\n")
    assert "corrupt checkpoint (SHA-256 differs" in _one_line_error(["export", str(altered), "--output", out], capsys)
    assert "invalid choice: 'tflite' (choose from 'pt', 'torchscript', 'onnx')" in _one_line_error(
        ["export", str(checkpoints["student"]), "--output", out, "--format", "tflite"], capsys)
    assert "already exists" in _one_line_error(["export", str(checkpoints["student"]), "--output",
                                                str(checkpoints["teacher"])], capsys)
    # weights of another model than the config describes: the first bad key, named
    state = load_checkpoint(checkpoints["student"])
    state["config"]["model"]["fpn_channels"] = 64
    mismatched = save_checkpoint(state, tmp_path / "mismatched.pt")
    assert "the model expects shape" in _one_line_error(["export", str(mismatched), "--output", out], capsys)
    assert not Path(out).exists()
    # roles: the student-only and teacher-only helpers name what they accept
    with pytest.raises(UserError, match="role 'teacher' cannot be used here; allowed: student"):
        export_standalone_student(checkpoints["teacher"], tmp_path / "s.pt")
    with pytest.raises(UserError, match="role 'student' cannot be used here; allowed: teacher"):
        export_sliced_teacher(checkpoints["student"], tmp_path / "t.pt")


def test_a_model_that_fails_the_check_is_not_written(checkpoints, tmp_path: Path, capsys) -> None:
    state = load_checkpoint(checkpoints["fcos"])
    state["model"]["head.ctrness.weight"][0, 0, 0, 0] = float("nan")
    broken = save_checkpoint(state, tmp_path / "broken" / "checkpoint.pt")
    out = tmp_path / "out" / "fcos.ts"
    out.parent.mkdir()
    message = _one_line_error(["export", str(broken), "--output", str(out), "--format", "torchscript"], capsys)
    assert "not written" in message and "not finite" in message
    assert list(out.parent.iterdir()) == []  # no file, no temp file left behind


# Negative controls of the export check with finite errors. The exporter compares what it wrote with the eager model
# built from the same checkpoint, so no checkpoint can make the two differ: a wrong export has to come from the
# export step itself. These tests reach it through a test-only hook: they monkeypatch the one function of
# msad.deploy.export that produces what the check then reads -- `sliced_state` (the pt file's weights),
# `deploy_detector` (the network TorchScript traces) or `load_exported` (the deployable module the pt check runs) --
# so that one weight is off by 1e-2 or one box by half a pixel; everything else in export_checkpoint runs as it is.
PERTURBED = "head.bbox_pred.weight"  # one element of it, +1e-2: about 1e-2 relative on the box regression


@pytest.mark.parametrize("fmt", ["pt", "torchscript"])
def test_export_check_refuses_a_weight_off_by_1e_2(fmt: str, checkpoints, configs, val_batch, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[nn.Module] = []  # what the hooked step produced, for this test's own comparison
    if fmt == "pt":
        real_state = export_module.sliced_state

        def hooked(*args, **kwargs) -> dict:
            data = real_state(*args, **kwargs)
            data["model"][PERTURBED].view(-1)[0] += 1e-2
            made.append(data)
            return data

        monkeypatch.setattr(export_module, "sliced_state", hooked)
    else:
        real_detector = export_module.deploy_detector

        def hooked(model: nn.Module):
            detector = real_detector(model)
            with torch.no_grad():
                detector.network.get_parameter(PERTURBED).view(-1)[0] += 1e-2  # its network has the same head
            made.append(detector)
            return detector

        monkeypatch.setattr(export_module, "deploy_detector", hooked)
    out = tmp_path / "out" / f"student.{fmt}"
    out.parent.mkdir()
    # refused by the check (which of its comparisons trips first -- detections or the head tolerance -- is the
    # exporter's order), not by an exporter failure
    with pytest.raises(UserError, match=rf"not written: the {fmt} export of .* does not match the training model: "):
        export_checkpoint(checkpoints["student"], out, fmt)
    assert list(out.parent.iterdir()) == []  # no file, no temp file
    # this test's own comparison sees the same difference, on its own images
    model = build_model(configs["student"], load_pretrained=False).eval()
    model.load_state_dict(load_checkpoint(checkpoints["student"])["model"])
    with torch.no_grad():
        reference = model.head_outputs(val_batch.images)
        if fmt == "pt":
            written = build_model(checkpoint_config(made[0], out), load_pretrained=False).eval()
            written.load_state_dict(made[0]["model"])
            outputs = written.head_outputs(val_batch.images)
        else:
            outputs = made[0](to_low_resolution(val_batch.images))
    assert max(_relative_head_errors(reference, outputs)) > 10 * EXPORT_RTOL
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        _assert_heads_close(reference, outputs)


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_export_check_refuses_a_box_shifted_by_half_a_pixel(shift: float, checkpoints, configs, val_batch,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployable module's first detection moved right by `shift` H pixels; 0.0 is the hook's own control
    (the hook alone changes nothing: the export is written and this test's comparison passes)."""
    real_load = export_module.load_exported
    made: list[nn.Module] = []

    def hooked(path):
        detector = real_load(path)
        predict = detector.predict

        def shifted(*args, **kwargs) -> list[dict]:
            found = predict(*args, **kwargs)
            boxes = found[0]["boxes"].clone()
            boxes[0, 0::2] += shift  # x1 and x2 of image 0's first detection
            return [{**found[0], "boxes": boxes}, *found[1:]]

        detector.predict = shifted
        made.append(detector)
        return detector

    monkeypatch.setattr(export_module, "load_exported", hooked)
    out = tmp_path / "student.pt"
    if shift == 0.0:
        assert export_checkpoint(checkpoints["student"], out, "pt").detections > 0
    else:
        with pytest.raises(UserError, match=r"not written: .* the training model's detection 0 .* has no match"):
            export_checkpoint(checkpoints["student"], out, "pt")
        assert list(tmp_path.iterdir()) == []  # no file, no temp file
    # this test's own comparison, on its own images, with the module the check ran
    model = build_model(configs["student"], load_pretrained=False).eval()
    model.load_state_dict(load_checkpoint(checkpoints["student"])["model"])
    reference = model.predict(val_batch.images, val_batch.image_sizes)
    found = made[0].predict(val_batch.images, val_batch.image_sizes)
    if shift == 0.0:
        assert _assert_same_detections(reference, found) > 0
    else:  # corners half a pixel off (or, for a box narrower than that, no longer its partner's best overlap)
        with pytest.raises(AssertionError, match="Mismatched elements: 2 / |not one-to-one"):
            _assert_same_detections(reference, found)


def test_latency_counts_the_flops_the_capacity_report_counts() -> None:
    from msad.deploy.latency import input_size, random_training_model
    from msad.models.capacity import detector_gflops

    for role in ("student", "fcos"):  # the deployed teacher runs its head once, not thrice as in training
        with torch.device("meta"):  # shapes only: folding BN is arithmetic on meta tensors
            network = deploy_network(random_training_model(role, 0.25))
        example = torch.empty(1, 3, *input_size(role, "cpu"), device="meta")
        assert count_gflops(network, example) == pytest.approx(detector_gflops(0.25, role, (256, 384)), rel=1e-9)
    row = measure("student", 0.25, "cpu", repeats=1, warmup=0, fpn_channels=32, num_classes=6)
    assert row.eager_ms > 0 and row.torchscript_ms > 0 and row.size == (128, 192)
    assert "student (L)" in latency_table([row], "cpu")


def test_exported_metadata_is_json(checkpoints, tmp_path: Path) -> None:
    path = export_checkpoint(checkpoints["student"], tmp_path / "s.ts", "torchscript").path
    extra = {"msad.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["msad.json"])
    assert meta["strides"] == list(STRIDES) and meta["width"] == 0.25 and meta["low_res_mode"] == "nearest"
    with pytest.raises(UserError, match="TorchScript file; load it with torch.jit.load"):
        load_exported(path)
