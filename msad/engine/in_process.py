"""Training and evaluation in this one process, without Ray: `LocalContext` (the worker context of a single
process) and `evaluate_checkpoint` (COCO AP of a checkpoint file: teacher, student, standalone student or plain
FCOS).

Apart from `msad.engine.trainer`, which drives runs through Ray Train: the `eval` command and the benchmarks need
none of Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from msad.build import build_val_dataset, check_num_classes, model_from_checkpoint, resolve_data_paths
from msad.checkpoint import CHECKPOINT_FILE, checkpoint_config, load_checkpoint
from msad.config import Config, config_from_dict


class LocalContext:
    """WorkerContext of a single process (no Ray): used for `eval` and by benchmarks to run the plain loop."""

    def __init__(self, device: torch.device | None = None, run_dir: Path | None = None) -> None:
        self.rank, self.world_size = 0, 1
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.run_dir = run_dir
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: Any) -> Any:
        return loader

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, iteration: int) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.run_dir is not None:
            import shutil

            shutil.copytree(checkpoint_dir, self.run_dir / f"checkpoint_{iteration:07d}", dirs_exist_ok=True)

    def restore_candidates(self) -> Iterator[Path]:
        if self.run_dir is None:
            return iter(())
        return iter(sorted(self.run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), reverse=True))


def evaluate_checkpoint(cfg: Config, weights: str, output_dir: Path, branch: str = "fused") -> dict[str, float]:
    """COCO AP of a checkpoint on the val set of `cfg`'s data, in this process (GPU when there is one).

    The model is rebuilt from the checkpoint's own config (role, width, channels); `cfg` supplies the data.
    A student (or standalone student) is evaluated with no teacher in memory. Detections, bootstrap replicates and
    metrics (with intervals) are written into `output_dir`.
    """
    from msad.engine.loop import BOOTSTRAP_FILE, RESULTS_FILE, evaluate

    state = load_checkpoint(weights)
    model_cfg = checkpoint_config(state, weights)
    saved = model_cfg.to_dict()
    saved["train"]["bootstrap_samples"] = cfg.train.bootstrap_samples  # how to evaluate is the caller's choice
    run_cfg = config_from_dict({**saved, "data": cfg.to_dict()["data"]})
    paths = resolve_data_paths(run_cfg.data)
    val_set = build_val_dataset(run_cfg, paths)
    check_num_classes(run_cfg, val_set)
    model, _ = model_from_checkpoint(state, weights, cfg=run_cfg)  # every weight from the checkpoint, strictly
    ctx = LocalContext()
    model.to(ctx.device)
    output_dir.mkdir(parents=True, exist_ok=True)
    chosen = branch if branch in model.branches else None  # a model with one output ignores it
    metrics = evaluate(model, val_set, run_cfg, ctx, output_json=output_dir / RESULTS_FILE, branch=chosen,
                       bootstrap_json=output_dir / BOOTSTRAP_FILE)
    metrics = {**metrics, "role": state["role"], "width": state["width"], "iteration": state["iteration"],
               "branch": branch if state["role"] == "teacher" else "student"}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
