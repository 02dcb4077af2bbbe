"""Why did a teacher's C-FF weights end where they did: learned by its fc, or produced by its features moving?

Rebuilds the teacher's initial weights (same config and seed as its training run) next to the trained checkpoint and,
on the first `--images` val images, prints per level P3..P7: the pooled H and L feature norms, the mean fusion
weight on H, and the H - L logit for the four pairs (initial or trained fc) x (initial or trained features). If the
initial fc on the trained features gives about the trained logits, the fc did not learn them: the features moved
under a (nearly) fixed projection. BN runs in train mode by default, as during training (batch statistics).

Everything comes from the shipped teacher: features from `MSADTeacher.fuse_aligned_levels`, weights from
`CrossLevelFusion.level_weights` (for the crossed pairs, one teacher's fusion on the other's levels), the pooled
pairs are what that call feeds its fc (read by a forward hook), and a logit gap is log(a / b) of its weights.

    python benchmarks/fusion_diagnosis.py runs/fidelity/teacher/checkpoint_0000300/checkpoint.pt \
        [--fusion-init original] [--images 8] [--eval-mode]

Checkpoints written before `model.fusion_init` existed were trained with `xavier_uniform_` (then believed to be the
original's init; it is not): their saved config lacks the key and reads as today's default, `zero`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from msad.build import build_model, build_val_dataset, resolve_data_paths
from msad.checkpoint import checkpoint_config, load_checkpoint
from msad.data.transforms import collate
from msad.models.detector import HIGH_LEVELS
from msad.models.teacher import MSADTeacher


def aligned_levels(model: MSADTeacher, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """H's P3..P7 and L's P2..P6, as the teacher computes them (its own `fuse_aligned_levels`)."""
    with torch.no_grad():
        features = model.fuse_aligned_levels(images)
    return features.high, features.low


def fusion_on(fc_model: MSADTeacher, levels: tuple[list[Tensor], list[Tensor]]) -> tuple[Tensor, Tensor]:
    """`fc_model`'s C-FF (`CrossLevelFusion.level_weights`) on the aligned levels of any teacher: its weights
    [B, levels, 2] and what its fc read, [B, levels, 2C] (the pooled (h, l), captured by a hook on the fc)."""
    seen: list[Tensor] = []
    handle = fc_model.fusion.fc.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            weights = fc_model.fusion.level_weights(*levels)
    finally:
        handle.remove()
    return weights, seen[0]


def logit_gap(weights: Tensor) -> Tensor:
    """Mean over images of the H - L logit per level: log(a / b) of the softmax weights, i.e. the fc's logit
    difference (exact up to float rounding; -inf only when a weight underflows, a gap beyond ~87)."""
    return (weights[..., 0].log() - weights[..., 1].log()).mean(0)


def row(label: str, values: Tensor, digits: int = 2) -> str:
    return f"{label:42s}" + "".join(f"{v:>9.{digits}f}" for v in values.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a teacher training checkpoint (checkpoint.pt)")
    parser.add_argument("--fusion-init", choices=("zero", "original"), help="override the saved model.fusion_init")
    parser.add_argument("--images", type=int, default=8, help="val images to average over")
    parser.add_argument("--eval-mode", action="store_true", help="BN with running statistics instead of batch ones")
    args = parser.parse_args()
    state = load_checkpoint(args.checkpoint)
    cfg = checkpoint_config(state, args.checkpoint)
    if cfg.train.role != "teacher" or not cfg.model.fusion:
        raise SystemExit(f"error: {args.checkpoint}: not a teacher with fusion (role {cfg.train.role})")
    if args.fusion_init:
        cfg.model.fusion_init = args.fusion_init
    torch.manual_seed(cfg.train.seed)  # what run_training does before building the model
    initial = build_model(cfg)
    trained = build_model(cfg)
    trained.load_state_dict(state["model"])
    for model in (initial, trained):
        model.train(not args.eval_mode)
    val_set = build_val_dataset(cfg, resolve_data_paths(cfg.data))
    images = collate([val_set[i] for i in range(min(args.images, len(val_set)))], cfg.data.size_divisibility).images
    levels = {name: aligned_levels(m, images) for name, m in (("initial", initial), ("trained", trained))}
    fcs = {"initial": initial, "trained": trained}
    fused = {(fc, feat): fusion_on(fcs[fc], levels[feat]) for fc in fcs for feat in levels}
    pooled = {feat: fused["trained", feat][1] for feat in levels}  # the pooling has no weights: any fc reads the same
    channels = pooled["initial"].shape[-1] // 2
    print(f"{args.checkpoint} (iteration {state['iteration']}, fusion_init {cfg.model.fusion_init}, "
          f"BN {'eval' if args.eval_mode else 'train'} mode, {images.shape[0]} images)")
    print(f"{'':42s}" + "".join(f"{lvl:>9s}" for lvl in HIGH_LEVELS))
    for name, p in pooled.items():
        print(row(f"|pooled h|, {name} features", p[..., :channels].norm(dim=-1).mean(0)))
        print(row(f"|pooled l|, {name} features", p[..., channels:].norm(dim=-1).mean(0)))
    for fc_name in fcs:
        for feat_name in levels:
            print(row(f"H-L logit, {fc_name} fc, {feat_name} features", logit_gap(fused[fc_name, feat_name][0])))
    print(row("mean weight on H (trained teacher)", fused["trained", "trained"][0][..., 0].mean(0), digits=4))
    norms = [[round(p.norm().item(), 3) for p in m.fusion.parameters()] for m in (initial, trained)]
    print(f"fc weight norms (layer 1, layer 2): initial {norms[0]}, trained {norms[1]}")


if __name__ == "__main__":
    main()
