"""FCOS: the shared detection head, target assignment, losses and decoding (Tian et al., ICCV 2019).

The head takes a list of feature maps and says nothing about where they came from: the caller passes the strides
at which each map predicts *in the coordinates of the target boxes*. That is what MSAD needs, since its L branch
and student compute P2..P6 on a half-size image yet predict at strides 8..128 of the H image.

Everything numeric (focal and GIoU losses, NMS) is torchvision.ops; torchvision's own FCOS head is not reused
because its layout (bias on the box branch, no per-level scale, box coder) differs from the original's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)
# Which object sizes each level learns: a location is positive on a level only if max(l, t, r, b) of its box lies
# in (lower, upper]. The half-open ranges give every distance exactly one level (FCOS's `>=`/`<=` let a distance
# of exactly 64 be positive on two levels).
SIZE_RANGES: tuple[tuple[float, float], ...] = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0),
                                                (512.0, math.inf))
BACKGROUND = -1  # FCOSTargets.labels / matched_index value of a location that matches no box
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


@dataclass
class HeadOutputs:
    """Raw head predictions, one tensor per level.

    Args:
        cls_logits: [B, num_classes, H, W] class logits per level.
        box_regression: [B, 4, H, W] non-negative (l, t, r, b) distances in units of the level's stride.
        centerness: [B, 1, H, W] centerness logits.
    """

    cls_logits: list[Tensor]
    box_regression: list[Tensor]
    centerness: list[Tensor]


@dataclass
class FCOSTargets:
    """Per-location training targets for a batch, locations of all levels concatenated (level-major, row-major).

    Args:
        labels: [B, L] int64 class of the matched box, BACKGROUND (-1) where negative.
        box_targets: [B, L, 4] (l, t, r, b) distances in pixels from the location to its box; 0 where negative.
        matched_index: [B, L] int64 index into that image's target boxes, BACKGROUND (-1) where negative.
        positive: [B, L] bool, True where the location is assigned a box.
    """

    labels: Tensor
    box_targets: Tensor
    matched_index: Tensor
    positive: Tensor


class Scale(nn.Module):
    """A learnable scalar multiplier (one per level, so levels can rescale a shared box predictor).

    Args:
        init: starting value; FCOS starts at 1.0.
    """

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _group_count(channels: int, groups: int) -> int:
    """The largest divisor of `channels` that is <= `groups` (GroupNorm needs groups to divide channels)."""
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


def _tower(channels: int, num_convs: int, gn_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1),
                   nn.GroupNorm(_group_count(channels, gn_groups), channels), nn.ReLU()]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """The FCOS head shared across levels (and, in MSAD, across the H, L and fused branches).

    Attribute names match the original checkpoint (`cls_tower.{0,3,6,9}` convs, `.{1,4,7,10}` GroupNorms,
    `bbox_tower`, `cls_logits`, `bbox_pred`, `ctrness`, `scales.{i}.scale`) so converting weights is a rename of
    the prefix only.

    Args:
        in_channels: channels of every input feature map (FPN width).
        num_classes: number of foreground classes (sigmoid outputs, no background logit).
        num_convs: conv + GroupNorm + ReLU blocks per tower (4 in the paper).
        num_levels: number of feature maps `forward` takes; one learnable box scale per level index.
        gn_groups: GroupNorm groups (32 in the paper). When it does not divide `in_channels` the largest divisor
            below it is used, so narrow CPU configurations (e.g. 24 channels) still build.
        prior_prob: initial foreground probability of the class logits (focal-loss prior), so early training is
            not swamped by the loss of the many background locations.
    """

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, num_levels: int = 5,
                 gn_groups: int = 32, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = _tower(in_channels, num_convs, gn_groups)
        self.bbox_tower = _tower(in_channels, num_convs, gn_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1, bias=False)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1, bias=False)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> HeadOutputs:
        """Predict on each level.

        Args:
            features: exactly `num_levels` maps [B, in_channels, H_i, W_i], finest first; every level's scale is
                used, so DDP never sees an unused parameter.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"FCOSHead built for {len(self.scales)} levels got {len(features)} feature maps")
        cls_logits, box_regression, centerness = [], [], []
        for scale, feature in zip(self.scales, features, strict=True):
            cls_feature = self.cls_tower(feature)
            box_feature = self.bbox_tower(feature)
            cls_logits.append(self.cls_logits(cls_feature))
            box_regression.append(F.relu(scale(self.bbox_pred(box_feature))))
            centerness.append(self.ctrness(box_feature))
        return HeadOutputs(cls_logits, box_regression, centerness)


def level_locations(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | str,
                    dtype: torch.dtype) -> list[Tensor]:
    """Image-coordinate (x, y) of every feature-map cell, `stride * i + stride // 2`, row-major per level.

    Args:
        sizes: (height, width) of each level's feature map.
        strides: each level's stride in the coordinates of the boxes it predicts (not of its own input image).
        device: where to build the tensors.
        dtype: floating type of the result.

    Returns:
        One [H_i * W_i, 2] tensor per level, in the order `map.flatten(2)` visits cells.
    """
    locations = []
    for (height, width), stride in zip(sizes, strides, strict=True):
        xs = torch.arange(width, device=device) * stride + stride // 2
        ys = torch.arange(height, device=device) * stride + stride // 2
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        locations.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1).to(dtype))
    return locations


def _per_location(values: Sequence[float], locations: list[Tensor]) -> Tensor:
    """Repeat one value per level to one value per location: [L]."""
    ref = locations[0]
    counts = torch.tensor([len(loc) for loc in locations], device=ref.device)
    return torch.tensor(values, device=ref.device, dtype=ref.dtype).repeat_interleave(counts)


def _pad_targets(targets: list[dict], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Stack ragged targets as boxes [B, M, 4], labels [B, M] and a validity mask [B, M], with M >= 1."""
    counts = torch.tensor([len(t["boxes"]) for t in targets], device=device)
    max_boxes = max(int(counts.max()), 1)  # one all-invalid slot keeps reductions over M well defined
    boxes = torch.zeros(len(targets), max_boxes, 4, device=device, dtype=dtype)
    labels = torch.full((len(targets), max_boxes), BACKGROUND, device=device, dtype=torch.int64)
    valid = torch.arange(max_boxes, device=device)[None, :] < counts[:, None]
    if bool(valid.any()):
        boxes[valid] = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=dtype)
        labels[valid] = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
    return boxes, labels, valid


def assign_targets(locations: list[Tensor], strides: Sequence[int], targets: list[dict],
                   size_ranges: Sequence[tuple[float, float]] = SIZE_RANGES,
                   center_sampling_radius: float = 1.5) -> FCOSTargets:
    """Assign each location of each image to at most one box, for the whole batch at once.

    A location is positive for a box iff it lies strictly inside the box, inside the centre region (the box
    centre +- `center_sampling_radius * stride`, clipped to the box) and max(l, t, r, b) is in its level's
    (lower, upper] range. A location positive for several boxes takes the one of smallest area.

    Args:
        locations: per level [L_i, 2] (x, y), as from `level_locations`.
        strides: per level stride, in the coordinates of the target boxes.
        targets: per image {"boxes": [N, 4] xyxy, "labels": [N]}; N may be 0.
        size_ranges: per level (lower, upper] bound on max(l, t, r, b); how objects are split across levels.
        center_sampling_radius: centre-region half size in strides; keeps positives off box borders, where
            features mostly see background.
    """
    if not len(locations) == len(strides) == len(size_ranges):
        raise ValueError(f"got {len(locations)} levels of locations, {len(strides)} strides and "
                         f"{len(size_ranges)} size ranges; they must match")
    points = torch.cat(locations)  # [L, 2]
    radius = _per_location([s * center_sampling_radius for s in strides], locations)  # [L]
    lower = _per_location([r[0] for r in size_ranges], locations)
    upper = _per_location([r[1] for r in size_ranges], locations)
    boxes, labels, valid = _pad_targets(targets, points.device, points.dtype)  # [B, M, 4], [B, M], [B, M]

    x = points[None, :, 0, None]  # [1, L, 1] broadcasts against boxes [B, 1, M]
    y = points[None, :, 1, None]
    x0, y0, x1, y1 = (boxes[:, None, :, k] for k in range(4))
    left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y  # [B, L, M]
    extent = torch.maximum(torch.maximum(left, right), torch.maximum(top, bottom))

    center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2
    r = radius[None, :, None]
    in_center = ((x > torch.maximum(center_x - r, x0)) & (x < torch.minimum(center_x + r, x1))
                 & (y > torch.maximum(center_y - r, y0)) & (y < torch.minimum(center_y + r, y1)))
    in_box = torch.minimum(torch.minimum(left, right), torch.minimum(top, bottom)) > 0
    in_range = (extent > lower[None, :, None]) & (extent <= upper[None, :, None])
    candidate = in_box & in_center & in_range & valid[:, None, :]

    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [B, M]
    candidate_area = torch.where(candidate, area[:, None, :], torch.full_like(left, math.inf))
    min_area, matched = candidate_area.min(dim=2)  # [B, L]; ties -> the lowest box index
    positive = torch.isfinite(min_area)

    matched_boxes = torch.gather(boxes, 1, matched[..., None].expand(-1, -1, 4))  # [B, L, 4]
    box_targets = torch.cat((points[None] - matched_boxes[..., :2], matched_boxes[..., 2:] - points[None]), dim=2)
    box_targets = box_targets * positive[..., None]
    matched_labels = torch.where(positive, torch.gather(labels, 1, matched), BACKGROUND)
    matched = torch.where(positive, matched, BACKGROUND)
    return FCOSTargets(labels=matched_labels, box_targets=box_targets, matched_index=matched, positive=positive)


def centerness_targets(box_targets: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) for [..., 4] positive (l, t, r, b) distances."""
    left_right, top_bottom = box_targets[..., [0, 2]], box_targets[..., [1, 3]]
    ratio = (left_right.min(-1).values / left_right.max(-1).values) * (
        top_bottom.min(-1).values / top_bottom.max(-1).values)
    return ratio.sqrt()


def _mean_over_workers(value: Tensor) -> Tensor:
    """Sum a scalar over all workers and divide by the world size, so every worker normalises its loss by the
    same batch-wide average (as FCOS does); identity when torch.distributed is not in use."""
    value = value.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / dist.get_world_size()
    return value


def _flatten_levels(maps: list[Tensor]) -> Tensor:
    """[B, C, H_i, W_i] per level -> [B, sum_i H_i W_i, C] in `level_locations` order."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


def giou_loss_plus_one(pred_ltrb: Tensor, target_ltrb: Tensor) -> Tensor:
    """The original's GIoU loss (AdelaiDet's IOULoss, type "giou"): 1 - (iou - (C - U) / C) with the IoU smoothed
    as (I + 1) / (U + 1), on (l, t, r, b) distances in stride units. The +1 pulls the IoU of small boxes towards 1
    (a box one stride wide gains up to 0.5), so their loss is weaker than the exact GIoU's."""
    pred_area = (pred_ltrb[:, 0] + pred_ltrb[:, 2]) * (pred_ltrb[:, 1] + pred_ltrb[:, 3])
    target_area = (target_ltrb[:, 0] + target_ltrb[:, 2]) * (target_ltrb[:, 1] + target_ltrb[:, 3])
    inner = torch.minimum(pred_ltrb, target_ltrb)
    outer = torch.maximum(pred_ltrb, target_ltrb)
    intersection = (inner[:, 0] + inner[:, 2]) * (inner[:, 1] + inner[:, 3])
    enclosing = (outer[:, 0] + outer[:, 2]) * (outer[:, 1] + outer[:, 3])
    union = pred_area + target_area - intersection
    iou = (intersection + 1.0) / (union + 1.0)
    return 1.0 - (iou - (enclosing - union) / enclosing)


def fcos_losses(outputs: HeadOutputs, targets: list[dict], strides: Sequence[int],
                giou_plus_one: bool = False) -> dict[str, Tensor]:
    """FCOS training losses for one batch.

    loss_cls: sigmoid focal loss (alpha 0.25, gamma 2) summed over all locations and classes / positives.
    loss_box: GIoU loss on positives, weighted by their centerness target / the sum of those targets.
    loss_ctr: centerness BCE on positives / positives.
    Both normalisers are averaged over workers and clamped (>= 1 positive, >= 1e-6 centerness). With no
    positives the box and centerness terms are an exact 0 that still depends on every parameter, so DDP sees
    gradients everywhere.

    Args:
        outputs: the head's predictions.
        targets: per image {"boxes": [N, 4] xyxy, "labels": [N]} in the coordinates the strides refer to.
        strides: per level stride at which `outputs` predict, in target-box coordinates.
        giou_plus_one: the original's smoothed GIoU (`giou_loss_plus_one`) instead of the exact one.
    """
    sizes = [tuple(m.shape[-2:]) for m in outputs.cls_logits]
    locations = level_locations(sizes, strides, outputs.cls_logits[0].device, torch.float32)
    assigned = assign_targets(locations, strides, targets)
    stride_per_location = _per_location([float(s) for s in strides], locations)  # [L]

    cls_logits = _flatten_levels(outputs.cls_logits).float()  # [B, L, C]
    box_regression = _flatten_levels(outputs.box_regression).float()  # [B, L, 4]
    centerness = _flatten_levels(outputs.centerness).float()[..., 0]  # [B, L]
    positive = assigned.positive

    num_positive = _mean_over_workers(positive.sum().float()).clamp(min=1.0)
    cls_targets = F.one_hot(assigned.labels.clamp(min=0), cls_logits.shape[-1]).float() * positive[..., None]
    loss_cls = sigmoid_focal_loss(cls_logits, cls_targets, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="sum")

    # Regression is learnt in units of the level's stride; GIoU is translation invariant, so boxes are decoded
    # around the location as the origin: (-l, -t, r, b).
    box_targets = assigned.box_targets[positive] / stride_per_location.expand_as(positive)[positive][:, None]
    ctr_targets = centerness_targets(box_targets)
    pred_ltrb, target_ltrb = box_regression[positive], box_targets
    sign = pred_ltrb.new_tensor([-1.0, -1.0, 1.0, 1.0])
    if giou_plus_one:
        giou = giou_loss_plus_one(pred_ltrb, target_ltrb)
    else:
        giou = generalized_box_iou_loss(pred_ltrb * sign, target_ltrb * sign, reduction="none")
    ctr_sum = _mean_over_workers(ctr_targets.sum()).clamp(min=1e-6)
    loss_ctr = F.binary_cross_entropy_with_logits(centerness[positive], ctr_targets, reduction="sum")
    # Anchor both terms to the full prediction maps: with no positives they are 0 yet keep every parameter
    # of the box tower in the graph (indexing an empty selection would too, but only by accident).
    connect = box_regression.sum() * 0 + centerness.sum() * 0
    return {
        "loss_cls": loss_cls / num_positive,
        "loss_box": (giou * ctr_targets).sum() / ctr_sum + connect,
        "loss_ctr": loss_ctr / num_positive + connect,
    }


@torch.no_grad()
def fcos_detections(outputs: HeadOutputs, strides: Sequence[int], image_sizes: list[tuple[int, int]],
                    score_thresh: float = 0.05, pre_nms_topk: int = 1000, nms_thresh: float = 0.6,
                    max_detections: int = 100) -> list[dict]:
    """Decode a batch of predictions into per-image detections; one NMS call serves every image and class.

    Args:
        outputs: the head's predictions for B images.
        strides: per level stride at which `outputs` predict, in the coordinates the boxes should come out in.
        image_sizes: per image (height, width) of the unpadded image; boxes are clipped to it.
        score_thresh: minimum class probability (before centerness) for a candidate.
        pre_nms_topk: candidates kept per level per image, ranked by sqrt(class prob * centerness).
        nms_thresh: IoU above which a lower-scoring box of the same image and class is suppressed.
        max_detections: detections kept per image, highest scores first.

    Returns:
        Per image {"boxes": [K, 4] xyxy, "scores": [K] sqrt(cls * centerness), "labels": [K] int64}.
    """
    batch, num_classes = outputs.cls_logits[0].shape[:2]
    device = outputs.cls_logits[0].device
    sizes = [tuple(m.shape[-2:]) for m in outputs.cls_logits]
    locations = level_locations(sizes, strides, device, torch.float32)
    image_hw = torch.tensor(image_sizes, device=device, dtype=torch.float32).reshape(batch, 2)
    image_index, boxes, scores, labels = [], [], [], []
    for cls_map, box_map, ctr_map, points, stride in zip(outputs.cls_logits, outputs.box_regression,
                                                           outputs.centerness, locations, strides, strict=True):
        cls_prob = _flatten_levels([cls_map]).float().sigmoid()  # [B, L_i, C]
        ctr_prob = _flatten_levels([ctr_map]).float().sigmoid()  # [B, L_i, 1]
        ranked = torch.where(cls_prob > score_thresh, cls_prob * ctr_prob, -1.0).flatten(1)  # [B, L_i * C]
        top_scores, top_index = ranked.topk(min(pre_nms_topk, ranked.shape[1]), dim=1)
        keep = top_scores >= 0  # drops the below-threshold fillers topk had to take
        img = torch.arange(batch, device=device)[:, None].expand_as(top_index)[keep]
        location, label = top_index[keep] // num_classes, top_index[keep] % num_classes
        ltrb = _flatten_levels([box_map]).float()[img, location] * stride
        xy = points[location]
        image_index.append(img)
        boxes.append(torch.cat((xy - ltrb[:, :2], xy + ltrb[:, 2:]), dim=1))
        scores.append(top_scores[keep].sqrt())
        labels.append(label)
    image_index, boxes, scores, labels = (torch.cat(t) for t in (image_index, boxes, scores, labels))

    # The original's order (AdelaiDet's FCOSOutputs, then Detectron2's detector_postprocess): NMS on the boxes as
    # decoded; per image the max_detections best, keeping every box tied with the last one; then clip to the image
    # and drop boxes left without area. float64 for NMS: the per-(image, class) coordinate offsets batched_nms adds
    # reach ~B*C*image size, where float32 would round coordinates enough to change IoUs of small boxes.
    keep = batched_nms(boxes.double(), scores.double(), image_index * num_classes + labels, nms_thresh)
    # keep is sorted by score; a stable sort by image keeps that order within each image.
    keep = keep[torch.sort(image_index[keep], stable=True).indices]
    kept_image = image_index[keep]
    counts = torch.bincount(kept_image, minlength=batch)
    starts = counts.cumsum(0) - counts
    threshold = torch.full((batch,), -1.0, device=device)
    capped = counts > max_detections
    threshold[capped] = scores[keep[starts[capped] + max_detections - 1]]  # each image's max_detections-th score
    keep = keep[scores[keep] >= threshold[kept_image]]
    boxes = boxes.clamp(min=0).minimum(image_hw[image_index].flip(1).repeat(1, 2))
    keep = keep[(boxes[keep, 2] > boxes[keep, 0]) & (boxes[keep, 3] > boxes[keep, 1])]
    per_image = torch.split(keep, torch.bincount(image_index[keep], minlength=batch).tolist())
    return [{"boxes": boxes[k], "scores": scores[k], "labels": labels[k]} for k in per_image]
