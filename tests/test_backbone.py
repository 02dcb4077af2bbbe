"""Slimmable ResNet-50 (widths, shared weights, switchable BN, DDP safety, weight files) and the feature pyramid."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from msad.errors import UserError
from msad.models.fpn import FeaturePyramid, strided_conv
from msad.models.slimmable import (
    WIDTHS,
    SlimmableResNet50,
    SwitchableBatchNorm2d,
    load_slimmable_imagenet,
    load_torchvision_resnet50,
)

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
BASE_CHANNELS = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}


@pytest.fixture(scope="module")
def backbone() -> SlimmableResNet50:
    torch.manual_seed(0)
    return SlimmableResNet50()


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine and running statistics, so a load that skipped them would show in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.rand(t.shape, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("width", WIDTHS)
def test_channels_and_strides_at_every_width(backbone: SlimmableResNet50, width: float) -> None:
    backbone.width = width
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
    assert list(out) == ["res2", "res3", "res4", "res5"]
    assert backbone.out_channels() == {k: int(c * width) for k, c in BASE_CHANNELS.items()}
    for name, feature in out.items():
        assert feature.shape == (1, int(BASE_CHANNELS[name] * width), 64 // STRIDES[name], 96 // STRIDES[name])
    backbone.width = 1.0


def test_unknown_width_is_a_user_error(backbone: SlimmableResNet50) -> None:
    with pytest.raises(UserError, match="0.3"):
        backbone.width = 0.3
    with pytest.raises(UserError, match="width_list"):
        SlimmableResNet50(width_list=(1.0, 0.5))


def test_widths_share_one_conv_weight() -> None:
    torch.manual_seed(0)
    model = SlimmableResNet50(width=0.25).eval()
    x = torch.randn(1, 3, 32, 32)
    stem = model.features[0][0]
    assert stem.weight.shape == (64, 3, 7, 7)  # allocated at width 1.0
    with torch.no_grad():
        before = model(x)["res5"]
        stem.weight[40:] += 1.0  # outside width 0.25's 16 filters: no effect
        assert torch.equal(model(x)["res5"], before)
        stem.weight[:16] *= -1.0  # inside the slice width 0.25 uses: its output changes
        assert not torch.allclose(model(x)["res5"], before)


def test_switchable_bn_selection_and_requires_grad() -> None:
    model = SlimmableResNet50(width=1.0)
    for index, width in enumerate(WIDTHS):
        model.width = width
        before = [
            m.bn[i].num_batches_tracked.item()
            for m in model.modules()
            if isinstance(m, SwitchableBatchNorm2d)
            for i in range(len(WIDTHS))
        ]
        model.train()(torch.randn(2, 3, 32, 32))
        after = [
            m.bn[i].num_batches_tracked.item()
            for m in model.modules()
            if isinstance(m, SwitchableBatchNorm2d)
            for i in range(len(WIDTHS))
        ]
        changed = {i % len(WIDTHS) for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}
        assert changed == {index}  # only this width's BN statistics moved
        for m in model.modules():
            if isinstance(m, SwitchableBatchNorm2d):
                for i, bn in enumerate(m.bn):
                    assert all(p.requires_grad == (i == index) for p in bn.parameters())


def test_every_trainable_parameter_gets_a_gradient_for_ddp() -> None:
    model = SlimmableResNet50(width=0.25).train()
    out = model(torch.randn(2, 3, 32, 32))
    sum(f.mean() for f in out.values()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert sum(p.requires_grad for p in model.parameters()) < len(list(model.parameters()))


def _official_state_dict(source: SlimmableResNet50) -> dict[str, torch.Tensor]:
    """Keys of the slimmable_networks ImageNet file (features.*, classifier.*), filled from ``source``'s tensors."""
    ours = source.state_dict()
    bn_fields = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["features.0.0.weight"] + [f"features.0.1.bn.{i}.{f}" for i in range(4) for f in bn_fields]
    for k in range(1, 17):
        keys += [f"features.{k}.body.{j}.weight" for j in (0, 3, 6)]
        keys += [f"features.{k}.body.{j}.bn.{i}.{f}" for j in (1, 4, 7) for i in range(4) for f in bn_fields]
        if k in (1, 4, 8, 14):  # first block of each stage
            keys += [f"features.{k}.shortcut.0.weight"]
            keys += [f"features.{k}.shortcut.1.bn.{i}.{f}" for i in range(4) for f in bn_fields]
    assert sorted(keys) == sorted(ours)  # our layout is the documented one
    state = {f"module.{key}": ours[key].clone() for key in keys}
    state["module.classifier.0.weight"] = torch.randn(1000, 2048)
    state["module.classifier.0.bias"] = torch.randn(1000)
    return state


def test_official_checkpoint_loads_and_reproduces_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = SlimmableResNet50()
    _randomise_bn(source, seed=1)
    path = tmp_path / "s_resnet50.pt"
    torch.save({"model": _official_state_dict(source)}, path)
    target = SlimmableResNet50()
    load_slimmable_imagenet(target, path)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        for width in WIDTHS:
            source.width = target.width = width
            expected, got = source.eval()(x), target.eval()(x)
            assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_corrupted_official_checkpoint_names_the_key(tmp_path: Path) -> None:
    state = _official_state_dict(SlimmableResNet50())
    missing = dict(state)
    del missing["module.features.5.body.4.bn.2.running_var"]
    torch.save({"model": missing}, tmp_path / "missing.pt")
    key = r"'module\.features\.5\.body\.4\.bn\.2\.running_var'"
    with pytest.raises(UserError, match=rf"missing\.pt is missing key {key}"):
        load_slimmable_imagenet(SlimmableResNet50(), tmp_path / "missing.pt")

    reshaped = dict(state)
    reshaped["module.features.9.body.3.weight"] = torch.zeros(256, 256, 1, 1)
    torch.save({"model": reshaped}, tmp_path / "shape.pt")
    with pytest.raises(
        UserError,
        match=r"'module\.features\.9\.body\.3\.weight' has shape \(256, 256, 1, 1\).*"
        r"\(256, 256, 3, 3\)",
    ):
        load_slimmable_imagenet(SlimmableResNet50(), tmp_path / "shape.pt")

    extra = dict(state, **{"module.features.17.body.0.weight": torch.zeros(1)})
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(UserError, match=r"unexpected key 'module\.features\.17\.body\.0\.weight'"):
        load_slimmable_imagenet(SlimmableResNet50(), tmp_path / "extra.pt")

    with pytest.raises(UserError, match="does not exist"):
        load_slimmable_imagenet(SlimmableResNet50(), tmp_path / "absent.pt")
    with pytest.raises(UserError, match="width_list"):
        load_slimmable_imagenet(SlimmableResNet50(width_list=(0.5, 1.0)), tmp_path / "extra.pt")


def test_torchvision_resnet50_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = torchvision.models.resnet50(weights=None)
    _randomise_bn(reference, seed=2)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = SlimmableResNet50(width=1.0)
    load_torchvision_resnet50(model, path)

    reference.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model.eval()(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for name, layer in zip(
            STRIDES, (reference.layer1, reference.layer2, reference.layer3, reference.layer4), strict=True
        ):
            y = layer(y)
            torch.testing.assert_close(out[name], y, atol=1e-4, rtol=1e-4)

    broken = reference.state_dict()
    del broken["layer3.2.bn2.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"missing key 'layer3\.2\.bn2\.bias'"):
        load_torchvision_resnet50(SlimmableResNet50(), tmp_path / "broken.pth")
    with pytest.raises(UserError, match="1.0"):
        load_torchvision_resnet50(SlimmableResNet50(width=0.5, width_list=(0.25, 0.5)), path)


def _fake_features(batch: int, height: int, width: int, channels: dict[str, int]) -> dict[str, torch.Tensor]:
    return {
        k: torch.randn(batch, c, math.ceil(height / STRIDES[k]), math.ceil(width / STRIDES[k]))
        for k, c in channels.items()
    }


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (200, 72)])
def test_pyramid_shapes(size: tuple[int, int]) -> None:
    channels = {k: int(c * 0.25) for k, c in BASE_CHANNELS.items()}
    fpn = FeaturePyramid(channels, 32)
    out = fpn(_fake_features(2, *size, channels))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    for level, feature in enumerate(out.values(), start=2):
        stride = 2**level
        assert feature.shape == (2, 32, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def test_pyramid_runs_only_requested_levels() -> None:
    channels = {k: int(c * 0.25) for k, c in BASE_CHANNELS.items()}
    fpn = FeaturePyramid(channels, 16)
    fired: list[str] = []
    for name, module in fpn.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda *_, name=name: fired.append(name))
    feats = _fake_features(1, 128, 192, channels)
    with torch.no_grad():
        full = fpn(feats)
        fired.clear()
        high = fpn(feats, ("p3", "p4", "p5", "p6", "p7"))  # the teacher's H pass
        assert list(high) == ["p3", "p4", "p5", "p6", "p7"]
        assert "output.2" not in fired and "lateral.2" not in fired
        fired.clear()
        low = fpn(feats, ("p2", "p3", "p4", "p5", "p6"))  # the L pass / the student
        assert list(low) == ["p2", "p3", "p4", "p5", "p6"]
        assert "p7" not in fired
        fired.clear()
        assert list(fpn(feats, ("p6",))) == ["p6"] and fired == ["p6"]
    for name in full:  # skipping work does not change any level's value
        for partial in (high, low):
            if name in partial:
                assert torch.equal(partial[name], full[name])
    with pytest.raises(ValueError, match="p8"):
        fpn(feats, ("p8",))


def test_pyramid_builds_p6_from_c5_and_inits_like_detectron2() -> None:
    fpn = FeaturePyramid({"res2": 8, "res3": 16, "res4": 32, "res5": 256}, 256)
    assert fpn.p6 is not None and fpn.p6.in_channels == 256  # C5, even when its channels equal the FPN's
    assert all(torch.count_nonzero(m.bias) == 0 for m in fpn.modules() if isinstance(m, nn.Conv2d))
    bound = math.sqrt(3 / (256 * 9))  # kaiming_uniform(a=1) on a 3x3 conv with 256 inputs: gain 1
    assert bound * 0.9 < fpn.output["2"].weight.abs().max() <= bound
    no_top = FeaturePyramid({"res5": 8}, 4, top_levels=False)
    assert no_top.p6 is None and no_top.p7 is None and no_top.level_names == ["p5"]


def _p7_weight_gradients(conv_call: Callable[[nn.Conv2d, torch.Tensor], torch.Tensor],
                         repeats: int = 6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """P7's weight gradient for a P6 map one column wide (a padded batch 64 px wide): fp32, then `repeats` times
    under CPU bf16 autocast, P7 computed with `conv_call`."""
    torch.manual_seed(0)
    fpn = FeaturePyramid({"res5": 32}, 64)
    c5 = torch.randn(8, 32, 3, 2)  # C5 of a 96 x 64 batch: P6 is 2 x 1, P7 1 x 1
    grad_out = torch.randn(8, 64, 1, 1)

    def gradient() -> torch.Tensor:
        fpn.zero_grad(set_to_none=True)
        assert fpn.p6 is not None and fpn.p7 is not None
        p6 = fpn.p6(c5)
        assert p6.shape[-1] == 1
        conv_call(fpn.p7, torch.relu(p6)).float().backward(grad_out)
        return fpn.p7.weight.grad.clone()

    reference = gradient()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return reference, [gradient() for _ in range(repeats)]


def _right(reference: torch.Tensor, gradients: list[torch.Tensor]) -> bool:
    """Every repeat finite, equal to the others and within bf16's error of the fp32 gradient."""
    scale = reference.abs().max()
    return all(bool(torch.isfinite(g).all()) and torch.equal(g, gradients[0])
               and float((g - reference).abs().max()) <= 0.02 * float(scale) for g in gradients)


def test_p7_weight_gradient_in_cpu_bf16_is_right_and_repeatable_when_p6_is_one_column_wide() -> None:
    """Plain FCOS at L = 64 px hit this: half its runs went NaN at iteration 2, the rest differed run to run."""
    reference, gradients = _p7_weight_gradients(strided_conv)
    assert _right(reference, gradients)
    x = torch.randn(2, 64, 4, 4)  # every other case keeps its autocast, and inference is untouched
    conv = nn.Conv2d(64, 64, 3, stride=2, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert strided_conv(conv, x).dtype == torch.bfloat16
        with torch.no_grad():
            assert strided_conv(conv, x[..., :1]).dtype == torch.bfloat16


def test_negative_control_the_plain_bf16_kernel_is_wrong_there() -> None:
    """Without the fp32 detour, the same check fails on torch 2.14.1 (if a release fixes the kernel, this test says
    so and the detour can go)."""
    reference, gradients = _p7_weight_gradients(lambda conv, x: conv(x))
    if _right(reference, gradients):
        pytest.skip(f"torch {torch.__version__} computes this bf16 weight gradient right on this CPU: the fp32 "
                    "detour in msad.models.fpn.strided_conv is no longer needed here")
    assert not _right(reference, gradients)
