"""FCOS decoding + NMS in TorchScript-compilable, pure-torch code, for graphs that must run without torchvision.

``msad.models.fcos.fcos_detections`` is the reference: this is the same computation, step for step, written so
``torch.jit.script`` compiles it, with torchvision's NMS replaced by the same greedy algorithm in torch ops
(``torch.ops.torchvision.nms`` is a torchvision C++ op, so a scripted graph that called it could not even be
loaded where torchvision is not imported). The replica follows torchvision's CPU kernel operation by operation --
areas (x2 - x1) * (y2 - y1), a stable descending sort of the scores, IoU inter / (area_i + area_j - inter), suppress
when > threshold -- and ``batched_nms``'s choice between per-class NMS (more than 4000 box coordinates on CPU,
100000 on CUDA) and the coordinate-offset trick, so on CPU the kept set and its order are the eager ones on the
same inputs. The export checks hold it to that (``msad.deploy.export``); on CUDA eager NMS runs torchvision's CUDA
kernel, whose IoU rounding may differ in the last bit.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _overlaps(rows: Tensor, cols: Tensor, x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor, areas: Tensor,
              iou_threshold: float) -> Tensor:
    """[R, C] bool: IoU(row box, column box) > threshold, with the row box as torchvision's kernel's box i."""
    w = torch.minimum(x2[rows, None], x2[None, cols]) - torch.maximum(x1[rows, None], x1[None, cols])
    h = torch.minimum(y2[rows, None], y2[None, cols]) - torch.maximum(y1[rows, None], y1[None, cols])
    inter = w.clamp(min=0) * h.clamp(min=0)
    return inter / (areas[rows, None] + areas[None, cols] - inter) > iou_threshold


def greedy_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes kept by greedy NMS, in decreasing score order (torchvision's CPU ``nms``).

    The greedy pass is resolved in blocks of 256 boxes (score order) without a per-box loop: a block's boxes
    overlapped by an already kept box go; inside the block, a box none of whose undecided or kept predecessors can
    suppress it is kept, and what a kept box overlaps goes, repeated until the block is decided. That is exactly
    the sequential pass's outcome, and a per-box interpreter loop is what made TorchScript slow.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = scores.sort(stable=True, dim=0, descending=True)[1]
    x1, y1 = boxes[:, 0].contiguous(), boxes[:, 1].contiguous()
    x2, y2 = boxes[:, 2].contiguous(), boxes[:, 3].contiguous()
    areas = ((x2 - x1) * (y2 - y1))[order]
    x1, y1, x2, y2 = x1[order], y1[order], x2[order], y2[order]
    count = int(order.shape[0])
    kept = torch.zeros(0, dtype=torch.int64, device=boxes.device)
    for start in range(0, count, 256):
        block = torch.arange(start, min(start + 256, count), device=boxes.device)
        undecided = torch.ones(block.shape[0], dtype=torch.bool, device=boxes.device)
        if kept.numel() > 0:
            undecided = ~_overlaps(kept, block, x1, y1, x2, y2, areas, iou_threshold).any(0)
        suppresses = _overlaps(block, block, x1, y1, x2, y2, areas, iou_threshold).triu(1)
        keep = torch.zeros_like(undecided)
        while bool(undecided.any()):
            undecided = undecided & ~(suppresses & keep[:, None]).any(0)
            free = undecided & ~(suppresses & undecided[:, None]).any(0)
            keep = keep | free
            undecided = undecided & ~free
        kept = torch.cat((kept, block[keep]))
    return order[kept]


def batched_greedy_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each ``idxs`` group, decreasing score order: ``torchvision.ops.batched_nms``'s two strategies."""
    limit = 4000 if boxes.device.type == "cpu" else 100_000
    if boxes.numel() > limit:
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            current = torch.where(idxs == class_id)[0]
            keep_mask[current[greedy_nms(boxes[current], scores[current], iou_threshold)]] = True
        kept = torch.where(keep_mask)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return greedy_nms(boxes + offsets[:, None], scores, iou_threshold)


def _flatten(level_map: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H * W, C], cells row-major (``fcos._flatten_levels`` of one level)."""
    return level_map.permute(0, 2, 3, 1).reshape(level_map.shape[0], -1, level_map.shape[1])


def fcos_detections_scriptable(
    cls_logits: list[Tensor], box_regression: list[Tensor], centerness: list[Tensor], strides: list[int],
    image_sizes: Tensor, score_thresh: float = 0.05, pre_nms_topk: int = 1000, nms_thresh: float = 0.6,
    max_detections: int = 100,
) -> list[dict[str, Tensor]]:
    """``msad.models.fcos.fcos_detections`` for a batch, with ``image_sizes`` a [B, 2] (h, w) tensor.

    Returns per image {"boxes": [K, 4] xyxy, "scores": [K], "labels": [K] int64}, as the reference does.
    """
    batch, num_classes = cls_logits[0].shape[0], cls_logits[0].shape[1]
    device = cls_logits[0].device
    image_hw = image_sizes.to(device=device, dtype=torch.float32).reshape(batch, 2)
    image_index: list[Tensor] = []
    boxes: list[Tensor] = []
    scores: list[Tensor] = []
    labels: list[Tensor] = []
    for level in range(len(cls_logits)):
        cls_map, box_map, ctr_map, stride = cls_logits[level], box_regression[level], centerness[level], strides[level]
        height, width = cls_map.shape[-2], cls_map.shape[-1]
        xs = torch.arange(width, device=device) * stride + stride // 2
        ys = torch.arange(height, device=device) * stride + stride // 2
        grid = torch.meshgrid([ys, xs], indexing="ij")
        points = torch.stack((grid[1].reshape(-1), grid[0].reshape(-1)), dim=1).to(torch.float32)
        cls_prob = _flatten(cls_map).float().sigmoid()
        ctr_prob = _flatten(ctr_map).float().sigmoid()
        ranked = torch.where(cls_prob > score_thresh, cls_prob * ctr_prob, -1.0).flatten(1)
        top_scores, top_index = ranked.topk(min(pre_nms_topk, ranked.shape[1]), dim=1)
        keep = top_scores >= 0
        img = torch.arange(batch, device=device)[:, None].expand_as(top_index)[keep]
        location = torch.div(top_index[keep], num_classes, rounding_mode="floor")
        label = torch.remainder(top_index[keep], num_classes)
        ltrb = _flatten(box_map).float()[img, location] * stride
        xy = points[location]
        image_index.append(img)
        boxes.append(torch.cat((xy - ltrb[:, :2], xy + ltrb[:, 2:]), dim=1))
        scores.append(top_scores[keep].sqrt())
        labels.append(label)
    all_index, all_boxes, all_scores, all_labels = (torch.cat(image_index), torch.cat(boxes), torch.cat(scores),
                                                     torch.cat(labels))

    keep = batched_greedy_nms(all_boxes.double(), all_scores.double(), all_index * num_classes + all_labels,
                              nms_thresh)
    keep = keep[torch.sort(all_index[keep], stable=True)[1]]
    kept_image = all_index[keep]
    counts = torch.bincount(kept_image, minlength=batch)
    starts = counts.cumsum(0) - counts
    threshold = torch.full((batch,), -1.0, device=device)
    capped = counts > max_detections
    threshold[capped] = all_scores[keep[starts[capped] + max_detections - 1]]
    keep = keep[all_scores[keep] >= threshold[kept_image]]
    all_boxes = all_boxes.clamp(min=0.0).minimum(image_hw[all_index].flip(1).repeat(1, 2))
    keep = keep[(all_boxes[keep, 2] > all_boxes[keep, 0]) & (all_boxes[keep, 3] > all_boxes[keep, 1])]
    sizes: list[int] = torch.bincount(all_index[keep], minlength=batch).tolist()
    results: list[dict[str, Tensor]] = []
    for k in keep.split(sizes):
        results.append({"boxes": all_boxes[k], "scores": all_scores[k], "labels": all_labels[k]})
    return results
