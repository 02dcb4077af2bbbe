"""Does our FCOS learn as fast as torchvision's? Both trained side by side on the same batches, then COCO-scored.

Both detectors get the same backbone and pyramid (our slimmable ResNet-50 at the config's width and our P3..P7
pyramid, identically initialised from one seed), the same batches in the same order (the library's own dataset,
transforms, collate and sampler), the same SGD and learning-rate schedule (`msad.build`), and the same COCO
evaluation (`msad.engine.loop.evaluate`). Only what sits on top differs:

  ours         msad.models.fcos: head with learnable per-level scales, GN(`model.gn_groups`), our assignment/losses
  torchvision  torchvision.models.detection.FCOS: its head (GN 16, no scales), anchor-based locations, its
               assignment, losses and post-processing (score 0.05, top 1000, NMS 0.6, 100 detections, centre 1.5)

torchvision's resize is switched off and its normalisation set to identity, since the batches come resized and
normalised by our transforms. Steps alternate (ours, torchvision) on each batch, so the wall times are comparable.
If the two reach similar AP, a low AP is the dataset and schedule, not our detector.

    python benchmarks/fcos_learning.py [--iterations 300] [--batch 8] [--short-side 256] [--out runs/fcos_learning]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FCOS
from torchvision.models.detection.transform import GeneralizedRCNNTransform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import BASE_CONFIG, METRICS, schedule_overrides  # noqa: E402

from msad.build import (  # noqa: E402
    build_lr_scheduler,
    build_model,
    build_optimizer,
    build_train_dataset,
    build_val_dataset,
    resolve_data_paths,
)
from msad.config import Config, load_config  # noqa: E402
from msad.data.transforms import Collate  # noqa: E402
from msad.engine.data import EpochSeededDataset, GroupedDistributedSampler  # noqa: E402
from msad.engine.loop import evaluate  # noqa: E402
from msad.engine.trainer import LocalContext  # noqa: E402
from msad.models.detector import HIGH_LEVELS, build_fcos_parts, pyramid_features  # noqa: E402


class PyramidBackbone(nn.Module):
    """Our backbone + P3..P7 pyramid in the shape torchvision's FCOS wants: an OrderedDict and `out_channels`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        parts = build_fcos_parts(m.width, m.width_list, m.fpn_channels, m.num_classes, m.head_convs, m.gn_groups,
                                 HIGH_LEVELS)
        self.body, self.pyramid, self.out_channels = parts.backbone, parts.pyramid, m.fpn_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        features = pyramid_features(self.body, self.pyramid, images, HIGH_LEVELS)
        return OrderedDict(zip(HIGH_LEVELS, features, strict=True))


class AsGiven(GeneralizedRCNNTransform):
    """torchvision's transform minus the resize: our batches are already resized, normalised and padded."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        return image, target


class TorchvisionFCOS(nn.Module):
    """torchvision's FCOS behind our detector interface (forward -> losses, predict -> detections)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        d = cfg.data
        self.model = FCOS(PyramidBackbone(cfg), cfg.model.num_classes, score_thresh=0.05, nms_thresh=0.6,
                          detections_per_img=100, topk_candidates=1000, center_sampling_radius=1.5)
        self.model.transform = AsGiven(d.test_short_side, d.max_size, [0.0] * 3, [1.0] * 3,
                                       size_divisible=d.size_divisibility)

    def forward(self, images: Tensor, targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        return self.model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        detections = self.model(list(images))
        for det, (h, w) in zip(detections, image_sizes, strict=True):  # it clips to the padded size, we to the image
            det["boxes"][:, 0::2] = det["boxes"][:, 0::2].clamp(0, w)
            det["boxes"][:, 1::2] = det["boxes"][:, 1::2].clamp(0, h)
        return detections


def train_side_by_side(cfg: Config, models: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Train every model on the same batches; returns per model its losses every `log_period` and wall seconds."""
    t = cfg.train
    paths = resolve_data_paths(cfg.data)
    train_set = build_train_dataset(cfg, paths)
    seeded = EpochSeededDataset(train_set, t.seed)
    sampler = GroupedDistributedSampler(train_set.landscape(), t.batch_per_worker, 1, 0, seed=t.seed)
    loader = DataLoader(seeded, batch_size=t.batch_per_worker, sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=Collate(cfg.data.size_divisibility), drop_last=True)
    optimizers = {name: build_optimizer(cfg, model) for name, model in models.items()}
    schedulers = {name: build_lr_scheduler(cfg, opt) for name, opt in optimizers.items()}
    log: dict[str, dict[str, Any]] = {name: {"seconds": 0.0, "loss_total": []} for name in models}
    window = {name: 0.0 for name in models}
    iteration, epoch = 0, 0
    for model in models.values():
        model.train()
    while iteration < t.iterations:
        seeded.epoch = epoch
        sampler.set_epoch(epoch)
        for batch in loader:
            if iteration >= t.iterations:
                break
            for name, model in models.items():
                start = time.perf_counter()
                losses = model(batch.images, batch.targets)
                total = sum(losses.values())
                optimizers[name].zero_grad(set_to_none=True)
                total.backward()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizers[name].step()
                schedulers[name].step()
                log[name]["seconds"] += time.perf_counter() - start
                window[name] += float(total.detach())
            iteration += 1
            if iteration % t.log_period == 0:
                line = []
                for name in models:
                    log[name]["loss_total"].append(round(window[name] / t.log_period, 4))
                    line.append(f"{name} {window[name] / t.log_period:.3f}")
                    window[name] = 0.0
                print(f"it {iteration:4d} loss " + "  ".join(line), flush=True)
        epoch += 1
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--short-side", type=int, default=256, choices=[128, 256],
                        help="256: H of the fidelity benchmark; 128: its L, resized directly")
    parser.add_argument("--num-val", type=int, default=128, help="val images of the built-in dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/fcos_learning"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [*schedule_overrides(args.iterations, args.batch), f"data.shapes.num_val={args.num_val}",
                 f"train.seed={args.seed}", "train.role=fcos"]
    if args.short_side == 128:
        overrides += ["data.train_short_sides=[128]", "data.test_short_side=128", "data.max_size=192",
                      "data.size_divisibility=128"]
    cfg = load_config(BASE_CONFIG, overrides)
    models: dict[str, nn.Module] = {}
    for name, make in (("ours", lambda: build_model(cfg)), ("torchvision", lambda: TorchvisionFCOS(cfg))):
        torch.manual_seed(args.seed)  # the same backbone and pyramid weights in both
        models[name] = make()
    ours_trunk = models["ours"].backbone.state_dict()
    theirs_trunk = models["torchvision"].model.backbone.body.state_dict()
    assert all(torch.equal(ours_trunk[k], theirs_trunk[k]) for k in ours_trunk), "backbones must start equal"

    log = train_side_by_side(cfg, models)
    val_set = build_val_dataset(cfg, resolve_data_paths(cfg.data))
    args.out.mkdir(parents=True, exist_ok=True)
    scores = {}
    for name, model in models.items():
        metrics = evaluate(model, val_set, cfg, LocalContext(torch.device("cpu")),
                           output_json=args.out / f"detections_{name}_{args.short_side}.json")
        scores[name] = {k: round(metrics[k], 4) for k in METRICS}
        print(f"{name}: " + "  ".join(f"{k} {100 * v:.1f}" for k, v in scores[name].items())
              + f"  ({log[name]['seconds']:.0f} s training)", flush=True)
    payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": {**vars(args),
               "out": str(args.out)}, "overrides": overrides, "torch_threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "scores": scores, "log": log}
    result = args.out / f"results_{args.short_side}.json"
    result.write_text(json.dumps(payload, indent=1))
    print(f"wrote {result}")



if __name__ == "__main__":
    main()
