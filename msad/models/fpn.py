"""Feature pyramid P2..P7 on res2..res5 that computes only the levels a caller asks for.

Why not ``torchvision.ops.FeaturePyramidNetwork``: it always runs every lateral and output conv, and its
``LastLevelP6P7`` silently builds P6 from P5 instead of C5 when the channel counts match. MSAD's teacher runs the
pyramid twice per step, on H needing P3..P7 and on L needing P2..P6; the H pass's P2 output conv is the most
expensive 3x3 conv of the pyramid (256 -> 256 at stride 4 of the large image) and its result is never used, and
P7 is never used by the L pass or the student. Skipping them saves the compute and leaves no parameter unused in
a step (no DDP ``find_unused_parameters``).

Attribute names follow Detectron2's FPN so a converter maps ``fpn_lateral{k}`` -> ``lateral.{k}``,
``fpn_output{k}`` -> ``output.{k}``, ``top_block.p6/p7`` -> ``p6/p7``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PYRAMID_LEVELS: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6", "p7")


def _init_conv(conv: nn.Conv2d) -> None:
    # Detectron2 / maskrcnn-benchmark FPN init ("c2_xavier_fill"): kaiming uniform with a=1, zero bias.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)


def strided_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for the stride-2 P6 / P7 convs, in fp32 where torch's bf16 CPU kernel is wrong.

    In torch 2.14.1 on CPU, the bf16 weight gradient of a stride-2 conv with a kernel larger than 1 is garbage when
    its input is one column wide: it reads memory it never wrote, so it differs from run to run and is often NaN
    (both the oneDNN and the native kernels; input gradient and forward are right). P7's input is one column wide
    whenever a padded batch is at most 64 px wide, e.g. plain FCOS at L = 64. That one case runs in fp32 (a
    1-column map: no measurable cost); everything else keeps its autocast, and inference is untouched.
    """
    if (x.shape[-1] == 1 and x.device.type == "cpu" and torch.is_grad_enabled() and conv.weight.requires_grad
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)


class FeaturePyramid(nn.Module):
    """Top-down FPN: 1x1 laterals, nearest-neighbour upsampling, 3x3 output convs; P6/P7 from C5.

    P6 is a 3x3 stride-2 conv on the last backbone feature (C5) and P7 a 3x3 stride-2 conv on relu(P6), as in
    FCOS, so the pyramid spans strides 4..128 when the inputs are res2..res5. A model that never asks for P7
    (the student) should call ``fpn.p7.requires_grad_(False)`` before wrapping in DDP, which otherwise waits for
    gradients of parameters that were not used.

    Args:
        in_channels: channels of each backbone output, keyed ``"res{k}"`` (e.g. ``backbone.out_channels()``);
            level ``p{k}`` is built from ``res{k}``.
        out_channels: channels of every pyramid level (256 in the paper).
        top_levels: build P6 and P7; without them only ``p{k}`` for the given ``res{k}`` exist.
    """

    def __init__(self, in_channels: dict[str, int], out_channels: int, top_levels: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        if not in_channels or any(not (k.startswith("res") and k[3:].isdigit()) for k in in_channels):
            raise ValueError(f"in_channels keys must be 'res<k>', got {list(in_channels)}")
        self._levels = sorted(int(k[3:]) for k in in_channels)  # backbone levels, finest first
        self.lateral = nn.ModuleDict({str(k): nn.Conv2d(in_channels[f"res{k}"], out_channels, 1) for k in self._levels})
        self.output = nn.ModuleDict({str(k): nn.Conv2d(out_channels, out_channels, 3, padding=1) for k in self._levels})
        self.p6: nn.Conv2d | None = None
        self.p7: nn.Conv2d | None = None
        top = self._levels[-1]
        if top_levels:
            self.p6 = nn.Conv2d(in_channels[f"res{top}"], out_channels, 3, stride=2, padding=1)
            self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.level_names = [f"p{k}" for k in self._levels] + ([f"p{top + 1}", f"p{top + 2}"] if top_levels else [])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)

    def forward(self, feats: dict[str, Tensor], levels: Sequence[str] = PYRAMID_LEVELS) -> dict[str, Tensor]:
        """Compute the requested pyramid levels.

        Args:
            feats: backbone outputs keyed ``"res{k}"``.
            levels: names among ``self.level_names``; the top-down path stops at the finest one asked for, the
                output conv of a level not asked for is skipped and P7 is computed only when asked for.

        Returns:
            ``{level: Tensor[B, out_channels, H, W]}`` in pyramid order (finest first).
        """
        wanted = set(levels)
        unknown = wanted.difference(self.level_names)
        if unknown:
            raise ValueError(f"unknown pyramid levels {sorted(unknown)}; this pyramid has {self.level_names}")
        top = self._levels[-1]
        outputs: dict[str, Tensor] = {}
        asked = [k for k in self._levels if f"p{k}" in wanted]
        if asked:
            inner = self.lateral[str(top)](feats[f"res{top}"])
            for k in reversed(self._levels):
                if k != top:
                    lateral = self.lateral[str(k)](feats[f"res{k}"])
                    inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
                if k in asked:
                    outputs[f"p{k}"] = self.output[str(k)](inner)
                if k == asked[0]:
                    break
        p6_name, p7_name = f"p{top + 1}", f"p{top + 2}"
        if self.p6 is not None and self.p7 is not None and (p6_name in wanted or p7_name in wanted):
            p6 = strided_conv(self.p6, feats[f"res{top}"])
            if p6_name in wanted:
                outputs[p6_name] = p6
            if p7_name in wanted:
                outputs[p7_name] = strided_conv(self.p7, F.relu(p6))
        return {name: outputs[name] for name in self.level_names if name in outputs}
