"""Config or checkpoint -> the objects a run needs: datasets, model, optimizer, learning-rate schedule.

The one place where config keys meet constructors, so the loop and the CLI never parse config fields themselves,
and the one reader of every checkpoint kind (`msad.checkpoint`): training, standalone and sliced files become
models here, always strictly filled (`msad.models.state.load_state_strictly`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from msad.checkpoint import ROLES, SLICED_KIND, checkpoint_config, load_checkpoint
from msad.config import Config, DataConfig, ModelConfig
from msad.data.coco import CocoDetection
from msad.data.coco_cache import default_cache_dir
from msad.data.paths import DataPaths
from msad.data.shapes import ShapesSpec, ensure_shapes_dataset
from msad.data.transforms import eval_transform, train_transform
from msad.errors import UserError
from msad.models.detector import FCOSDetector
from msad.models.distiller import Distiller
from msad.models.slimmable import SlicedResNet50, load_slimmable_imagenet, load_torchvision_resnet50
from msad.models.state import load_state_strictly
from msad.models.student import KDWarmup, MSADStudent, init_student_from_teacher
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
        init_student_from_teacher(model, teacher)  # a training teacher or a sliced one
    return distiller


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint -> model
# ---------------------------------------------------------------------------------------------------------------------


def model_from_checkpoint(state: dict, path: str | Path, roles: tuple[str, ...] = ROLES,
                          cfg: Config | None = None) -> tuple[Trainable, Config]:
    """The eval-mode model of a loaded checkpoint dict (`msad.checkpoint.load_checkpoint`), strictly filled, and
    the config it was built from.

    Args:
        state: the checkpoint's dict (any kind; a sliced one gives the single-width model of its config).
        path: where it was read from, for messages.
        roles: the roles accepted here.
        cfg: build with this config instead of the checkpoint's own (evaluation's: the checkpoint's model and
            training settings with the caller's data); its `train.role` must be the checkpoint's.
    """
    cfg = cfg if cfg is not None else checkpoint_config(state, path)
    role = state["role"]
    if role not in roles:
        raise UserError(f"{path}: role {role!r} cannot be used here; allowed: {', '.join(roles)}")
    if role != cfg.train.role:
        raise UserError(f"{path}: role {role!r} differs from its config's train.role {cfg.train.role!r}")
    model = build_model(cfg, load_pretrained=False)  # every weight comes from the checkpoint
    if not isinstance(state["model"], dict):
        raise UserError(f"{path}: field 'model' is a {type(state['model']).__name__}, expected a state dict")
    load_state_strictly(model, state["model"], str(path))
    return model.eval(), cfg


def sliced_teacher_from_checkpoint(state: dict, path: str | Path) -> MSADTeacher:
    """The frozen teacher of a loaded sliced-teacher file: its backbone holds one width and names the widths it
    was cut from (`SlicedResNet50`), so a student built for the training widths accepts it."""
    if state.get("kind") != SLICED_KIND or state.get("role") != "teacher":
        raise UserError(f"{path}: not a sliced teacher (kind {state.get('kind')!r}, role {state.get('role')!r}); "
                        "write one with msad.deploy.export_sliced_teacher(CHECKPOINT)")
    cfg = checkpoint_config(state, path)
    source = state.get("source_width_list")
    if not isinstance(source, list) or not source:
        raise UserError(f"{path}: field 'source_width_list' is {source!r}, expected the training widths")
    teacher = build_teacher(cfg)
    teacher.backbone = SlicedResNet50(cfg.model.width, source)
    load_state_strictly(teacher, state["model"], str(path))
    teacher.requires_grad_(False)
    return teacher.eval()


def load_frozen_teacher(cfg: Config, device: torch.device) -> MSADTeacher:
    """The trained teacher for a student run: eval mode, no gradients, on `device`. Reads a training checkpoint or
    a sliced, weights-only teacher (`msad.deploy.export_sliced_teacher`)."""
    path = cfg.train.teacher_checkpoint or ""
    state = load_checkpoint(path)
    if state.get("kind") == SLICED_KIND:
        return sliced_teacher_from_checkpoint(state, path).to(device)
    teacher, _ = model_from_checkpoint(state, path, roles=("teacher",))
    teacher.requires_grad_(False)
    return teacher.to(device)


def check_teacher_for_student(cfg: Config) -> Config:
    """Fail before any worker starts if a student's teacher file is missing, not a teacher, or of another shape.

    Returns the teacher's own config (needed to rebuild it).
    """
    path = cfg.train.teacher_checkpoint or ""
    if not path:
        raise UserError("train.teacher_checkpoint: a student needs its trained teacher's checkpoint (got null)")
    state = load_checkpoint(path)
    teacher_cfg = checkpoint_config(state, path)
    if state["role"] != "teacher":
        raise UserError(f"{path}: train.teacher_checkpoint must be a teacher checkpoint, this one is a "
                        f"{state['role']!r} checkpoint")
    if teacher_cfg.model.width != cfg.model.width:
        raise UserError(f"{path}: teacher width {teacher_cfg.model.width} differs from model.width "
                        f"{cfg.model.width}; MSAD distils between equal widths (no projector)")
    for key in ("width_list", "fpn_channels", "head_convs", "gn_groups", "num_classes"):
        # a sliced teacher holds one width; the widths it was cut from are what the student must share
        theirs = state.get("source_width_list", teacher_cfg.model.width_list) if key == "width_list" else getattr(
            teacher_cfg.model, key)
        if theirs != getattr(cfg.model, key):
            raise UserError(f"{path}: teacher model.{key}={theirs} differs from the student's "
                            f"model.{key}={getattr(cfg.model, key)}")
    return teacher_cfg


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
