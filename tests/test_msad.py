"""Teacher, student and plain detector on tiny real models (width 0.25, 32 FPN channels) and synthetic images."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from msad.errors import UserError
from msad.models.detector import FCOSDetector
from msad.models.distiller import Distiller
from msad.models.fcos import fcos_losses
from msad.models.student import (
    KDWarmup,
    MSADStudent,
    aligned_distillation_loss,
    check_teacher_matches,
    init_from_teacher,
    run_frozen_teacher,
)
from msad.models.teacher import CrossLevelFusion, MSADTeacher, check_aligned
from msad.models.trainable import loss_terms

TINY = {"width": 0.25, "fpn_channels": 32, "num_classes": 3, "head_convs": 2, "gn_groups": 8}
LEVEL_STRIDES = (8, 16, 32, 64, 128)


def _targets() -> list[dict]:
    # Boxes of several sizes, so most levels get positives; the second image has none (N = 0 must work).
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [30.0, 40.0, 200.0, 230.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def _images(height: int = 256, width: int = 256, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * 7 + width))


def _check_trainable_grads(model: nn.Module) -> None:
    """Every parameter that requires grad got a finite gradient; every frozen one got none."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"


@pytest.fixture(scope="module")
def teacher() -> MSADTeacher:
    torch.manual_seed(1)
    return MSADTeacher(**TINY)


@pytest.fixture(scope="module")
def student(teacher: MSADTeacher) -> MSADStudent:
    torch.manual_seed(2)
    model = MSADStudent(**TINY)
    init_from_teacher(model, teacher.state_dict(), teacher_width=teacher.width)
    return model


@pytest.mark.parametrize("size", [(256, 256), (256, 512), (512, 256), (200, 200), (202, 330)])
def test_teacher_levels_are_aligned_at_many_sizes(teacher: MSADTeacher, size: tuple[int, int]) -> None:
    teacher.eval()
    with torch.no_grad():
        features = teacher.fuse_aligned_levels(_images(*size, batch=1))
    assert len(features.high) == len(features.low) == len(features.fused) == 5
    for stride, high, low, fused in zip(LEVEL_STRIDES, features.high, features.low, features.fused, strict=True):
        # Every even size aligns: each stride-2 step rounds up, and L is exactly H / 2.
        expected = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert tuple(high.shape[-2:]) == tuple(low.shape[-2:]) == tuple(fused.shape[-2:]) == expected
        assert high.shape[1] == TINY["fpn_channels"]


def test_misaligned_levels_raise_a_clear_error() -> None:
    high = [torch.zeros(1, 4, 32 // 2**i, 32 // 2**i) for i in range(5)]
    low = [h.clone() for h in high]
    low[1] = torch.zeros(1, 4, 15, 15)
    with pytest.raises(UserError, match=r"H level p4 is \(16, 16\) but L level p3 is \(15, 15\)"):
        check_aligned(high, low)


def test_odd_input_cannot_be_halved(teacher: MSADTeacher) -> None:
    # The only way to misalign H and L through the teacher is an odd size; to_low_resolution refuses it.
    with torch.no_grad(), pytest.raises(ValueError, match="even height and width"):
        teacher.fuse_aligned_levels(_images(201, 256, batch=1))


def test_fusion_weights_sum_to_one_and_mix_the_pair() -> None:
    torch.manual_seed(1)
    teacher = MSADTeacher(**TINY, fusion_init="original").eval()  # the original's init: unequal weights at the start
    with torch.no_grad():
        features = teacher.fuse_aligned_levels(_images(256, 512))
    weights = features.fusion_weights
    assert weights.shape == (2, 5, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    for level in range(5):
        a = weights[:, level, 0, None, None, None]
        b = weights[:, level, 1, None, None, None]
        expected = a * features.high[level] + b * features.low[level]
        torch.testing.assert_close(features.fused[level], expected)


def test_zero_init_fusion_starts_equal_and_learns_from_the_loss() -> None:
    # Zero last layer: (0.5, 0.5) at every level whatever the features' scale, yet the loss reaches it, so one
    # SGD step moves the weights (and the first layer starts learning once the last is no longer zero).
    torch.manual_seed(3)
    model = MSADTeacher(**TINY).train()
    images = _images(256, 256)
    outputs = model(images, _targets())
    sum(loss_terms(outputs).values()).backward()
    diagnostics = {k: v for k, v in outputs.items() if not k.startswith("loss_")}
    assert set(diagnostics) == {f"fusion_high_p{k}" for k in range(3, 8)}  # logged beside the losses
    assert all(value.item() == 0.5 and not value.requires_grad for value in diagnostics.values())
    assert model.fusion.fc[2].weight.grad.abs().sum() > 0
    torch.optim.SGD(model.fusion.parameters(), lr=1.0).step()
    with torch.no_grad():
        moved = model.fuse_aligned_levels(images).fusion_weights[..., 0]
    assert (moved - 0.5).abs().max() > 1e-4
    with pytest.raises(UserError, match="model.fusion_init"):
        CrossLevelFusion(channels=32, init="uniform")


def test_fusion_module_matches_the_original_layout() -> None:
    fusion = CrossLevelFusion(channels=256, hidden=32)
    shapes = {key: tuple(value.shape) for key, value in fusion.state_dict().items()}
    assert shapes == {"fc.0.weight": (32, 512), "fc.2.weight": (2, 32)}


def test_fusion_init_original_is_detectron2_c2_xavier_fill() -> None:
    """Detectron2's c2_xavier_fill (the original SELayer's init) is kaiming_uniform_(a=1): U(+-sqrt(3 / fan_in)),
    whatever fan_out is; xavier_uniform_ would draw from U(+-sqrt(6 / (fan_in + fan_out)))."""
    torch.manual_seed(0)
    original = CrossLevelFusion(channels=256, hidden=32, init="original")
    for layer in (original.fc[0], original.fc[2]):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(3 / fan_in)
        assert layer.weight.abs().max() <= bound < math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() > 0.8 * bound  # fills the range
    assert abs(original.fc[0].weight.std().item() * math.sqrt(512) - 1) < 0.05  # U(+-b) has std b / sqrt(3)
    zero = CrossLevelFusion(channels=256, hidden=32, init="zero")
    assert not zero.fc[2].weight.any() and zero.fc[0].weight.abs().max() <= math.sqrt(3 / 512)
    with pytest.raises(UserError, match="allowed: zero, original"):
        CrossLevelFusion(channels=256, hidden=32, init="xavier")


def test_teacher_head_on_stacked_branches_equals_separate_calls(teacher: MSADTeacher) -> None:
    teacher.eval()
    with torch.no_grad():
        features = teacher.fuse_aligned_levels(_images())
        stacked = teacher._head_per_branch([features.high, features.low, features.fused])
        for branch_features, outputs in zip((features.high, features.low, features.fused), stacked, strict=True):
            separate = teacher.head(branch_features)
            for got, want in zip(outputs.cls_logits + outputs.box_regression, separate.cls_logits
                                 + separate.box_regression, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_teacher_training_step_has_all_branch_losses_and_gradients() -> None:
    torch.manual_seed(3)
    model = MSADTeacher(**TINY).train()
    images, targets = _images(), _targets()
    outputs = model(images, targets)
    losses = loss_terms(outputs)
    branches = ("high", "low", "fused")
    assert set(losses) == {f"loss_{kind}_{branch}" for kind in ("cls", "box", "ctr") for branch in branches}
    assert set(outputs) - set(losses) == {f"fusion_high_p{k}" for k in range(3, 8)}
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()
    _check_trainable_grads(model)
    assert all(p.requires_grad for p in model.pyramid.parameters())  # H needs P7, L needs P2: nothing frozen

    # The fused terms are the fused branch's plain FCOS losses times joint_weight (0.4).
    with torch.no_grad():
        fused = fcos_losses(model.head(model.fuse_aligned_levels(images).fused), targets, LEVEL_STRIDES)
    for kind in ("cls", "box", "ctr"):
        torch.testing.assert_close(losses[f"loss_{kind}_fused"].detach(), 0.4 * fused[f"loss_{kind}"])


def test_teacher_without_fusion_runs_high_only() -> None:
    torch.manual_seed(4)
    model = MSADTeacher(**TINY, fusion=False).train()
    assert model.fusion is None
    losses = model(_images(), _targets())
    assert set(losses) == {"loss_cls_high", "loss_box_high", "loss_ctr_high"}
    sum(losses.values()).backward()
    _check_trainable_grads(model)
    frozen = {name for name, p in model.pyramid.named_parameters() if not p.requires_grad}
    assert frozen == {"lateral.2.weight", "lateral.2.bias", "output.2.weight", "output.2.bias"}

    model.eval()
    with torch.no_grad():
        features = model.fuse_aligned_levels(_images())
    assert features.low == [] and features.fused is features.high
    torch.testing.assert_close(features.fusion_weights[..., 0], torch.ones(2, 5))
    with pytest.raises(UserError, match="fusion=True"):
        model.predict(_images(), [(256, 256)] * 2, branch="low")


def test_teacher_predicts_each_branch(teacher: MSADTeacher) -> None:
    teacher.eval()
    images = _images(256, 512)
    sizes = [(250, 500), (256, 400)]
    for branch in ("fused", "high", "low"):
        # at random init most regressions are ReLU zeros: boxes without area, which post-processing drops
        detections = teacher.predict(images, sizes, branch=branch, score_thresh=0.0, max_detections=1000)
        assert len(detections) == 2
        for det, (h, w) in zip(detections, sizes, strict=True):
            count = len(det["boxes"])
            assert 0 < count <= 1000 and det["scores"].shape == det["labels"].shape == (count,)
            assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
            assert (det["boxes"][:, 2:] > det["boxes"][:, :2]).all()
    with pytest.raises(UserError, match="unknown teacher branch"):
        teacher.predict(images, sizes, branch="both")


def test_distillation_loss_is_zero_on_equal_features_and_scales_with_temperature() -> None:
    features = [torch.randn(2, 8, 16 // 2**i, 16 // 2**i) for i in range(5)]
    for kind in ("l1", "mse"):
        assert aligned_distillation_loss(features, [f.clone() for f in features], 3.0, kind).item() == 0.0
    shifted = [f + 0.6 for f in features]
    # L1: 5 levels x mean |0.6 / T| x T^2 = 5 * 0.6 * T.  MSE: 5 x (0.6 / T)^2 x T^2 = 5 * 0.36.
    torch.testing.assert_close(aligned_distillation_loss(features, shifted, 3.0, "l1"), torch.tensor(5 * 0.6 * 3.0))
    torch.testing.assert_close(aligned_distillation_loss(features, shifted, 3.0, "mse"), torch.tensor(5 * 0.36))
    with pytest.raises(UserError, match="unknown distillation loss"):
        aligned_distillation_loss(features, shifted, 3.0, "kl")


def test_teacher_batch_stats_switch_uses_each_batchs_statistics_as_the_original() -> None:
    """train.teacher_batch_stats: the original's teacher stays in train mode while distilling, so its BN normalises
    with the batch's own mean and variance; ours by default uses its running statistics."""
    torch.manual_seed(2)
    teacher = MSADTeacher(**TINY)
    for module in teacher.modules():  # running statistics unlike any batch's
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(0.5)
            module.running_var.fill_(4.0)
    images = _images()
    frozen = run_frozen_teacher(teacher, images)
    assert not teacher.training
    batch = run_frozen_teacher(teacher, images, batch_statistics=True)
    assert teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # the reference: BN layers that compute batch statistics themselves
        stats_free = MSADTeacher(**TINY)
        stats_free.load_state_dict(teacher.state_dict())
        for module in stats_free.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.track_running_stats, module.running_mean, module.running_var = False, None, None
        expected = stats_free.eval().fuse_aligned_levels(images).fused
    for got, want, old in zip(batch, expected, frozen, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - old).abs().max() > 1e-2


def test_student_step_distils_without_touching_the_teacher(teacher: MSADTeacher, student: MSADStudent) -> None:
    teacher.train()  # a loop may leave it in train mode; run_frozen_teacher must not let BN statistics move
    teacher.zero_grad(set_to_none=True)
    running = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k or "num_batches" in k}
    student.train()
    student.zero_grad(set_to_none=True)
    images, targets = _images(), _targets()
    for _ in range(2):
        teacher_features = run_frozen_teacher(teacher, images)
        losses = student(images, targets, teacher_features, kd_weight=0.2)
        assert set(losses) == {"loss_cls", "loss_box", "loss_ctr", "loss_kd"}
        assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_kd"] > 0
        sum(losses.values()).backward()
    _check_trainable_grads(student)
    assert not any(p.requires_grad for p in student.pyramid.p7.parameters())  # P7 is never read by the student
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        if key in running:
            assert torch.equal(value, running[key]), f"teacher {key} moved"


def test_student_kd_loss_scales_with_kd_weight_and_is_zero_without_teacher(
    teacher: MSADTeacher, student: MSADStudent
) -> None:
    student.eval()
    images, targets = _images(), _targets()
    teacher_features = run_frozen_teacher(teacher, images)
    with torch.no_grad():
        full = student(images, targets, teacher_features, kd_weight=1.0)["loss_kd"]
        half = student(images, targets, teacher_features, kd_weight=0.5)["loss_kd"]
        none = student(images, targets, None)["loss_kd"]
        own = aligned_distillation_loss(student.low_features(images), teacher_features, 3.0)
    torch.testing.assert_close(half, full / 2)
    torch.testing.assert_close(full, own)
    assert none.item() == 0.0


def test_student_predicts_alone() -> None:
    torch.manual_seed(5)
    model = MSADStudent(**TINY).eval()
    assert not any(isinstance(m, (MSADTeacher, CrossLevelFusion)) for m in model.modules())
    detections = model.predict(_images(512, 256), [(500, 256), (512, 200)], score_thresh=0.0, max_detections=1000)
    assert len(detections) == 2 and all(0 < len(d["boxes"]) <= 1000 for d in detections)
    assert (detections[1]["boxes"][:, 2] <= 200).all()


def test_init_from_teacher_copies_every_student_weight(teacher: MSADTeacher) -> None:
    torch.manual_seed(6)
    model = MSADStudent(**TINY)
    init_from_teacher(model, teacher.state_dict())
    teacher_state = teacher.state_dict()
    assert all(torch.equal(value, teacher_state[key]) for key, value in model.state_dict().items())


def test_init_from_teacher_is_strict(teacher: MSADTeacher, student: MSADStudent) -> None:
    state = teacher.state_dict()
    missing = {k: v for k, v in state.items() if k != "head.cls_logits.bias"}
    with pytest.raises(UserError, match="missing key 'head.cls_logits.bias'"):
        init_from_teacher(student, missing)
    with pytest.raises(UserError, match="'extra.weight'"):
        init_from_teacher(student, {**state, "extra.weight": torch.zeros(1)})
    wrong = {**state, "head.cls_logits.bias": torch.zeros(5)}
    with pytest.raises(UserError, match=r"'head.cls_logits.bias' has shape \(5,\)"):
        init_from_teacher(student, wrong)


def test_student_of_another_width_is_refused(teacher: MSADTeacher) -> None:
    torch.manual_seed(7)
    wider = MSADStudent(**{**TINY, "width": 0.5})
    with pytest.raises(UserError, match="width 0.5"):
        check_teacher_matches(wider, teacher)
    with pytest.raises(UserError, match="differs from student width 0.5"):
        init_from_teacher(wider, teacher.state_dict(), teacher_width=teacher.width)
    # Without the recorded width the lateral convs' input channels give it away.
    with pytest.raises(UserError, match="pyramid.lateral"):
        init_from_teacher(wider, teacher.state_dict())


def test_kd_warmup_ramps_and_round_trips() -> None:
    warmup = KDWarmup(alpha=0.2, warmup_iters=4)
    weights = []
    for _ in range(6):
        weights.append(warmup.weight)
        warmup.step()
    assert weights == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    resumed = KDWarmup(alpha=0.2, warmup_iters=4)
    resumed.load_state_dict(warmup.state_dict())
    assert resumed.iteration == 6 and resumed.weight == pytest.approx(0.2)
    mid = KDWarmup(alpha=0.2, warmup_iters=4)
    mid.load_state_dict({"iteration": 2})
    assert mid.weight == pytest.approx(0.1)
    assert KDWarmup(alpha=0.3, warmup_iters=0).weight == pytest.approx(0.3)
    with pytest.raises(UserError, match="iteration"):
        mid.load_state_dict({"step": 2})


def test_plain_detector_trains_and_predicts() -> None:
    torch.manual_seed(8)
    model = FCOSDetector(**TINY).train()
    losses = model(_images(), _targets())
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
    sum(losses.values()).backward()
    _check_trainable_grads(model)
    model.eval()
    detections = model.predict(_images(), [(256, 256)] * 2, score_thresh=0.0, max_detections=1000)
    assert len(detections) == 2 and all(0 < len(d["scores"]) <= 1000 for d in detections)


def test_sync_bn_switch_decides_syncbatchnorm_on_several_gpus_only() -> None:
    """train.sync_bn: SyncBN on several CUDA workers (the module swap needs no GPU; its forward does), plain BN for
    false (the original's first-commit teachers at 0.5 / 0.75), and never on CPU, where gloo cannot sync BN."""
    from msad.config import load_config
    from msad.engine.loop import with_batch_norm_sync

    def synced(overrides: list[str], device: str, world_size: int) -> bool:
        model = with_batch_norm_sync(FCOSDetector(**TINY), load_config(None, overrides), torch.device(device),
                                     world_size)
        return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())

    assert synced([], "cuda", 8)
    assert not synced(["train.sync_bn=false"], "cuda", 8)
    assert not synced([], "cuda", 1) and not synced([], "cpu", 8)


def test_distiller_trains_the_student_alone_and_follows_its_kd_schedule(teacher: MSADTeacher,
                                                                         student: MSADStudent) -> None:
    """What a student run trains: only the student is a submodule (DDP, optimizer, checkpoint see it alone), the
    distillation weight of each step follows the warm-up ramp, and the ramp's position is checkpointed."""
    distiller = Distiller(student, teacher, KDWarmup(alpha=0.2, warmup_iters=2))
    assert list(distiller.state_dict()) == list(student.state_dict())  # no "student." prefix, no teacher keys
    assert {id(p) for p in distiller.parameters()} == {id(p) for p in student.parameters()}
    assert not any(isinstance(m, MSADTeacher) for m in distiller.modules())
    images, targets = _images(), _targets()
    used = []
    for _ in range(3):
        outputs = distiller(images, targets)
        used.append(outputs["kd_weight"].item())
        distiller.advance()
    assert used == pytest.approx([0.0, 0.1, 0.2])
    assert distiller.training_state() == {"kd_warmup": {"iteration": 3, "alpha": 0.2, "warmup_iters": 2}}
    with torch.no_grad():  # the same student and teacher by hand, at the ramp's end
        expected = student(images, targets, run_frozen_teacher(teacher, images), kd_weight=0.2)
        got = distiller(images, targets)
    torch.testing.assert_close(got["loss_kd"], expected["loss_kd"])
    resumed = Distiller(student, teacher, KDWarmup(alpha=0.2, warmup_iters=2))
    resumed.load_training_state({"kd_warmup": distiller.training_state()["kd_warmup"]})
    assert resumed.schedule.weight == pytest.approx(0.2)
    with pytest.raises(UserError, match="one output"):
        distiller.predict(images, [(256, 256)] * 2, branch="high")
