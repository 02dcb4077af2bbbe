"""Train-step time of our plain FCOS against torchvision's FCOS, side by side on the same inputs and CPU.

Both models: ResNet-50 + FPN (256 channels) + FCOS head (4 convs per tower, GroupNorm 32), 80 classes, random
init, BatchNorm in train mode, SGD (lr 0.01, momentum 0.9, weight decay 1e-4), the same two 512x512 images with a
few random boxes. torchvision's internal resize is pinned to 512 (min_size = max_size = 512) so both see 512x512.
After warm-up the timed steps alternate (ours, torchvision, ours, ...) so machine noise hits both alike; medians
and the ratio ours / torchvision are printed, then a per-part breakdown of both steps that explains the ratio.

Ours is the shipped step: `FCOSDetector.forward` (the sum of its `loss_*` terms), backward, SGD; the breakdown reads
the seams of that same call from forward hooks on the model's head (backbone + FPN | head | assignment + losses).
torchvision's is its public forward, and for its breakdown the body of `FCOS.forward` split at its seams.

Like for like at width 1.0: the slimmable backbone allocates its convs at full width, so at width 1.0 it runs the
same convolutions as torchvision's ResNet-50 (plus one BatchNorm per width held in memory, only one of which runs).

    python benchmarks/fcos_step.py [--steps 8] [--warmup 2] [--breakdown-steps 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import fcos_resnet50_fpn

from msad.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from msad.models import FCOSDetector
from msad.models.trainable import loss_terms

PARTS_OURS = ("backbone+FPN", "head", "assignment+loss", "backward", "optimizer step")
PARTS_TV = ("transform", "backbone+FPN", "head", "anchors+assignment+loss", "backward", "optimizer step")


def make_inputs(num_images: int, size: int, boxes_per_image: int, num_classes: int,
                seed: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Random [0, 1] images and random boxes (side 16..size/2) with random labels, identical for both models."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=gen) for _ in range(num_images)]
    targets = []
    for _ in range(num_images):
        wh = torch.randint(16, size // 2, (boxes_per_image, 2), generator=gen).float()
        xy = torch.rand(boxes_per_image, 2, generator=gen) * (size - wh)
        targets.append({"boxes": torch.cat((xy, xy + wh), dim=1),
                        "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=gen)})
    return images, targets


def sgd(model: nn.Module) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


class OursStep:
    """One training step of msad.models.FCOSDetector through its own ``forward``, timed part by part.

    The step calls the shipped ``FCOSDetector.forward`` (backbone + pyramid -> head -> ``fcos_losses``) once; forward
    hooks on the model's ``head`` mark its seams (head entered, head left), so the parts are measured inside the
    model's own computation rather than a copy of it.
    """

    def __init__(self, model: FCOSDetector, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        self.model = model.train()
        self.optimizer = sgd(model)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        self.batch = (torch.stack(images) - mean) / std  # our data pipeline normalises before batching
        self.targets = targets
        self.seams: dict[str, float] = {}
        model.head.register_forward_pre_hook(lambda *_: self._mark("head_in"))
        model.head.register_forward_hook(lambda *_: self._mark("head_out"))

    def _mark(self, seam: str) -> None:
        self.seams[seam] = time.perf_counter()

    def __call__(self) -> dict[str, float]:
        t0 = time.perf_counter()
        loss = sum(loss_terms(self.model(self.batch, self.targets)).values())
        t3 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        self.optimizer.step()
        t5 = time.perf_counter()
        t1, t2 = self.seams["head_in"], self.seams["head_out"]
        return dict(zip(PARTS_OURS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True))


class TorchvisionStep:
    """One training step of torchvision's FCOS: its public forward, or the same body split into timed parts."""

    def __init__(self, model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        self.model = model.train()
        self.optimizer = sgd(model)
        self.images = images
        self.targets = targets

    def __call__(self) -> dict[str, float]:
        t0 = time.perf_counter()
        loss = sum(self.model(self.images, self.targets).values())
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer step": t3 - t2}

    def parts(self) -> dict[str, float]:
        """The body of torchvision's FCOS.forward in training (minus its input asserts), split into parts."""
        m = self.model
        t0 = time.perf_counter()
        images, targets = m.transform(self.images, self.targets)
        t1 = time.perf_counter()
        features = list(m.backbone(images.tensors).values())
        t2 = time.perf_counter()
        head_outputs = m.head(features)
        t3 = time.perf_counter()
        anchors = m.anchor_generator(images, features)
        num_anchors_per_level = [x.size(2) * x.size(3) for x in features]
        loss = sum(m.compute_loss(targets, head_outputs, anchors, num_anchors_per_level).values())
        t4 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t5 = time.perf_counter()
        self.optimizer.step()
        t6 = time.perf_counter()
        return dict(zip(PARTS_TV, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True))


def interleave(steps: list[Callable[[], dict[str, float]]], count: int) -> list[list[dict[str, float]]]:
    """Run `count` rounds of every step in turn; per step, the list of its part timings."""
    timings: list[list[dict[str, float]]] = [[] for _ in steps]
    for _ in range(count):
        for step, record in zip(steps, timings, strict=True):
            record.append(step())
    return timings


def total_median(records: list[dict[str, float]]) -> float:
    return statistics.median(sum(r.values()) for r in records)


def print_breakdown(title: str, records: list[dict[str, float]]) -> None:
    total = total_median(records)
    print(f"\n{title} (median of {len(records)} steps, total {total:.3f} s)")
    for part in records[0]:
        value = statistics.median(r[part] for r in records)
        print(f"  {part:<26s} {value:7.3f} s  {100 * value / total:5.1f} %")


def step_gflops(step: Callable[[], dict[str, float]]) -> float:
    """FLOPs of one whole step (forward, backward, optimizer) as torch's FLOP counter sees them, in GFLOPs."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--breakdown-steps", type=int, default=3, help="extra interleaved steps for the breakdown")
    parser.add_argument("--size", type=int, default=512, help="image side")
    parser.add_argument("--images", type=int, default=2, help="images per step")
    parser.add_argument("--boxes", type=int, default=5, help="random boxes per image")
    parser.add_argument("--classes", type=int, default=80, help="foreground classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flops", action="store_true", help="skip counting the FLOPs of one step of each")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    images, targets = make_inputs(args.images, args.size, args.boxes, args.classes, args.seed)
    torch.manual_seed(args.seed)
    ours = OursStep(FCOSDetector(width=1.0, fpn_channels=256, num_classes=args.classes), images, targets)
    # torchvision's num_classes counts a background slot that FCOS's sigmoid classifier leaves unused; pass the
    # same 80 so both heads have 80 logits.
    tv_model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=args.classes,
                                 min_size=args.size, max_size=args.size)
    tv = TorchvisionStep(tv_model, images, targets)
    print(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  {platform.processor() or platform.machine()}")
    print(f"{args.images} images {args.size}x{args.size}, {args.boxes} boxes each, {args.classes} classes; "
          f"warm-up {args.warmup}, timed {args.steps} interleaved steps per model")

    interleave([ours, tv], args.warmup)
    ours_records, tv_records = interleave([ours, tv], args.steps)
    ours_s, tv_s = total_median(ours_records), total_median(tv_records)
    spread = {name: (min(sum(r.values()) for r in rec), max(sum(r.values()) for r in rec))
              for name, rec in (("ours", ours_records), ("torchvision", tv_records))}
    print(f"\nours         median {ours_s:.3f} s/step  (min {spread['ours'][0]:.3f}, max {spread['ours'][1]:.3f})")
    print(f"torchvision  median {tv_s:.3f} s/step  (min {spread['torchvision'][0]:.3f}, "
          f"max {spread['torchvision'][1]:.3f})")
    print(f"ratio ours / torchvision: {ours_s / tv_s:.3f}")

    print_breakdown("ours, timed steps", ours_records)
    print_breakdown("torchvision, timed steps (public forward)", tv_records)
    if args.breakdown_steps > 0:
        ours_parts, tv_parts = interleave([ours, tv.parts], args.breakdown_steps)
        print_breakdown("ours, breakdown steps", ours_parts)
        print_breakdown("torchvision, breakdown steps (forward body split at its seams)", tv_parts)
    if not args.no_flops:
        ours_gflops, tv_gflops = step_gflops(ours), step_gflops(tv)
        print(f"\nFLOPs per step (torch.utils.flop_counter): ours {ours_gflops:.1f} G, torchvision {tv_gflops:.1f} G, "
              f"ratio {ours_gflops / tv_gflops:.3f}")


if __name__ == "__main__":
    main()
