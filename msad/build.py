"""Config -> the objects a run needs: datasets, model, optimizer, learning-rate schedule.

The one place where config keys meet constructors, so the loop and the CLI never parse config fields themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from msad.config import Config, DataConfig, ModelConfig
from msad.data.coco import CocoDetection
from msad.data.coco_cache import default_cache_dir
from msad.data.paths import DataPaths
from msad.data.shapes import ShapesSpec, ensure_shapes_dataset
from msad.data.transforms import eval_transform, train_transform
from msad.engine.checkpoint import checkpoint_config, load_checkpoint
from msad.errors import UserError
from msad.models.detector import FCOSDetector
from msad.models.distiller import Distiller
from msad.models.slimmable import load_slimmable_imagenet, load_torchvision_resnet50
from msad.models.student import KDWarmup, MSADStudent
from msad.models.teacher import MSADTeacher
from msad.models.trainable import Trainable


def resolve_data_paths(data: DataConfig) -> DataPaths:
    """COCO paths as given, or the built-in dataset's (generated on first use)."""
    if data.dataset == "coco":
        paths = DataPaths(*(Path(getattr(data, k)).expanduser() for k in
                            ("train_images", "train_annotations", "val_images", "val_annotations")))
        for key in ("train_images", "val_images"):
            if not getattr(paths, key).is_dir():
                raise UserError(f"data.{key}: folder {getattr(paths, key)} not found")
        for key in ("train_annotations", "val_annotations"):
            if not getattr(paths, key).is_file():
                raise UserError(f"data.{key}: file {getattr(paths, key)} not found")
        return paths
    s = data.shapes
    spec = ShapesSpec(num_train=s.num_train, num_val=s.num_val, image_size=tuple(s.image_size),
                      objects_per_image=tuple(s.objects_per_image), object_size=tuple(s.object_size), seed=s.seed)
    return ensure_shapes_dataset(Path(s.cache_dir).expanduser(), spec)


def annotation_cache_dir(data: DataConfig) -> Path:
    """Where the annotation caches go (`msad.data.coco_cache`): beside the built-in dataset, in its cache folder;
    for COCO files, $MSAD_CACHE/coco_index (node-local: the first worker of a node builds, the others map it)."""
    if data.dataset == "shapes":
        return Path(data.shapes.cache_dir).expanduser() / "coco_index"
    return default_cache_dir()


def build_train_dataset(cfg: Config, paths: DataPaths) -> CocoDetection:
    d = cfg.data
    return CocoDetection(paths.train_images, paths.train_annotations,
                         train_transform(d.train_short_sides, d.max_size, d.hflip_prob, d.input_format),
                         drop_images_without_boxes=d.drop_train_images_without_boxes, cache_dir=annotation_cache_dir(d))


def build_val_dataset(cfg: Config, paths: DataPaths) -> CocoDetection:
    d = cfg.data
    return CocoDetection(paths.val_images, paths.val_annotations,
                         eval_transform(d.test_short_side, d.max_size, d.input_format),
                         cache_dir=annotation_cache_dir(d))


def check_num_classes(cfg: Config, dataset: CocoDetection) -> None:
    """The head's class count must match the data's: a silent mismatch trains garbage."""
    if cfg.model.num_classes != dataset.num_classes:
        raise UserError(f"model.num_classes: invalid value {cfg.model.num_classes}; allowed: "
                        f"{dataset.num_classes} (the categories in {dataset.annotation_file})")


def _detector_kwargs(cfg: Config) -> dict:
    model = cfg.model
    return dict(width=model.width, width_list=model.width_list, fpn_channels=model.fpn_channels,
                num_classes=model.num_classes, head_convs=model.head_convs, gn_groups=model.gn_groups,
                giou_plus_one=cfg.train.giou_plus_one)


def build_model(cfg: Config, load_pretrained: bool = True) -> Trainable:
    """The model of the run's role, at its width, with ImageNet weights loaded when a path is given.

    Args:
        cfg: the run's config.
        load_pretrained: read `model.pretrained` (training from scratch). False when the weights come from a
            checkpoint anyway (eval, convert), so those need no ImageNet file on the machine they run on.
    """
    role = cfg.train.role
    if role == "fcos":
        model: Trainable = FCOSDetector(**_detector_kwargs(cfg))
    elif role == "teacher":
        model = build_teacher(cfg)
    else:
        model = MSADStudent(**_detector_kwargs(cfg), low_res_mode=cfg.data.low_res_mode,
                            temperature=cfg.train.kd_temperature, kd_loss=cfg.train.kd_loss)
    # a student starts from its teacher (or, ablation, random), never from ImageNet weights
    if load_pretrained and cfg.model.pretrained and role != "student":
        load_backbone_weights(model.backbone, cfg.model)
    return model


def build_trainable(cfg: Config, device: torch.device) -> Trainable:
    """What the training loop trains for the run's role: the model itself, or for a student a `Distiller` holding
    the student (initialised from its teacher unless `train.init_from_teacher` is off) and the frozen teacher on
    `device`. A restored checkpoint's weights are loaded over it by the loop."""
    model = build_model(cfg)
    if not isinstance(model, MSADStudent):
        return model
    t = cfg.train
    teacher = load_frozen_teacher(cfg, device)
    distiller = Distiller(model, teacher, KDWarmup(t.kd_alpha, t.kd_warmup_iters), t.teacher_batch_stats)
    if t.init_from_teacher:
        from msad.deploy.teacher import init_student_from_teacher

        init_student_from_teacher(model, teacher)  # a training teacher or a sliced one
    return distiller


def load_frozen_teacher(cfg: Config, device: torch.device) -> MSADTeacher:
    """The trained teacher for a student run: eval mode, no gradients, on `device`. Reads a training checkpoint or
    a sliced, weights-only teacher (`msad.deploy.export_sliced_teacher`)."""
    path = cfg.train.teacher_checkpoint or ""
    state = load_checkpoint(path)
    if state.get("kind") == "sliced":
        from msad.deploy.teacher import teacher_from_sliced_state

        return teacher_from_sliced_state(state, path).to(device)
    teacher = build_teacher(checkpoint_config(state, path))
    teacher.load_state_dict(state["model"])
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def build_teacher(cfg: Config) -> MSADTeacher:
    """The teacher as configured by `cfg` (also used to rebuild a trained teacher from its saved config)."""
    m = cfg.model
    return MSADTeacher(**_detector_kwargs(cfg), fusion=m.fusion, fusion_hidden=m.fusion_hidden,
                       fusion_init=m.fusion_init, joint_weight=cfg.train.fusion_joint_weight,
                       low_res_mode=cfg.data.low_res_mode)


def load_backbone_weights(backbone: nn.Module, model: ModelConfig) -> None:
    path = Path(model.pretrained).expanduser()
    if not path.is_file():
        raise UserError(f"model.pretrained: file {path} not found")
    if model.pretrained_format == "slimmable":
        load_slimmable_imagenet(backbone, path)
    else:
        load_torchvision_resnet50(backbone, path)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """SGD over trainable parameters; norm parameters get no weight decay (as Detectron2's WEIGHT_DECAY_NORM=0)."""
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm))
            (no_decay if is_norm else decay).append(param)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=t.base_lr, momentum=t.momentum)


def lr_factor(cfg: Config, iteration: int) -> float:
    """Linear warm-up from warmup_factor to 1, then x lr_gamma at each step: the paper's schedule."""
    t = cfg.train
    decay = t.lr_gamma ** sum(1 for step in t.lr_steps if iteration >= step)
    if iteration >= t.warmup_iters:
        return decay
    alpha = iteration / t.warmup_iters
    return decay * (t.warmup_factor * (1 - alpha) + alpha)


def build_lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration; its state (last_epoch) is saved in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
