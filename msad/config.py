"""The one typed config: dataclass sections, YAML files with `_base_` inheritance, `a.b=value` overrides, validation.

Data flows one way: YAML + overrides -> plain dict -> `Config` (types checked, ranges checked) -> the rest of msad.
Every user mistake becomes a one-line `UserError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from msad.errors import UserError

WIDTHS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
# Keys that are no longer settings, with the only value they ever could have: older configs and checkpoints that
# hold them still load; any other value is refused. L is half of H: L's P(k) aligns with H's P(k+1) only then.
RETIRED_KEYS: dict[tuple[str, str], Any] = {("data", "low_res_scale"): 0.5}
BASE_KEY = "_base_"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars where YAML 1.1 surprises: `1e-3` is a float (1.1 wants `1.0e-3`), and only
    true/false are booleans, so `amp: off` is the string "off" (1.1 also reads on/off/yes/no/y/n as booleans)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)
_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {  # the class's own copy (made by the call above), without 1.1's booleans
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in _YamlLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def path_field(default: str | None = None) -> Any:
    """A file or folder location. Made absolute when loaded (relative to the YAML file that writes it, or to the
    working directory for command-line overrides and defaults), because Ray runs trials and workers in other working
    directories. Object-store URIs (s3://...) pass unchanged."""
    return field(default=default, metadata={"path": True})


@dataclass
class ModelConfig:
    width: float = 0.25  # active slimmable width; must be one of width_list
    width_list: list[float] = field(default_factory=lambda: list(WIDTHS))  # widths the backbone weights hold
    fpn_channels: int = 256  # FPN and head channels (256 in the paper; 64 is plenty for CPU runs)
    head_convs: int = 4  # convs per FCOS tower
    gn_groups: int = 32  # GroupNorm groups in the head towers
    num_classes: int = 80  # foreground classes (the built-in dataset overrides this with its own count)
    # slimmable_networks ImageNet file (s_resnet50_0.25_0.5_0.75_1.0.pt), user-supplied; null = random init
    pretrained: str | None = path_field()
    pretrained_format: Literal["slimmable", "torchvision"] = "slimmable"  # torchvision ResNet-50 needs width 1.0
    # train from random weights on purpose: COCO runs without model.pretrained are refused otherwise (a forgotten
    # path would silently train a detector that reaches a fraction of the paper's AP)
    random_init: bool = False
    fusion: bool = True  # teacher C-FF on; false = ablation "teacher on H only"
    fusion_hidden: int = 32  # C-FF MLP hidden size
    # C-FF's last layer at start: "zero" = equal weights until the loss moves them (why: benchmarks/RESULTS.md, the
    # fusion diagnosis); "original" = Detectron2's c2_xavier_fill (kaiming_uniform_, a=1) as the original
    fusion_init: Literal["zero", "original"] = "zero"


@dataclass
class ShapesDataConfig:
    num_train: int = 512  # synthetic training images
    num_val: int = 64  # synthetic validation images
    image_size: list[int] = field(default_factory=lambda: [256, 384])  # (min, max) side; each image draws h and w
    objects_per_image: list[int] = field(default_factory=lambda: [4, 16])  # (min, max) objects per image
    object_size: list[int] = field(default_factory=lambda: [6, 60])  # (min, max) object side, log-uniform
    seed: int = 0  # generation seed: same seed, same files
    cache_dir: str = path_field("~/.cache/msad")  # where the dataset is written on first use


@dataclass
class DataConfig:
    dataset: Literal["shapes", "coco"] = "shapes"  # built-in synthetic set, or COCO-format files
    train_images: str | None = path_field()  # COCO image folder (dataset: coco)
    train_annotations: str | None = path_field()  # COCO instances JSON (dataset: coco)
    val_images: str | None = path_field()
    val_annotations: str | None = path_field()
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)
    train_short_sides: list[int] = field(default_factory=lambda: [256])  # H short side drawn per image
    test_short_side: int = 256  # H short side at evaluation
    max_size: int = 1333  # cap on the H long side
    low_res_mode: Literal["nearest", "antialias"] = "nearest"  # nearest = the original; antialias ~ a real camera
    # pad images to a multiple of this: 256 as in the paper; teachers and students need a multiple of 64 (then L = H/2
    # has C5 at stride 32 and H's P3-P7 match L's P2-P6 in size), a plain FCOS 32. More is only padding to compute
    size_divisibility: int = 256
    hflip_prob: float = 0.5
    # the model's input space: "rgb_imagenet" = RGB in 0-1 with ImageNet mean/std (what the ImageNet weights were
    # trained on); "bgr_255" = BGR in 0-255 minus Detectron2's mean, std 1, as the original feeds its models
    input_format: Literal["rgb_imagenet", "bgr_255"] = "rgb_imagenet"
    # training images with no box to learn: kept as background examples; true = dropped, as the original
    # (Detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS); evaluation always keeps every image
    drop_train_images_without_boxes: bool = False
    num_workers: int = 2  # DataLoader processes per training worker


@dataclass
class TrainConfig:
    role: Literal["teacher", "student", "fcos"] = "teacher"  # fcos = plain single-resolution baseline
    iterations: int = 300
    batch_per_worker: int = 8
    base_lr: float = 0.01  # for the total batch (batch_per_worker x workers)
    momentum: float = 0.9
    warmup_iters: int = 100  # linear lr warm-up
    warmup_factor: float = 0.001  # lr multiplier at iteration 0
    lr_steps: list[int] = field(default_factory=lambda: [200, 260])  # iterations where lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    weight_decay: float = 0.0001
    grad_clip: float = 0.0  # max total grad norm; 0 = off
    # mixed precision: auto = bf16 where the worker's device runs it natively (a CPU with AVX-512 BF16 or AMX, a GPU
    # of compute capability 8.0+; 0.74x the fp32 step there), fp32 elsewhere (emulated bf16 is ~13x slower on an AVX2
    # CPU); off = fp32; bf16 forces it (warned where emulated); fp16 on GPUs only. benchmarks/RESULTS.md
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # torch.compile of backbone, pyramid, head and C-FF (kernels cached in $MSAD_CACHE/torchinductor for every trial
    # on the node): auto = only runs long enough to repay compiling (msad/engine/compilation.py); on; off
    compile: Literal["auto", "on", "off"] = "auto"
    # BatchNorm statistics across all GPUs (SyncBN) when training on several; false = each GPU's own batch (the
    # original's teachers at widths 0.5 and 0.75). CPU runs (gloo) always keep per-worker BN.
    sync_bn: bool = True
    checkpoint_period: int = 100  # iterations between checkpoints
    eval_period: int = 0  # iterations between evaluations; 0 = only at the end
    # resamples of the validation images for 95 % intervals of AP, AP50, APs at the run's final evaluation (paired
    # across models in the report; earlier evaluations are point estimates); 0 = off. 500 cost 0.3 s on 128 images
    # and 17 s on 5,000, on top of pycocotools' own 52 s (benchmarks/RESULTS.md)
    bootstrap_samples: int = 500
    # also report val_loss at every evaluation: the detection loss terms (no distillation term, so comparable across
    # KD weights) on the validation images; a smoother signal than AP for ASHA (scheduler.metric: val_loss, mode
    # min) at the cost of one more forward pass per validation image
    eval_loss: bool = False
    keep_checkpoints: int = 2  # last-K checkpoints kept, besides the best by AP
    log_period: int = 10  # iterations between metric reports
    seed: int = 0
    fusion_joint_weight: float = 0.4  # teacher loss = L_H + L_L + w * L_fused
    kd_alpha: float = 0.2  # distillation weight; 0 = KD off
    kd_temperature: float = 3.0
    kd_warmup_iters: int = 500  # linear ramp of the KD weight
    kd_loss: Literal["l1", "mse"] = "l1"
    # box loss: exact GIoU (torchvision); true = the original's, with IoU smoothed as (I + 1) / (U + 1) in stride
    # units, which weakens the loss of small boxes
    giou_plus_one: bool = False
    teacher_checkpoint: str | None = path_field()  # student only: the trained teacher (filled in by sweeps)
    init_from_teacher: bool = True  # student starts from the teacher's backbone and head
    # the frozen teacher's BN while distilling: false = its running statistics (eval mode, deterministic per image);
    # true = each batch's statistics, as the original leaves its teacher in train mode
    teacher_batch_stats: bool = False


@dataclass
class DistributedConfig:
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False  # one GPU per worker, nccl; otherwise CPU + gloo
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only read when use_gpu
    storage_path: str = path_field("./runs")  # run directories (local path, NFS, or s3://bucket/prefix)
    run_name: str = "msad"  # run directory name; re-running the same name resumes it
    max_failures: int = 1  # worker-group restarts from the last checkpoint
    # how long a run's workers may wait for their resources (a busy cluster, a node the autoscaler adds, a lost
    # node's replacement) before the run fails in one line naming what it asked; each start of the workers waits
    worker_start_timeout_s: float = 600.0
    # how long an object-store operation (checkpoint upload, a run's files, a teacher download) is retried while
    # the store fails (an outage), before the run fails in one line naming the file
    storage_retry_s: float = 300.0


@dataclass
class TrackingConfig:
    project: str = "msad"  # W&B project
    entity: str | None = None  # W&B entity (team or user)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto = online only when a W&B key is set
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Paths: absolute from the moment they are loaded
# ---------------------------------------------------------------------------------------------------------------------


def _path_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        if f.metadata.get("path"):
            keys.append(full)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_path_keys(hints[f.name], full + "."))
    return keys


PATH_KEYS: tuple[str, ...] = tuple(_path_keys(Config))  # dotted keys of every file/folder location in a config


def absolute_location(value: Any, base_dir: Path) -> Any:
    """`value` made absolute against `base_dir` (after `~`); URIs, null and non-strings are returned unchanged.

    Normalised without following symbolic links, so a path a user wrote through a link (/data/coco) stays as written.
    """
    if not isinstance(value, str) or not value or "://" in value:
        return value
    return os.path.normpath(Path(base_dir, Path(value).expanduser()))


def resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of a nested config dict with every path key present made absolute against `base_dir`."""
    resolved = dict(data)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node: Any = resolved
        for part in parents:
            if not isinstance(node.get(part), dict):
                break
            node[part] = dict(node[part])  # copy on the way down: the caller's dict stays as it was
            node = node[part]
        else:
            if leaf in node:
                node[leaf] = absolute_location(node[leaf], base_dir)
    return resolved


def resolve_dotted_paths(values: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Like `resolve_paths` for flat `section.key: value` mappings (sweep grids, variants, samples)."""
    return {k: absolute_location(v, base_dir) if k in PATH_KEYS else v for k, v in values.items()}


def absolute_config(cfg: Config, base_dir: Path | None = None) -> Config:
    """`cfg` with any location still relative (a default such as ./runs) made absolute against the working
    directory of the process that loads it: the launching shell's, never a Ray worker's."""
    data = resolve_paths(cfg.to_dict(), base_dir or Path.cwd())
    return config_from_dict(data)


# ---------------------------------------------------------------------------------------------------------------------
# YAML loading: `_base_` chains and overrides
# ---------------------------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping; missing files and syntax errors become one-line UserErrors (with the line number)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: invalid YAML at {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into a copy of `base`; nested mappings merge, everything else (lists too) replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_with_bases(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML file, resolving `_base_` (a path or list of paths, relative to the file) recursively.

    Locations written in a file (PATH_KEYS) are made absolute relative to that file's folder, so a config works from
    any working directory and inside Ray's trial and worker directories.
    """
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise UserError(f"{path}: _base_ cycle ({chain})")
    data = resolve_paths(read_yaml(path), path.parent)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_with_bases(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.kd_alpha=0.5", "model.width_list=[0.25,1.0]"] into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r}: expected section.key=value, e.g. train.kd_alpha=0.5")
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: value {raw!r} is not valid YAML") from None
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part} is set both as a value and as a section")
            node = child
        node[leaf] = value
    return nested


# ---------------------------------------------------------------------------------------------------------------------
# dict -> typed dataclasses
# ---------------------------------------------------------------------------------------------------------------------


def _describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"a list of {_describe_type(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    names = {float: "a number", int: "an integer", bool: "true/false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else is converted silently."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:  # `X | None`: X's own, more precise message (unknown nested key, ...)
            return _coerce(value, real[0], key, root)
        for option in real:
            try:
                return _coerce(value, option, key, root)
            except UserError:
                continue
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = get_args(tp)
            return {str(k) if key_type is str else k: _coerce(v, value_type, f"{key}.{k}", root)
                    for k, v in value.items()}
    elif origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
    elif origin is list:
        if isinstance(value, list):
            (inner,) = get_args(tp)
            return [_coerce(v, inner, f"{key}[{i}]", root) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build_typed(tp, value, key, root)
    raise UserError(f"{key}: invalid value {value!r}; expected {_describe_type(tp)}")


def build_typed(cls: type, values: dict[str, Any], prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and type (one-line UserError otherwise).

    Args:
        cls: the dataclass to build.
        values: its fields as read from YAML.
        prefix: dotted path of `values` inside the whole document, for messages.
        root: the document's top dataclass, searched for a key given in the wrong section (default `cls`).
    """
    root = root or cls
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise UserError(f"unknown key {full}{_suggest(str(key), names, prefix, root)}")
        kwargs[key] = _coerce(value, hints[key], full, root)
    return cls(**kwargs)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        keys.append(full)
        tp = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, full))
    return keys


def _suggest(key: str, names: list[str], prefix: str, root: type) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"
    # a key put in the wrong section: look for it anywhere in the tree
    elsewhere = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f" (did you mean {elsewhere[0]}?)"
    return f"; valid keys here: {', '.join(names)}"


# s3://key:secret@bucket/... (pyarrow reads credentials there) or a key, secret or token in the ?query
CREDENTIALS_IN_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#]*@|[?&](access_key|secret_key|session_token)=",
                                re.IGNORECASE)


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise UserError(f"{key}: invalid value {value!r}; allowed: {allowed}")


def validate(cfg: Config) -> Config:
    """Range and cross-field checks that types alone cannot express."""
    m, d, t, dist = cfg.model, cfg.data, cfg.train, cfg.distributed
    _check(bool(m.width_list) and all(w in WIDTHS for w in m.width_list), "model.width_list", m.width_list,
           f"a non-empty list drawn from {list(WIDTHS)}")
    _check(m.width in m.width_list, "model.width", m.width, f"one of model.width_list {m.width_list}")
    for key in ("fpn_channels", "head_convs", "gn_groups", "num_classes", "fusion_hidden"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "an integer >= 1")
    if m.pretrained_format == "torchvision" and m.pretrained is not None:
        _check(m.width_list == [1.0], "model.width_list", m.width_list, "[1.0] with torchvision ResNet-50 weights")

    _check(bool(d.train_short_sides) and all(s >= 32 for s in d.train_short_sides), "data.train_short_sides",
           d.train_short_sides, "a non-empty list of sizes >= 32")
    _check(d.test_short_side >= 32, "data.test_short_side", d.test_short_side, "a size >= 32")
    _check(d.max_size >= max(d.train_short_sides + [d.test_short_side]), "data.max_size", d.max_size,
           "a size >= every short side")
    # a teacher and its students pair H's P3..P7 with L's (= H / 2) P2..P6: with H a multiple of 64, L's C5 (stride
    # 32) and H's levels have equal sizes (ceil arithmetic beyond); a plain FCOS reads one image and only needs C5's 32
    multiple = 32 if t.role == "fcos" else 64
    _check(d.size_divisibility >= 1 and d.size_divisibility % multiple == 0, "data.size_divisibility",
           d.size_divisibility, f"a positive multiple of {multiple}" + (
               "" if t.role == "fcos" else " (L is half of H, and L's C5 has stride 32)"))
    _check(0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob", d.hflip_prob, "a probability in [0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    if d.dataset == "coco":
        for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
            _check(getattr(d, key) is not None, f"data.{key}", None, "a path when data.dataset is coco")
    s = d.shapes
    _check(s.num_train >= 1, "data.shapes.num_train", s.num_train, "an integer >= 1")
    _check(s.num_val >= 1, "data.shapes.num_val", s.num_val, "an integer >= 1")
    for key, low in (("image_size", 64), ("objects_per_image", 1), ("object_size", 4)):
        pair = getattr(s, key)
        _check(len(pair) == 2 and low <= pair[0] <= pair[1], f"data.shapes.{key}", pair,
               f"[min, max] with {low} <= min <= max")
    _check(s.object_size[1] <= s.image_size[0], "data.shapes.object_size", s.object_size,
           f"a range whose max fits the smallest image side ({s.image_size[0]})")

    for key in ("iterations", "batch_per_worker", "checkpoint_period", "log_period", "keep_checkpoints"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "an integer >= 1")
    for key in ("warmup_iters", "eval_period", "kd_warmup_iters", "bootstrap_samples"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "an integer >= 0")
    _check(t.base_lr > 0, "train.base_lr", t.base_lr, "a number > 0")
    for key in ("momentum", "weight_decay", "grad_clip", "fusion_joint_weight", "kd_alpha"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "a number >= 0")
    _check(0 < t.warmup_factor <= 1, "train.warmup_factor", t.warmup_factor, "a number in (0, 1]")
    _check(0 < t.lr_gamma <= 1, "train.lr_gamma", t.lr_gamma, "a number in (0, 1]")
    _check(t.lr_steps == sorted(t.lr_steps) and all(0 < s < t.iterations for s in t.lr_steps), "train.lr_steps",
           t.lr_steps, f"increasing iterations between 1 and train.iterations-1 ({t.iterations - 1})")
    _check(t.kd_temperature > 0, "train.kd_temperature", t.kd_temperature, "a number > 0")
    if t.amp == "fp16":
        _check(dist.use_gpu, "train.amp", t.amp, "'auto', 'off' or 'bf16' unless distributed.use_gpu is true")

    _check(dist.num_workers >= 1, "distributed.num_workers", dist.num_workers, "an integer >= 1")
    _check(dist.cpus_per_worker > 0, "distributed.cpus_per_worker", dist.cpus_per_worker, "a number > 0")
    _check(dist.gpus_per_worker > 0, "distributed.gpus_per_worker", dist.gpus_per_worker, "a number > 0")
    _check(dist.max_failures >= -1, "distributed.max_failures", dist.max_failures, "an integer >= -1 (-1 = forever)")
    _check(dist.worker_start_timeout_s >= 3, "distributed.worker_start_timeout_s", dist.worker_start_timeout_s,
           "a number of seconds >= 3")
    _check(dist.storage_retry_s >= 0, "distributed.storage_retry_s", dist.storage_retry_s,
           "a number of seconds >= 0 (0 = fail at the first error)")
    _check(bool(dist.run_name) and "/" not in dist.run_name, "distributed.run_name", dist.run_name,
           "a non-empty name without '/'")
    if CREDENTIALS_IN_URI.search(dist.storage_path):  # named, never echoed: the value holds a secret
        raise UserError("distributed.storage_path: the URI holds credentials (user:secret@ or a key in its ?query), "
                        "and the path is printed and saved with every run; give them to the store's client instead "
                        "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an instance role)")
    return cfg


def check_initialisation(cfg: Config) -> None:
    """Refuse a COCO training that would start from random weights without saying so. A student initialised from
    its teacher (train.init_from_teacher) needs no ImageNet file; eval and convert never read one."""
    from_teacher = cfg.train.role == "student" and cfg.train.init_from_teacher
    if cfg.data.dataset == "coco" and cfg.model.pretrained is None and not cfg.model.random_init and not from_teacher:
        raise UserError("model.pretrained: a COCO run needs the ImageNet backbone weights (e.g. "
                        "model.pretrained=/weights/s_resnet50_0.25_0.5_0.75_1.0.pt); set model.random_init=true to "
                        "train from random weights on purpose")


def check_ready_to_train(cfg: Config) -> None:
    """Checks that only matter once training starts (a sweep may fill these in later)."""
    t = cfg.train
    if t.role == "student" and not t.teacher_checkpoint:
        raise UserError("train.teacher_checkpoint: a student needs its trained teacher's checkpoint (got null)")
    check_initialisation(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain (merged) dict."""
    if not isinstance(data, dict):
        raise UserError(f"config: expected a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    for (section, key), only in RETIRED_KEYS.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            if data[section][key] != only:
                raise UserError(f"{section}.{key}: invalid value {data[section][key]!r}; it is no longer a setting "
                                f"(always {only}: L is half of H, so that L's P(k) aligns with H's P(k+1))")
            data[section] = {k: v for k, v in data[section].items() if k != key}
    return validate(build_typed(Config, data))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (with its `_base_` chain), apply `a.b=value` overrides, and validate.

    Every location comes out absolute: relative to the file that writes it, or to the working directory for
    overrides and defaults.
    """
    data = load_yaml_with_bases(path) if path is not None else {}
    data = deep_merge(data, resolve_paths(parse_overrides(overrides or []), Path.cwd()))
    return absolute_config(config_from_dict(data))
