"""Sweep YAML -> a fixed, ordered list of trials (teachers, baselines, students), each with its complete config.

Grids are expanded and samples drawn here, once, from the spec's seed: the list of trials is a pure function of
the file, so a resumed sweep sees exactly the same trials. Each trial carries everything it needs (its whole msad
config), and a student names the teacher group (width, and seed when there are several) it depends on; the searcher
(`msad.sweep.search`) fills in the checkpoint path. `seeds: [0, 1, 2]` replicates every trial per training seed
(`train.seed`); a student distils from the teacher of its own seed, so each seed is an independent run of the whole
method.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from msad import storage
from msad.config import (
    Config,
    absolute_config,
    absolute_location,
    build_typed,
    check_initialisation,
    config_from_dict,
    deep_merge,
    load_yaml_with_bases,
    parse_overrides,
    read_yaml,
    resolve_dotted_paths,
    resolve_paths,
)
from msad.errors import UserError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
RUNS_DIR = "runs"


@dataclass
class StageSpec:
    config: dict[str, Any] = field(default_factory=dict)  # nested overrides for every trial of this stage
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted key -> values; every combination runs
    variants: list[dict[str, Any]] = field(default_factory=list)  # sets of dotted keys that change together
    sample: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # dotted key -> {uniform: [a, b]} etc.
    num_samples: int = 1  # draws of `sample` per grid point
    # students only: width -> teacher file (relative to the sweep file, or s3://...)
    teacher_checkpoints: dict[str, str] = field(default_factory=dict)
    # baselines only: the input of each plain FCOS: H (the trial's sizes) and/or L (every size halved, as the
    # students' L input), e.g. [L] for "a student at L vs a plain FCOS at L"
    resolutions: list[Literal["H", "L"]] = field(default_factory=lambda: ["H"])


@dataclass
class SchedulerSpec:
    type: Literal["fifo", "asha"] = "fifo"
    metric: str = "AP"  # reported at evaluations; ASHA compares students by it
    mode: Literal["max", "min"] = "max"
    grace_period: int = 100  # iterations before ASHA may stop a student
    reduction_factor: float = 2.0
    time_attr: str = "iteration"


@dataclass
class SweepFile:
    name: str = "sweep"  # experiment name: folder, W&B group
    base: str | None = None  # config file every trial starts from (relative to the sweep file)
    config: dict[str, Any] = field(default_factory=dict)  # nested overrides for every trial
    teachers: StageSpec | None = None
    baselines: StageSpec | None = None  # plain FCOS (role fcos): no teacher, no distillation
    students: StageSpec | None = None
    seeds: list[int] = field(default_factory=list)  # replicate every trial per train.seed; [] = the config's seed
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    max_concurrent_trials: int = 2
    trial_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.05})  # the (idle) trial driver
    # times Tune starts a failed trial again (it resumes its Train run from the last checkpoint); on top of
    # distributed.max_failures, which restarts a run's workers inside the trial
    trial_retries: int = 2
    seed: int = 0  # for sampled values


@dataclass(frozen=True)
class TrialSpec:
    """One trial: its name, role, the values shown in progress tables, and its full config."""

    name: str
    role: str
    width: float
    h_short_side: int
    kd_alpha: float | None  # students only
    kd_temperature: float | None
    config: dict[str, Any]
    teacher_checkpoint: str | None = None  # given by the spec (students-only sweeps); else filled in by the searcher
    seed: int = 0  # train.seed
    teacher_group: str = ""  # teachers and their students share it: "w0.25", or "w0.25-s1" with several seeds
    resolution: str = ""  # the report's Resolution: "H & L" (teacher), "L" (student), "H" or "L" (baseline)
    replicate_of: str = ""  # the trial's name without its seed suffix: the W&B group of its seed replicates

    def tune_config(self) -> dict[str, Any]:
        """What Tune stores for the trial: flat values for tables and callbacks, and the msad config."""
        return {"trial_name": self.name, "role": self.role, "width": self.width, "h_short_side": self.h_short_side,
                "kd_alpha": self.kd_alpha, "kd_temperature": self.kd_temperature, "seed": self.seed,
                "teacher_group": self.teacher_group, "resolution": self.resolution,
                "replicate_of": self.replicate_of or self.name, "msad": self.config, "dependency_error": None}


@dataclass
class Sweep:
    spec_path: Path
    spec: SweepFile
    base: Config
    teachers: list[TrialSpec]
    students: list[TrialSpec]
    baselines: list[TrialSpec] = field(default_factory=list)

    @property
    def trials(self) -> list[TrialSpec]:
        """Every trial, in the order they are handed out when nothing waits: teachers, baselines, students."""
        return [*self.teachers, *self.baselines, *self.students]

    @property
    def experiment_dir(self) -> str:
        """Where Tune and the trials' Train runs store state: <distributed.storage_path>/<name> (path or URI)."""
        return storage.join(storage.resolve(self.base.distributed.storage_path), self.spec.name)


def _draw(key: str, dist: dict[str, list[Any]], rng: random.Random, where: str) -> Any:
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise UserError(f"{where}.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {dist!r}")
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}.{key}.choice: expected a non-empty list, got {args!r}")
        return rng.choice(args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]):
        raise UserError(f"{where}.{key}.{kind}: expected [low, high] with low < high, got {args!r}")
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "randint":
        return rng.randint(int(low), int(high))
    if low <= 0:
        raise UserError(f"{where}.{key}.loguniform: bounds must be > 0, got {args!r}")
    import math

    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _expand(stage: StageSpec, where: str, rng: random.Random) -> list[dict[str, Any]]:
    """Grid x samples -> list of dotted-key override dicts."""
    for key, values in stage.grid.items():
        if not values:
            raise UserError(f"{where}.grid.{key}: expected a non-empty list of values")
    if stage.num_samples < 1:
        raise UserError(f"{where}.num_samples: invalid value {stage.num_samples}; allowed: an integer >= 1")
    keys = list(stage.grid)
    points = []
    for variant in stage.variants or [{}]:
        for combo in itertools.product(*(stage.grid[k] for k in keys)):
            for _ in range(stage.num_samples if stage.sample else 1):
                point = {**variant, **dict(zip(keys, combo, strict=True))}
                point.update({k: _draw(k, d, rng, f"{where}.sample") for k, d in stage.sample.items()})
                points.append(point)
    return points


def _trial_config(base: dict[str, Any], stage: StageSpec, point: dict[str, Any], role: str,
                  where: str, sweep_dir: Path, command_line: dict[str, Any]) -> Config:
    """A trial's config: the base, then the stage's `config`, then the command line's overrides (what the user
    typed last wins, as in a plain config), then its grid point (keys the sweep varies are refused on the command
    line); locations written in the sweep file are relative to the sweep file."""
    data = deep_merge(base, resolve_paths(stage.config, sweep_dir))
    data = deep_merge(data, command_line)
    point = resolve_dotted_paths(point, sweep_dir)
    data = deep_merge(data, parse_overrides([f"{k}={_yaml_scalar(v)}" for k, v in point.items()]))
    data = deep_merge(data, {"train": {"role": role}})
    try:
        cfg = absolute_config(config_from_dict(data))
        check_initialisation(cfg)  # before Ray starts, not in the trial
        return cfg
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _name(role: str, cfg: Config, resolution: str) -> str:
    h = cfg.data.test_short_side
    if role == "student":
        return f"student-w{cfg.model.width:g}-l{h // 2}-kd{cfg.train.kd_alpha:g}-t{cfg.train.kd_temperature:g}"
    if role == "fcos" and resolution == "L":
        return f"fcos-w{cfg.model.width:g}-l{h}"  # its own sizes are already the L ones
    return f"{role}-w{cfg.model.width:g}-h{h}"


def _unique(name: str, taken: set[str]) -> str:
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}-{n}", n + 1
    taken.add(unique)
    return unique


def _at_low_resolution(data: dict[str, Any]) -> dict[str, Any]:
    """A trial's config with every image size halved: a plain FCOS that reads what the students read (L), padded as
    a student's L is (half of H's padding), not more."""
    d = data["data"]
    low = {"train_short_sides": [side // 2 for side in d["train_short_sides"]],
           "test_short_side": d["test_short_side"] // 2, "max_size": d["max_size"] // 2,
           "size_divisibility": d["size_divisibility"] // 2}
    return deep_merge(data, {"data": low})


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Parse and validate a sweep file; every trial's config is built and validated now, before Ray starts.

    Locations in the sweep file (its `config`, a stage's `config`, grid and variant values, `base`,
    `students.teacher_checkpoints`) are relative to the sweep file; those in `overrides` to the working directory.
    """
    where = str(path)  # messages name the file as the user wrote it
    path = Path(path).absolute()
    raw = read_yaml(path)
    spec: SweepFile = build_typed(SweepFile, raw)
    if spec.teachers is None and spec.students is None:
        raise UserError(f"{where}: a sweep needs a teachers or a students section (or both)")
    if spec.trial_retries < 0:
        raise UserError(f"{where}: trial_retries: invalid value {spec.trial_retries}; allowed: an integer >= 0")
    if spec.max_concurrent_trials < 1:
        raise UserError(f"{where}: max_concurrent_trials: invalid value {spec.max_concurrent_trials}; allowed: >= 1")
    if not spec.name or "/" in spec.name:
        raise UserError(f"{where}: name: invalid value {spec.name!r}; allowed: a non-empty name without '/'")
    base_dict = load_yaml_with_bases(path.parent / spec.base) if spec.base else {}
    base_dict = deep_merge(base_dict, resolve_paths(spec.config, path.parent))
    command_line = resolve_paths(parse_overrides(overrides or []), Path.cwd())
    _check_not_varied(spec, overrides or [], where)
    base_dict = deep_merge(base_dict, command_line)
    try:
        base = absolute_config(config_from_dict(base_dict))
    except UserError as err:
        raise UserError(f"{where}: {err}") from None

    runs_dir = storage.join(storage.resolve(base.distributed.storage_path), spec.name, RUNS_DIR)
    _check_stages(spec, where)
    seeds = spec.seeds or [base.train.seed]
    rng = random.Random(spec.seed)
    taken: set[str] = set()
    plan = _Plan(seeds, runs_dir, taken)
    teachers: list[TrialSpec] = []
    if spec.teachers is not None:
        for point in _expand(spec.teachers, f"{where}: teachers", rng):
            cfg = _trial_config(base_dict, spec.teachers, point, "teacher", f"{where}: teachers", path.parent,
                                command_line)
            teachers.extend(plan.replicates(cfg, "teacher", "H & L"))
    baselines: list[TrialSpec] = []
    if spec.baselines is not None:
        for point in _expand(spec.baselines, f"{where}: baselines", rng):
            cfg = _trial_config(base_dict, spec.baselines, point, "fcos", f"{where}: baselines", path.parent,
                                command_line)
            for resolution in dict.fromkeys(spec.baselines.resolutions):
                sized = cfg if resolution == "H" else _validated(_at_low_resolution(cfg.to_dict()),
                                                                   f"{where}: baselines (resolution L)")
                baselines.extend(plan.replicates(sized, "fcos", resolution))
    students: list[TrialSpec] = []
    if spec.students is not None:
        given = _given_teachers(spec.students, where, path.parent)
        for point in _expand(spec.students, f"{where}: students", rng):
            cfg = _trial_config(base_dict, spec.students, point, "student", f"{where}: students", path.parent,
                                command_line)
            width = cfg.model.width
            if width not in given and not any(t.width == width for t in teachers):
                raise UserError(f"{where}: students at width {width:g} have no teacher: add that width to teachers "
                                f"or name a file in students.teacher_checkpoints")
            students.extend(plan.replicates(cfg, "student", "L", given.get(width)))
    if spec.scheduler.type == "asha" and spec.scheduler.grace_period < 1:
        raise UserError(f"{where}: scheduler.grace_period: invalid value {spec.scheduler.grace_period}; allowed: >= 1")
    if spec.scheduler.type == "asha" and spec.scheduler.metric == "val_loss":
        if any(not s.config["train"]["eval_loss"] for s in students):
            raise UserError(f"{where}: scheduler.metric: val_loss needs train.eval_loss: true for the students")
        if spec.scheduler.mode != "min":
            raise UserError(f"{where}: scheduler.mode: invalid value {spec.scheduler.mode!r} for val_loss; "
                            "allowed: min")
    return Sweep(path, spec, base, teachers, students, baselines)


def _check_stages(spec: SweepFile, where: str) -> None:
    for stage_name in ("teachers", "students"):
        stage = getattr(spec, stage_name)
        if stage is not None and stage.resolutions != ["H"]:
            raise UserError(f"{where}: {stage_name}.resolutions: only a baselines stage has resolutions "
                            f"(teachers read H & L, students L)")
    if spec.baselines is not None and not spec.baselines.resolutions:
        raise UserError(f"{where}: baselines.resolutions: expected a non-empty list of H and/or L")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise UserError(f"{where}: seeds: invalid value {spec.seeds}; allowed: a list of distinct integers")


def _check_not_varied(spec: SweepFile, overrides: list[str], where: str) -> None:
    """Refuse a command-line override of a key the sweep file sets per trial (a stage's grid, variants or sample,
    or `train.seed` when the file lists `seeds`): it would either be overwritten in every trial or collapse the
    sweep's trials into copies, so the one place to change it is the sweep file."""
    varied: dict[str, str] = {"train.seed": "seeds"} if spec.seeds else {}
    for stage_name in ("teachers", "baselines", "students"):
        stage = getattr(spec, stage_name)
        if stage is None:
            continue
        keys = [(key, f"{stage_name}.{part}") for part in ("grid", "sample") for key in getattr(stage, part)]
        keys += [(key, f"{stage_name}.variants") for variant in stage.variants for key in variant]
        for key, place in keys:
            varied.setdefault(key, place)  # the first place that sets it names it
    for override in overrides:
        key = override.partition("=")[0]  # as parse_overrides reads it
        if key in varied:
            raise UserError(f"{where}: {key}: the sweep file sets it per trial ({varied[key]}); change it "
                            "there, not on the command line")


def _validated(data: dict[str, Any], where: str) -> Config:
    try:
        return absolute_config(config_from_dict(data))
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


@dataclass
class _Plan:
    """Names trials and replicates them per seed: `name-s1` etc. when there are several seeds."""

    seeds: list[int]
    runs_dir: str
    taken: set[str]

    def replicates(self, cfg: Config, role: str, resolution: str,
                   teacher_checkpoint: str | None = None) -> list[TrialSpec]:
        base_name = _unique(_name(role, cfg, resolution), self.taken)
        several = len(self.seeds) > 1
        trials = []
        for seed in self.seeds:
            data = cfg.to_dict()
            data["train"]["seed"] = seed
            name = _unique(f"{base_name}-s{seed}", self.taken) if several else base_name
            group = f"w{cfg.model.width:g}" + (f"-s{seed}" if several else "")
            trials.append(_trial(data, role, name, teacher_checkpoint, self.runs_dir, seed, group, resolution,
                                 base_name))
        return trials


def _given_teachers(stage: StageSpec, where: str, sweep_dir: Path) -> dict[float, str]:
    """Width -> teacher file (relative to the sweep file, or an object-store URI, checked when read)."""
    given = {}
    for width, file in stage.teacher_checkpoints.items():
        try:
            given[float(width)] = location = absolute_location(file, sweep_dir)
        except ValueError:
            raise UserError(f"{where}: students.teacher_checkpoints: key {width!r} is not a width") from None
        if not storage.is_uri(location) and not Path(location).is_file():
            raise UserError(f"{where}: students.teacher_checkpoints.{width}: file {file} not found "
                            f"(looked for {location}; paths in a sweep file are relative to the sweep file)")
    return given


def _trial(data: dict[str, Any], role: str, name: str, teacher_checkpoint: str | None, runs_dir: str, seed: int,
           teacher_group: str, resolution: str, replicate_of: str) -> TrialSpec:
    """A trial's spec; its Train run lives in EXPERIMENT_DIR/runs/<trial name> (re-running it resumes it)."""
    cfg = config_from_dict(data)
    data["distributed"]["run_name"] = name
    data["distributed"]["storage_path"] = runs_dir
    if teacher_checkpoint:
        data["train"]["teacher_checkpoint"] = teacher_checkpoint
    is_student = role == "student"
    return TrialSpec(name=name, role=role, width=cfg.model.width, h_short_side=cfg.data.test_short_side,
                     kd_alpha=cfg.train.kd_alpha if is_student else None,
                     kd_temperature=cfg.train.kd_temperature if is_student else None, config=data,
                     teacher_checkpoint=teacher_checkpoint, seed=seed, teacher_group=teacher_group,
                     resolution=resolution, replicate_of=replicate_of)
