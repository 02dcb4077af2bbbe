"""Sweep files: expansion of grids, variants and samples; validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from msad.config import config_from_dict
from msad.errors import UserError
from msad.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]


def write(tmp: Path, text: str) -> Path:
    (tmp / "base.yaml").write_text("model:\n  num_classes: 6\n  fpn_channels: 32\n")
    path = tmp / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["quickstart", "paper", "kd_weights", "resolutions"])
def test_shipped_sweeps_load(name: str) -> None:
    overrides = ["model.pretrained=/weights/s_resnet50.pt"] if name == "paper" else []  # COCO: refused without
    sweep = load_sweep(REPO / "sweeps" / f"{name}.yaml", overrides)
    names = [t.name for t in sweep.teachers + sweep.students]
    assert len(names) == len(set(names))
    assert all(t.role == "teacher" for t in sweep.teachers) and all(s.role == "student" for s in sweep.students)
    teacher_widths = {t.width for t in sweep.teachers}
    assert all(s.width in teacher_widths for s in sweep.students)


def test_a_coco_sweep_without_imagenet_weights_is_refused_before_ray_starts() -> None:
    with pytest.raises(UserError, match=r"paper.yaml: teachers: model.pretrained: a COCO run needs the ImageNet"):
        load_sweep(REPO / "sweeps" / "paper.yaml")


def test_quickstart_shows_the_method_against_its_baselines() -> None:
    sweep = load_sweep(REPO / "sweeps" / "quickstart.yaml")
    assert [s.kd_alpha for s in sweep.students] == [0.0, 0.2]
    assert [s.name for s in sweep.students] == ["student-w0.25-l64-kd0-t3", "student-w0.25-l64-kd0.2-t3"]
    (baseline,) = sweep.baselines
    assert (baseline.name, baseline.resolution) == ("fcos-w0.25-l64", "L")  # what the students read
    (teacher,) = sweep.teachers
    teacher_its = teacher.config["train"]["iterations"]
    student_its = sweep.students[0].config["train"]["iterations"]
    assert teacher_its >= 2 * student_its  # trained long enough to stay ahead of its students
    assert baseline.config["train"]["iterations"] >= teacher_its  # at least as long as the teacher


def test_grid_variants_samples_expand_deterministically(tmp_path: Path) -> None:
    path = write(tmp_path, """
name: t
base: base.yaml
seed: 7
teachers:
  grid: {model.width: [0.25, 0.5]}
  config: {train: {iterations: 40, lr_steps: [30]}}
students:
  config: {train: {iterations: 20, lr_steps: [10]}}
  grid: {model.width: [0.25], train.kd_alpha: [0.1, 0.2]}
  variants:
    - {data.test_short_side: 192, data.train_short_sides: [192]}
    - {data.test_short_side: 256, data.train_short_sides: [256]}
  sample: {train.kd_temperature: {loguniform: [1, 8]}, train.base_lr: {choice: [0.01, 0.02]}}
  num_samples: 2
""")
    sweep = load_sweep(path)
    assert [(t.width, t.config["train"]["iterations"]) for t in sweep.teachers] == [(0.25, 40), (0.5, 40)]
    assert len(sweep.students) == 2 * 2 * 2  # variants x grid x samples
    assert {s.h_short_side for s in sweep.students} == {192, 256}
    temps = [s.kd_temperature for s in sweep.students]
    assert all(1 <= t <= 8 for t in temps) and len(set(temps)) == len(temps)
    assert all(s.config["train"]["iterations"] == 20 and s.config["model"]["num_classes"] == 6
               for s in sweep.students)
    again = load_sweep(path)
    assert [s.config for s in again.students] == [s.config for s in sweep.students]  # same seed, same trials
    runs = {s.config["distributed"]["storage_path"] for s in sweep.students}
    assert runs == {str(Path("runs").resolve() / "t" / "runs")}  # distributed.storage_path ./runs, experiment t
    assert all(s.config["distributed"]["run_name"] == s.name for s in sweep.students)


def test_overrides_apply_to_every_trial(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nbase: base.yaml\nteachers:\n  grid: {model.width: [0.25]}\n")
    sweep = load_sweep(path, ["train.seed=5"])
    assert sweep.teachers[0].config["train"]["seed"] == 5


def test_command_line_overrides_win_over_the_stages_config() -> None:
    """What the user types last wins, as with a plain config: the quickstart's stages set their own schedules, and
    a shorter one given on the command line reaches every trial (it used to be overwritten by the stages)."""
    short = ["train.iterations=20", "train.lr_steps=[10,15]", "train.warmup_iters=5", "train.kd_warmup_iters=5"]
    sweep = load_sweep(REPO / "sweeps" / "quickstart.yaml", short)
    trials = sweep.teachers + sweep.baselines + sweep.students
    assert len(trials) == 4
    assert {(t.config["train"]["iterations"], tuple(t.config["train"]["lr_steps"])) for t in trials} == {(20, (10, 15))}
    assert [s.kd_alpha for s in sweep.students] == [0.0, 0.2]  # the grid still varies what it varies


@pytest.mark.parametrize(("override", "where"), [("train.kd_alpha=0.5", "students.grid"),
                                                   ("model.width=0.5", "teachers.grid")])
def test_an_override_of_a_key_the_sweep_sets_per_trial_is_refused(override: str, where: str) -> None:
    with pytest.raises(UserError) as info:
        load_sweep(REPO / "sweeps" / "quickstart.yaml", [override])
    key = override.split("=")[0]
    assert str(info.value) == (f"{REPO / 'sweeps' / 'quickstart.yaml'}: {key}: the sweep file sets it per trial "
                               f"({where}); change it there, not on the command line")


def test_an_override_of_the_seed_is_refused_when_the_file_lists_seeds(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nbase: base.yaml\nseeds: [0, 1]\nteachers:\n  grid: {model.width: [0.25]}\n")
    with pytest.raises(UserError, match=r"train.seed: the sweep file sets it per trial \(seeds\)"):
        load_sweep(path, ["train.seed=5"])
    variants = write(tmp_path, "name: t\nbase: base.yaml\nteachers:\n  variants: [{train.base_lr: 0.01}]\n")
    with pytest.raises(UserError, match=r"train.base_lr: the sweep file sets it per trial \(teachers.variants\)"):
        load_sweep(variants, ["train.base_lr=0.02"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\nstudnets: {}\n", "unknown key studnets (did you mean students?)"),
        ("name: t\nteachers:\n  gird: {}\n", "unknown key teachers.gird (did you mean teachers.grid?)"),
        ("name: t\nteachers:\n  grid: {train.kd_alhpa: [0.1]}\n",
         "teachers: unknown key train.kd_alhpa (did you mean train.kd_alpha?)"),
        ("name: t\nteachers:\n  grid: {model.width: [0.3]}\n", "model.width: invalid value 0.3"),
        ("name: t\nteachers:\n  grid: {model.width: []}\n", "teachers.grid.model.width: expected a non-empty list"),
        ("name: t\nteachers:\n  grid: {model.width: [0.25]}\n  sample: {train.base_lr: {loguniform: [0, 1]}}\n",
         "train.base_lr.loguniform: bounds must be > 0"),
        ("name: t\nteachers:\n  grid: {model.width: [0.25]}\n  sample: {train.base_lr: {normal: [0, 1]}}\n",
         "expected one of {choice, uniform, loguniform, randint: [...]}"),
        ("name: t\nstudents:\n  grid: {model.width: [0.5]}\n",
         "students at width 0.5 have no teacher: add that width to teachers"),
        ("name: t\nstudents:\n  teacher_checkpoints: {0.25: /no/such/teacher.pt}\n",
         "students.teacher_checkpoints.0.25: file /no/such/teacher.pt not found"),
        ("name: t\n", "a sweep needs a teachers or a students section"),
        ("name: t\nscheduler: {type: hyperband}\nteachers: {}\n", "scheduler.type: invalid value 'hyperband'"),
        ("name: t\nmax_concurrent_trials: 0\nteachers: {}\n", "max_concurrent_trials: invalid value 0"),
        ("name: t\nscheduler: {type: asha, metric: val_loss, mode: min}\nteachers: {}\nstudents: {}\n",
         "scheduler.metric: val_loss needs train.eval_loss: true for the students"),
        ("name: t\nscheduler: {type: asha, metric: val_loss}\nconfig: {train: {eval_loss: true}}\nteachers: {}\n"
         "students: {}\n", "scheduler.mode: invalid value 'max' for val_loss; allowed: min"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_sweep(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_students_only_sweep_uses_given_teacher(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"x")
    path = write(tmp_path, f"name: t\nstudents:\n  grid: {{train.kd_alpha: [0.1]}}\n"
                           f"  teacher_checkpoints: {{0.25: {teacher}}}\n")
    sweep = load_sweep(path)
    assert sweep.teachers == [] and sweep.students[0].config["train"]["teacher_checkpoint"] == str(teacher)


# The original's schedules, read from dvlab-research/MSAD a65fc09 configs/SLR{100,075,050,025}-50-{T,S}.yaml:
# (IMS_PER_BATCH, BASE_LR, MAX_ITER, STEPS); WARMUP_ITERS 500 in every file.
ORIGINAL_SCHEDULES = {
    ("teacher", 1.0): (8, 0.01, 180000, [120000, 160000]), ("teacher", 0.75): (8, 0.01, 180000, [120000, 160000]),
    ("teacher", 0.5): (8, 0.01, 180000, [120000, 160000]), ("teacher", 0.25): (16, 0.01, 90000, [60000, 80000]),
    ("student", 1.0): (16, 0.01, 90000, [60000, 80000]), ("student", 0.75): (32, 0.02, 45000, [30000, 40000]),
    ("student", 0.5): (32, 0.01, 45000, [30000, 40000]), ("student", 0.25): (32, 0.02, 45000, [30000, 40000]),
}


def _schedule(cfg) -> tuple:
    t = cfg.train
    return (t.batch_per_worker * cfg.distributed.num_workers, t.base_lr, t.iterations, t.lr_steps)


def test_paper_sweep_and_configs_use_the_originals_schedule_per_width() -> None:
    from msad.config import load_config

    sweep = load_sweep(REPO / "sweeps" / "paper.yaml", ["model.pretrained=/weights/s_resnet50.pt"])
    trials = {(t.role, t.width): t.config for t in sweep.teachers + sweep.students}
    assert set(trials) == set(ORIGINAL_SCHEDULES)
    for (role, width), cfg in trials.items():
        cfg = config_from_dict(cfg)
        assert (_schedule(cfg), cfg.train.warmup_iters) == (ORIGINAL_SCHEDULES[role, width], 500), (role, width)
    for (role, width), expected in ORIGINAL_SCHEDULES.items():
        name = f"{role}_w{round(width * 100):03d}.yaml"
        cfg = load_config(REPO / "configs" / "paper" / name)
        assert (cfg.train.role, cfg.model.width) == (role, width), name
        assert _schedule(cfg) == expected and cfg.train.warmup_iters == 500, name


def test_baselines_at_h_and_l_and_seed_replicates(tmp_path: Path) -> None:
    path = write(tmp_path, """
name: t
base: base.yaml
seeds: [0, 1]
config: {data: {train_short_sides: [224, 256], test_short_side: 256, max_size: 384}}
teachers:
  grid: {model.width: [0.25]}
baselines:
  grid: {model.width: [0.25]}
  resolutions: [H, L]
students:
  grid: {model.width: [0.25], train.kd_alpha: [0.0, 0.2]}
""")
    sweep = load_sweep(path)
    assert [t.name for t in sweep.teachers] == ["teacher-w0.25-h256-s0", "teacher-w0.25-h256-s1"]
    assert [b.name for b in sweep.baselines] == ["fcos-w0.25-h256-s0", "fcos-w0.25-h256-s1", "fcos-w0.25-l128-s0",
                                                 "fcos-w0.25-l128-s1"]
    assert [s.name for s in sweep.students][:2] == ["student-w0.25-l128-kd0-t3-s0", "student-w0.25-l128-kd0-t3-s1"]
    assert [t.name for t in sweep.trials] == [t.name for t in sweep.teachers + sweep.baselines + sweep.students]
    for trial in sweep.trials:  # each replicate trains with its own seed; students wait for their seed's teacher
        assert config_from_dict(trial.config).train.seed == trial.seed
        assert trial.teacher_group == f"w0.25-s{trial.seed}"
        assert trial.tune_config()["replicate_of"] == trial.name.rsplit("-s", 1)[0]
    low = config_from_dict(sweep.baselines[2].config)
    assert (low.train.role, sweep.baselines[2].resolution) == ("fcos", "L")
    assert (low.data.train_short_sides, low.data.test_short_side, low.data.max_size,
            low.data.size_divisibility) == ([112, 128], 128, 192, 128)  # every size halved: what students read
    # padded as the students' L is: half of H's padding multiple (256 here)
    high = config_from_dict(sweep.baselines[0].config)
    assert (high.data.train_short_sides, high.data.test_short_side) == ([224, 256], 256)


def test_one_seed_keeps_plain_names_and_bad_seed_or_resolution_lists_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nbase: base.yaml\nteachers:\n  grid: {model.width: [0.25]}\n")
    (teacher,) = load_sweep(path).teachers
    assert (teacher.name, teacher.teacher_group, teacher.tune_config()["replicate_of"]) == (
        "teacher-w0.25-h256", "w0.25", "teacher-w0.25-h256")
    path.write_text("name: t\nbase: base.yaml\nseeds: [1, 1]\nteachers:\n  grid: {model.width: [0.25]}\n")
    with pytest.raises(UserError, match=r"sweep.yaml: seeds: invalid value \[1, 1\]; allowed: a list of distinct"):
        load_sweep(path)
    path.write_text("name: t\nbase: base.yaml\nteachers:\n  grid: {model.width: [0.25]}\n  resolutions: [L]\n")
    with pytest.raises(UserError, match="teachers.resolutions: only a baselines stage has resolutions"):
        load_sweep(path)
    path.write_text("name: t\nbase: base.yaml\nbaselines:\n  grid: {model.width: [0.25]}\n  resolutions: [M]\n")
    with pytest.raises(UserError, match="resolutions"):
        load_sweep(path)


def test_students_wait_for_the_teacher_of_their_own_seed_and_baselines_wait_for_nothing(tmp_path: Path) -> None:
    """The searcher alone (no Ray): what it hands out, in order, as trials end."""
    from msad.sweep.search import TeacherFirstSearcher

    path = write(tmp_path, """
name: t
base: base.yaml
seeds: [0, 1]
teachers: {grid: {model.width: [0.25]}}
baselines: {grid: {model.width: [0.25]}, resolutions: [L]}
students: {grid: {model.width: [0.25]}}
""")
    sweep = load_sweep(path)
    searcher = TeacherFirstSearcher(sweep.teachers, sweep.students, sweep.baselines)
    handed = [searcher.suggest(f"id{i}") for i in range(4)]
    assert [c["trial_name"] for c in handed] == ["teacher-w0.25-h256-s0", "teacher-w0.25-h256-s1",
                                                 "fcos-w0.25-l128-s0", "fcos-w0.25-l128-s1"]
    assert searcher.suggest("id4") is None  # both students wait for their teachers
    searcher.on_trial_complete("id1", {"best_checkpoint": "/t1.pt", "AP": 0.3})  # seed 1's teacher ends first
    student = searcher.suggest("id5")
    assert student["trial_name"] == "student-w0.25-l128-kd0.2-t3-s1"
    assert student["msad"]["train"]["teacher_checkpoint"] == "/t1.pt" and student["msad"]["train"]["seed"] == 1
    assert searcher.suggest("id6") is None
    searcher.on_trial_complete("id0", None, error=True)  # seed 0's teacher fails: its student fails naming it
    failed = searcher.suggest("id7")
    assert failed["dependency_error"] == ("teacher teacher-w0.25-h256-s0 (width 0.25, seed 0) failed; "
                                          "its students were not run")


def test_asha_never_stops_the_student_without_distillation() -> None:
    """Ray's ASHA, fed by hand (no Ray needed): at the rung, a worse KD student is stopped; an equally bad KD-off
    student is not, since every student is compared with it in the report."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from msad.sweep.search import StudentASHA

    asha = StudentASHA(time_attr="iteration", metric="AP", mode="max", max_t=10, grace_period=2,
                       reduction_factor=2, stop_last_trials=False)
    good, worse, plain = (SimpleNamespace(trial_id=name, config={"role": "student", "kd_alpha": alpha},
                                          is_finished=lambda: False)
                          for name, alpha in (("good", 0.2), ("worse", 0.8), ("plain", 0.0)))
    teacher = SimpleNamespace(trial_id="teacher", config={"role": "teacher"}, is_finished=lambda: False)
    for trial in (teacher, good, worse, plain):
        asha.on_trial_add(None, trial)
    # a teacher far ahead at the rung: never stopped, and not in the rung (else "good" would be stopped below)
    assert asha.on_trial_result(None, teacher, {"iteration": 2, "AP": 0.9}) == TrialScheduler.CONTINUE
    asha.on_trial_complete(None, teacher, {"iteration": 10, "AP": 0.9})
    asha.on_trial_remove(None, teacher)
    assert asha.on_trial_result(None, good, {"iteration": 2, "AP": 0.5}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, worse, {"iteration": 2, "AP": 0.1}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, plain, {"iteration": 2, "AP": 0.1}) == TrialScheduler.CONTINUE
