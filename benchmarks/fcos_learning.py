"""Does our FCOS learn as fast as torchvision's? Both trained side by side on the same batches, then COCO-scored.

Ours is trained by the shipped loop itself: `msad.engine.loop.run_training` in this process (a `LocalContext`, no
Ray), i.e. exactly the run `fidelity.py`'s fcos_h is (dataset, transforms, sampler, collate, `train_step`, SGD and
learning-rate schedule from `msad.build`, the final COCO evaluation with its intervals). torchvision's FCOS rides
along: the context hands the loop its DataLoader wrapped so that every batch the loop draws first goes through one
`train_step` of torchvision's model (its own optimizer and schedule, built by the same `msad.build` functions), then
to the loop's step on ours. torchvision's model is then scored by the same `msad.engine.loop.evaluate`.

Both detectors get the same backbone and pyramid (`build_model`'s slimmable ResNet-50 at the config's width and
P3..P7 pyramid, identically initialised from the run's seed; asserted), so only what sits on top differs:

  ours         msad.models.fcos: head with learnable per-level scales, GN(`model.gn_groups`), our assignment/losses
  torchvision  torchvision.models.detection.FCOS: its head (GN 16, no scales), anchor-based locations, its
               assignment, losses and post-processing (score 0.05, top 1000, NMS 0.6, 100 detections, centre 1.5)

torchvision's resize is switched off and its normalisation set to identity, since the batches come resized and
normalised by our transforms. Steps alternate (torchvision, ours) on each batch, so the wall times are comparable:
"training s" is the sum over steps of each model's forward -> optimizer step (timed by a forward pre-hook on the
model and torch's optimizer-step post-hook), data loading, reports, checkpoints and evaluation left out. If the two
reach similar AP, a low AP is the dataset and schedule, not our detector.

    python benchmarks/fcos_learning.py [--iterations 300] [--batch 8] [--short-side 256] [--out runs/fcos_learning]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader
from torchvision.models.detection import FCOS
from torchvision.models.detection.transform import GeneralizedRCNNTransform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import BASE_CONFIG, METRICS, schedule_overrides  # noqa: E402

from msad.build import (  # noqa: E402
    build_lr_scheduler,
    build_model,
    build_optimizer,
    build_val_dataset,
    resolve_data_paths,
)
from msad.config import Config, load_config  # noqa: E402
from msad.data.transforms import Batch  # noqa: E402
from msad.engine.in_process import LocalContext  # noqa: E402
from msad.engine.loop import RESULTS_FILE, evaluate, run_training, train_step  # noqa: E402
from msad.models.detector import HIGH_LEVELS, pyramid_features  # noqa: E402
from msad.models.trainable import loss_terms  # noqa: E402


class PyramidBackbone(nn.Module):
    """Our backbone + P3..P7 pyramid (`build_model`'s, for the config) in the shape torchvision's FCOS wants: an
    OrderedDict and `out_channels`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        ours = build_model(cfg)
        self.body, self.pyramid, self.out_channels = ours.backbone, ours.pyramid, cfg.model.fpn_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        features = pyramid_features(self.body, self.pyramid, images, HIGH_LEVELS)
        return OrderedDict(zip(HIGH_LEVELS, features, strict=True))


class AsGiven(GeneralizedRCNNTransform):
    """torchvision's transform minus the resize: our batches are already resized, normalised and padded."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        return image, target


class TorchvisionFCOS(nn.Module):
    """torchvision's FCOS behind our trainable interface (forward -> `loss_*` terms, predict -> detections)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        d = cfg.data
        self.model = FCOS(PyramidBackbone(cfg), cfg.model.num_classes, score_thresh=0.05, nms_thresh=0.6,
                          detections_per_img=100, topk_candidates=1000, center_sampling_radius=1.5)
        self.model.transform = AsGiven(d.test_short_side, d.max_size, [0.0] * 3, [1.0] * 3,
                                       size_divisible=d.size_divisibility)

    def forward(self, images: Tensor, targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        losses = self.model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        return {f"loss_{name}": value for name, value in losses.items()}

    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                branch: str | None = None) -> list[dict[str, Tensor]]:
        detections = self.model(list(images))
        for det, (h, w) in zip(detections, image_sizes, strict=True):  # it clips to the padded size, we to the image
            det["boxes"][:, 0::2] = det["boxes"][:, 0::2].clamp(0, w)
            det["boxes"][:, 1::2] = det["boxes"][:, 1::2].clamp(0, h)
        return detections


class StepTimer:
    """Seconds each watched model spends from its forward to the end of its optimizer step, summed over steps.

    A forward pre-hook on the model opens its step; torch's global optimizer-step post-hook closes it. Only the
    loop's `train_step` calls the models themselves (evaluation calls `predict`), so nothing else is counted.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: tuple[str, float] | None = None
        self._handle = register_optimizer_step_post_hook(self._close)

    def watch(self, name: str, model: nn.Module) -> None:
        self.seconds[name] = 0.0
        model.register_forward_pre_hook(lambda *_: self._start(name))

    def _start(self, name: str) -> None:
        self._open = (name, time.perf_counter())

    def _close(self, *_: Any) -> None:
        if self._open is not None:
            name, start = self._open
            self.seconds[name] += time.perf_counter() - start
            self._open = None

    def close(self) -> None:
        self._handle.remove()


class SideBySide(LocalContext):
    """The plain-process context of our run, which also trains torchvision's FCOS on every batch the loop draws
    (just before the loop's own step on it) and logs both losses at each of the loop's reports."""

    def __init__(self, cfg: Config, other: TorchvisionFCOS, timer: StepTimer, detections: Path) -> None:
        super().__init__(torch.device("cpu"))
        self.cfg, self.other, self.timer, self.detections = cfg, other.train(), timer, detections
        self.optimizer = build_optimizer(cfg, other)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.other_steps, self.window = 0, []
        self.log: dict[str, dict[str, Any]] = {name: {"seconds": 0.0, "loss_total": []}
                                               for name in ("ours", "torchvision")}
        self.final: dict[str, Any] = {}
        timer.watch("torchvision", other)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = super().prepare_model(model)
        for ours, theirs in ((model.backbone, self.other.model.backbone.body),
                             (model.pyramid, self.other.model.backbone.pyramid)):
            a, b = ours.state_dict(), theirs.state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), "backbones and pyramids must start equal"
        self.timer.watch("ours", model)
        return model

    def prepare_loader(self, loader: DataLoader) -> SharedBatches:
        return SharedBatches(loader, self)

    def step_other(self, batch: Batch) -> None:
        """One `train_step` of torchvision's model on `batch` (while the loop still has steps to take)."""
        if self.other_steps >= self.cfg.train.iterations:
            return
        outputs = train_step(self.other, batch.to(self.device), self.cfg, self, self.optimizer, self.scaler,
                             self.other_steps)
        self.scheduler.step()
        self.other_steps += 1
        self.window.append(float(sum(loss_terms(outputs).values()).detach()))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None:
        super().report(metrics, checkpoint_dir, iteration)
        losses = {"ours": metrics["loss_total"], "torchvision": sum(self.window) / len(self.window)}
        self.window = []
        for name, value in losses.items():
            self.log[name]["loss_total"].append(round(value, 4))
        print(f"it {iteration:4d} loss " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items()), flush=True)
        if iteration == self.cfg.train.iterations:
            self.final = metrics
            if checkpoint_dir is not None:
                shutil.copyfile(checkpoint_dir / RESULTS_FILE, self.detections)


class SharedBatches:
    """The loop's DataLoader, each batch first stepping torchvision's model (`SideBySide.step_other`)."""

    def __init__(self, loader: DataLoader, ctx: SideBySide) -> None:
        self.loader, self.ctx = loader, ctx

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            self.ctx.step_other(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


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
    args.out.mkdir(parents=True, exist_ok=True)
    paths = resolve_data_paths(cfg.data)
    torch.manual_seed(cfg.train.seed)  # what run_training does before building ours: the same trunk weights
    theirs = TorchvisionFCOS(cfg)
    timer = StepTimer()
    ctx = SideBySide(cfg, theirs, timer, args.out / f"detections_ours_{args.short_side}.json")
    try:
        run_training(cfg, paths, ctx)
    finally:
        timer.close()
    log = ctx.log
    for name, seconds in timer.seconds.items():
        log[name]["seconds"] = seconds
    val_set = build_val_dataset(cfg, paths)
    theirs_metrics = evaluate(theirs, val_set, cfg, LocalContext(torch.device("cpu")),
                              output_json=args.out / f"detections_torchvision_{args.short_side}.json")
    scores = {}
    for name, metrics in (("ours", ctx.final), ("torchvision", theirs_metrics)):
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
