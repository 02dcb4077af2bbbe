"""Cut a slimmable model down to the one width it runs at, then fold its batch norms into plain convs.

Two steps, because they serve different readers:

1. ``slice_model``: the same class (student, teacher or FCOS) with a single-width backbone,
   ``SlimmableResNet50(w, width_list=(w,))`` -- the layout ``msad.models.capacity.detector_gflops`` counts. Each conv
   keeps only the slice the eager model reads at width ``w`` (``weight[:out_c, :in_c]``, exactly what
   ``SlimmableConv2d.forward`` passes to ``F.conv2d``) and each switchable BN only its ``bn[i]`` for that width. The
   result computes what the training model computes at ``w`` and is still an ordinary msad model: ``launch.py
   eval`` and training read it (its config says ``model.width_list: [w]``), and its BN still runs in train mode
   (a frozen teacher's ``train.teacher_batch_stats``).
2. ``fold_backbone``: a ``PlainResNet50`` of ``nn.Conv2d`` with bias, each BN folded into the conv before it with
   its running statistics. That equals eval-mode BN up to float rounding (the fold is computed in float64), and is
   what the runtime module and the exported graphs run: no slimmable modules, no BN.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msad.models.slimmable import SlimmableBottleneck, SlimmableConv2d, SlimmableResNet50, SwitchableBatchNorm2d

ModelT = TypeVar("ModelT", bound=nn.Module)


def _active_slices(backbone: SlimmableResNet50) -> dict[str, Tensor]:
    """The backbone's state dict at its active width, keyed as a one-width backbone's (``...bn.0...``)."""
    state = backbone.state_dict()
    sliced: dict[str, Tensor] = {}
    for name, module in backbone.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, SlimmableConv2d):
            out_c = module.out_channels_list[module.width_index]
            in_c = module.in_channels_list[module.width_index]
            sliced[f"{prefix}weight"] = state[f"{prefix}weight"][:out_c, :in_c].clone()
        elif isinstance(module, SwitchableBatchNorm2d):
            for key, value in module.bn[module.width_index].state_dict().items():
                sliced[f"{prefix}bn.0.{key}"] = value.clone()
    return sliced


def slice_backbone(backbone: SlimmableResNet50) -> SlimmableResNet50:
    """A ``SlimmableResNet50(w, width_list=(w,))`` holding ``backbone``'s weights at its active width ``w``."""
    width = backbone.width
    single = SlimmableResNet50(width, width_list=(width,))
    single.load_state_dict(_active_slices(backbone), strict=True)  # every key, every shape, or an error
    return single.train(backbone.training)


def slice_model(model: ModelT) -> ModelT:
    """A copy of ``model`` (MSADStudent, MSADTeacher or FCOSDetector) whose backbone holds only its active width.

    The pyramid, head and fusion are sized for one width already and are copied as they are. The copy keeps the
    original's ``requires_grad`` flags and train/eval mode.
    """
    backbone = model.backbone
    if not isinstance(backbone, SlimmableResNet50):
        raise TypeError(f"slice_model needs a model with a SlimmableResNet50 backbone, got {type(backbone).__name__}")
    sliced_backbone = slice_backbone(backbone)
    flags = {name: p.requires_grad for name, p in backbone.named_parameters()}
    model.backbone = None  # type: ignore[assignment]  # do not deep-copy the full-size weights
    try:
        sliced = copy.deepcopy(model)
    finally:
        model.backbone = backbone
    index = backbone.width_list.index(backbone.width)
    for name, param in sliced_backbone.named_parameters():  # bn.0 of the copy is bn.<index> of the original
        param.requires_grad_(flags[name.replace(".bn.0.", f".bn.{index}.")])
    sliced.backbone = sliced_backbone
    return sliced


def _fold(conv: SlimmableConv2d, norm: SwitchableBatchNorm2d) -> nn.Conv2d:
    """conv then eval-mode BN as one conv with bias: W * g / sqrt(v + eps), b - m * g / sqrt(v + eps)."""
    out_c = conv.out_channels_list[conv.width_index]
    in_c = conv.in_channels_list[conv.width_index]
    bn = norm.bn[norm.width_index]
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("folding needs BN running statistics (track_running_stats=True)")
    weight = conv.weight[:out_c, :in_c].detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = bn.bias.detach().double() - bn.running_mean.double() * scale
    folded = nn.Conv2d(in_c, out_c, conv.kernel_size, conv.stride, conv.padding, bias=True,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(weight * scale[:, None, None, None])
        folded.bias.copy_(bias)
    return folded


class PlainBottleneck(nn.Module):
    """A ResNet bottleneck whose convs carry their BN: relu(c3(relu(c2(relu(c1(x))))) + shortcut(x))."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, conv3: nn.Conv2d, shortcut: nn.Conv2d | None) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.shortcut = conv1, conv2, conv3, shortcut

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        return F.relu(self.conv3(out) + identity)


class PlainResNet50(nn.Module):
    """ResNet-50 trunk of plain convs (BN folded), returning ``res2..res5`` like ``SlimmableResNet50``.

    Args:
        stem: the folded 7x7 conv (ReLU and the 3x3/2 max pool follow).
        blocks: the 16 bottlenecks in order.
        stage_at: index in ``[stem, *blocks]`` of each stage's last layer -> its output name.
        out_channels: channels of res2..res5 (what the pyramid was built for).
    """

    def __init__(self, stem: nn.Conv2d, blocks: Iterable[PlainBottleneck], stage_at: dict[int, str],
                 out_channels: dict[str, int]) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self._stage_at = dict(stage_at)
        self._out_channels = dict(out_channels)

    def out_channels(self) -> dict[str, int]:
        return dict(self._out_channels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        outputs: dict[str, Tensor] = {}
        if 0 in self._stage_at:
            outputs[self._stage_at[0]] = x
        for k, block in enumerate(self.blocks, start=1):
            x = block(x)
            if k in self._stage_at:
                outputs[self._stage_at[k]] = x
        return outputs


def fold_backbone(backbone: SlimmableResNet50) -> PlainResNet50:
    """The backbone at its active width as plain convs with its (eval-mode) BN folded in; weights are copies."""
    stem_seq = backbone.features[0]
    stem = _fold(stem_seq[0], stem_seq[1])
    if not (isinstance(stem_seq[2], nn.ReLU) and isinstance(stem_seq[3], nn.MaxPool2d)
            and stem_seq[3].kernel_size == 3 and stem_seq[3].stride == 2 and stem_seq[3].padding == 1):
        raise ValueError("unexpected stem layout; fold_backbone follows msad.models.slimmable.SlimmableResNet50")
    blocks = []
    for block in list(backbone.features)[1:]:
        if not isinstance(block, SlimmableBottleneck):
            raise ValueError(f"unexpected backbone layer {type(block).__name__}")
        body = block.body
        shortcut = None if block.shortcut is None else _fold(block.shortcut[0], block.shortcut[1])
        blocks.append(PlainBottleneck(_fold(body[0], body[1]), _fold(body[3], body[4]), _fold(body[6], body[7]),
                                      shortcut))
    return PlainResNet50(stem, blocks, backbone._stage_at, backbone.out_channels()).eval()
