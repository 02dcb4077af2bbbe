"""Slimmable ResNet-50: one set of weights that runs at several widths (Yu et al., ICLR 2019).

A conv is allocated at the largest width and sliced ``weight[:out, :in]`` at run time, so every width shares the
same filters; batch norm is *switchable* (one ``BatchNorm2d`` per width) because activation statistics differ per
width. Module names mirror the slimmable_networks ImageNet checkpoint (``features.{k}.body.{j}``,
``features.{k}.shortcut.{j}``, ``...bn.{i}``), so its keys load after stripping ``module.``.

The active width is instance state, set with ``model.width = w``. Setting it also turns ``requires_grad`` off for
the batch norms of the other widths, so a ``DistributedDataParallel`` wrapper built *after* the width is chosen
sees no unused parameters (``find_unused_parameters=False`` works). Build the optimizer after choosing the width
too, or filter on ``requires_grad``: a frozen BN parameter never gets a gradient, but weight decay would still
shrink it if it were handed to the optimizer. Freeze other parts (e.g. the stem) after choosing the width, since
choosing it turns ``requires_grad`` on for the active width's batch norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from msad.config import WIDTHS
from msad.errors import UserError
from msad.files import read_tensor_file
from msad.models.state import load_state_strictly

# (output name, bottleneck blocks, output channels at width 1.0, stride of the stage's first block).
_STAGES: tuple[tuple[str, int, int, int], ...] = (
    ("res2", 3, 256, 1),
    ("res3", 4, 512, 2),
    ("res4", 6, 1024, 2),
    ("res5", 3, 2048, 2),
)
_STEM_CHANNELS = 64


def _scaled(channels: int, widths: Sequence[float]) -> list[int]:
    return [int(channels * w) for w in widths]


class SlimmableConv2d(nn.Conv2d):
    """A bias-free conv whose weight is allocated at the largest width and sliced to the active one.

    Args:
        in_channels_list: input channels per width index (e.g. ``[3, 3, 3, 3]`` for the stem).
        out_channels_list: output channels per width index.
        kernel_size, stride, padding: as for ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels_list: Sequence[int],
        out_channels_list: Sequence[int],
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__(max(in_channels_list), max(out_channels_list), kernel_size, stride, padding, bias=False)
        self.in_channels_list = list(in_channels_list)
        self.out_channels_list = list(out_channels_list)
        self.width_index = len(self.out_channels_list) - 1

    def set_width_index(self, index: int) -> None:
        self.width_index = index

    def forward(self, x: Tensor) -> Tensor:
        out_c = self.out_channels_list[self.width_index]
        in_c = self.in_channels_list[self.width_index]
        return F.conv2d(x, self.weight[:out_c, :in_c], None, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels_list}, {self.out_channels_list}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class SwitchableBatchNorm2d(nn.Module):
    """One ``BatchNorm2d`` per width in ``self.bn``; only the active one runs and only it requires grad.

    Args:
        num_features_list: channels per width index.
    """

    def __init__(self, num_features_list: Sequence[int]) -> None:
        super().__init__()
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for c in num_features_list)
        self.set_width_index(len(self.bn) - 1)

    def set_width_index(self, index: int) -> None:
        self.width_index = index
        for i, bn in enumerate(self.bn):
            bn.requires_grad_(i == index)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn[self.width_index](x)


class SlimmableBottleneck(nn.Module):
    """ResNet-50 bottleneck (1x1, 3x3 with the stride, 1x1) with a projection shortcut when shapes change.

    Args:
        in_channels_list: block input channels per width index.
        out_channels_list: block output channels per width index; the middle width is a quarter of it.
        stride: stride of the 3x3 conv and of the shortcut.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels_list: Sequence[int], stride: int) -> None:
        super().__init__()
        mid = [c // 4 for c in out_channels_list]
        self.body = nn.Sequential(
            SlimmableConv2d(in_channels_list, mid, 1),
            SwitchableBatchNorm2d(mid),
            nn.ReLU(inplace=True),
            SlimmableConv2d(mid, mid, 3, stride, 1),
            SwitchableBatchNorm2d(mid),
            nn.ReLU(inplace=True),
            SlimmableConv2d(mid, out_channels_list, 1),
            SwitchableBatchNorm2d(out_channels_list),
        )
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or list(in_channels_list) != list(out_channels_list):
            self.shortcut = nn.Sequential(
                SlimmableConv2d(in_channels_list, out_channels_list, 1, stride),
                SwitchableBatchNorm2d(out_channels_list),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.body(x) + identity)


class SlimmableResNet50(nn.Module):
    """ResNet-50 trunk (no classifier) returning res2..res5 at strides 4, 8, 16, 32 at the active width.

    ``features[0]`` is the stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), ``features[1..16]`` the bottlenecks
    (3/4/6/3 per stage), the layout of the slimmable_networks ImageNet checkpoint.

    Args:
        width: the active width at construction; must be in ``width_list``.
        width_list: every width this set of weights serves, ascending; BN ``i`` belongs to ``width_list[i]`` and
            convs are allocated at the last (largest) one.
    """

    def __init__(self, width: float = 1.0, width_list: Sequence[float] = WIDTHS) -> None:
        super().__init__()
        width_list = tuple(float(w) for w in width_list)
        if not width_list or any(not 0.0 < w <= 1.0 for w in width_list) or list(width_list) != sorted(set(width_list)):
            raise UserError(f"width_list {width_list} must be strictly ascending widths in (0, 1]")
        self.width_list = width_list
        stem = _scaled(_STEM_CHANNELS, width_list)
        features: list[nn.Module] = [
            nn.Sequential(
                SlimmableConv2d([3] * len(width_list), stem, 7, 2, 3),
                SwitchableBatchNorm2d(stem),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        ]
        in_channels = stem
        self._stage_at: dict[int, str] = {}  # index in ``features`` of each stage's last block -> output name
        for name, blocks, channels, stride in _STAGES:
            out_channels = _scaled(channels, width_list)
            for b in range(blocks):
                features.append(SlimmableBottleneck(in_channels, out_channels, stride if b == 0 else 1))
                in_channels = out_channels
            self._stage_at[len(features) - 1] = name
        self.features = nn.Sequential(*features)
        self._init_weights()
        self.width = width

    def _init_weights(self) -> None:
        # torchvision's ResNet init, for runs without ImageNet weights (e.g. the synthetic quick start).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def width(self) -> float:
        return self._width

    @width.setter
    def width(self, width: float) -> None:
        if width not in self.width_list:
            raise UserError(f"width {width} is not one of this backbone's widths {self.width_list}")
        index = self.width_list.index(width)
        for m in self.modules():
            if isinstance(m, (SlimmableConv2d, SwitchableBatchNorm2d)):
                m.set_width_index(index)
        self._width = float(width)

    def out_channels(self) -> dict[str, int]:
        """Channels of res2..res5 at the active width: int(256w), int(512w), int(1024w), int(2048w)."""
        return {name: int(channels * self._width) for name, _, channels, _ in _STAGES}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        for k, layer in enumerate(self.features):
            x = layer(x)
            if k in self._stage_at:
                outputs[self._stage_at[k]] = x
        return outputs


class SlicedResNet50(SlimmableResNet50):
    """``SlimmableResNet50(w, width_list=(w,))`` that names the widths its weights were cut from.

    The backbone of a sliced teacher (``msad.deploy.export_sliced_teacher``). ``width_list`` is the source list (what
    ``check_teacher_matches`` compares with the student's); the module itself holds and runs only ``width``.

    Args:
        width: the one width held.
        source_width_list: the training backbone's widths.
    """

    def __init__(self, width: float, source_width_list: Sequence[float]) -> None:
        super().__init__(width, (width,))
        source = tuple(float(w) for w in source_width_list)
        if float(width) not in source:
            raise UserError(f"sliced width {width} is not one of its source widths {source}")
        self.width_list = source

    @property
    def width(self) -> float:
        return self._width

    @width.setter
    def width(self, width: float) -> None:
        if hasattr(self, "_width") and float(width) != self._width:
            raise UserError(f"a sliced backbone runs only at its width {self._width}, not {width}")
        for m in self.modules():
            if isinstance(m, (SlimmableConv2d, SwitchableBatchNorm2d)):
                m.set_width_index(0)
        self._width = float(width)


def load_slimmable_imagenet(model: SlimmableResNet50, path: str | Path) -> None:
    """Load the slimmable_networks ImageNet file (``s_resnet50_0.25_0.5_0.75_1.0.pt``) into ``model``.

    The file is ``{"model": {"module.features...": tensor, "module.classifier...": ...}}``; the classifier is
    dropped and everything else must match the model exactly (all widths' BNs included), so a truncated or
    different file fails loudly instead of silently leaving random weights behind.

    Args:
        model: a backbone built with ``width_list=WIDTHS`` (the file holds one BN per width of that list).
        path: the downloaded file; users bring it (CC BY-NC 4.0, not shipped).
    """
    path = Path(path)
    if tuple(model.width_list) != WIDTHS:
        raise UserError(f"{path} holds widths {WIDTHS}; build the backbone with width_list={WIDTHS}")
    data = read_tensor_file(path, "weights file")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"weights file {path} is not a slimmable_networks checkpoint (a dict with key 'model')")
    # DataParallel saved it with "module."; accept a file re-saved without the wrapper too.
    prefix = "module." if any(k.startswith("module.") for k in data["model"]) else ""
    found = {k: v for k, v in data["model"].items() if not k.startswith(f"{prefix}classifier.")}
    load_state_strictly(model, found, f"weights file {path}", key_in_state=lambda key: f"{prefix}{key}")


_TORCHVISION_MODULE = {
    "body.0": "conv1",
    "body.1": "bn1",
    "body.3": "conv2",
    "body.4": "bn2",
    "body.6": "conv3",
    "body.7": "bn3",
    "shortcut.0": "downsample.0",
    "shortcut.1": "downsample.1",
}


def _torchvision_key(ours: str, bn_index: int) -> str | None:
    """The torchvision ``resnet50`` name of one of our keys, ``None`` for BNs of widths other than ``bn_index``."""
    parts = ours.split(".")  # features.{k}.{...}
    if ".bn." in ours:
        bn_at = parts.index("bn")
        if int(parts[bn_at + 1]) != bn_index:
            return None
        parts = parts[:bn_at] + parts[bn_at + 2 :]  # drop "bn.{i}"
    block, module, leaf = int(parts[1]), ".".join(parts[2:-1]), parts[-1]
    if block == 0:
        return f"{'conv1' if module == '0' else 'bn1'}.{leaf}"
    first = 1
    for stage, (_, blocks, _, _) in enumerate(_STAGES, start=1):
        if block < first + blocks:
            return f"layer{stage}.{block - first}.{_TORCHVISION_MODULE[module]}.{leaf}"
        first += blocks
    raise AssertionError(f"no torchvision name for {ours}")


def load_torchvision_resnet50(model: SlimmableResNet50, path: str | Path) -> None:
    """Load a torchvision ``resnet50`` state dict (``torch.save(m.state_dict())``) into width 1.0 of ``model``.

    Convs fill the full (width-1.0) weights, so smaller widths then run sliced ImageNet filters; the BNs of the
    other widths are left untouched. ``fc`` is ignored; every other key must be present and match.

    Args:
        model: a backbone whose ``width_list`` contains 1.0.
        path: the state-dict file.
    """
    path = Path(path)
    if 1.0 not in model.width_list:
        raise UserError(f"loading torchvision weights from {path} needs 1.0 in width_list, got {model.width_list}")
    bn_index = model.width_list.index(1.0)
    data = read_tensor_file(path, "weights file")
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise UserError(f"weights file {path} is not a torchvision state dict (a flat dict of tensors)")
    load_state_strictly(model, data, f"weights file {path}", ignore_prefixes=("fc.",),
                        key_in_state=lambda key: _torchvision_key(key, bn_index))
