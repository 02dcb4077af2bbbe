"""Locations in configs and sweeps are absolute from the moment they are loaded: relative to the YAML file that
writes them, to the working directory for command-line overrides and defaults; object-store URIs unchanged.

Ray runs trials and workers in working directories of their own, so a relative path that passes on the driver
would point elsewhere inside a trial: the sweep test at the end runs a real trial that reads data and its teacher
through paths written relative to a sweep file in another folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from msad.config import PATH_KEYS, load_config
from msad.errors import UserError
from msad.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]


def test_every_location_key_is_known() -> None:
    assert set(PATH_KEYS) == {"model.pretrained", "data.train_images", "data.train_annotations", "data.val_images",
                              "data.val_annotations", "data.shapes.cache_dir", "train.teacher_checkpoint",
                              "distributed.storage_path"}


def test_config_paths_relative_to_their_file_overrides_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project" / "configs"
    project.mkdir(parents=True)
    (project / "base.yaml").write_text("data:\n  dataset: coco\n  train_images: ../coco/train\n"
                                       "  train_annotations: ../coco/train.json\n  val_images: /abs/val\n"
                                       "  val_annotations: s3://bucket/val.json?endpoint_override=http://h:9000\n")
    (project / "run.yaml").write_text("_base_: base.yaml\nmodel:\n  pretrained: weights/r50.pt\n"
                                      "distributed:\n  storage_path: ../runs\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../project/configs/run.yaml", ["train.teacher_checkpoint=t/ckpt.pt",
                                                      "data.shapes.cache_dir=~/cache"])
    assert cfg.data.train_images == str(tmp_path / "project" / "coco" / "train")  # base's folder
    assert cfg.data.train_annotations == str(tmp_path / "project" / "coco" / "train.json")
    assert cfg.data.val_images == "/abs/val"
    assert cfg.data.val_annotations == "s3://bucket/val.json?endpoint_override=http://h:9000"  # URI unchanged
    assert cfg.model.pretrained == str(project / "weights" / "r50.pt")  # the file that wrote it
    assert cfg.distributed.storage_path == str(tmp_path / "project" / "runs")
    assert cfg.train.teacher_checkpoint == str(elsewhere / "t" / "ckpt.pt")  # override: the working directory
    assert cfg.data.shapes.cache_dir == str(Path.home() / "cache")


def test_defaults_are_made_absolute_against_the_working_directory(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.distributed.storage_path == str(tmp_path / "runs")
    assert cfg.data.shapes.cache_dir == str(Path.home() / ".cache" / "msad")
    assert cfg.model.pretrained is None and cfg.train.teacher_checkpoint is None


def test_link_in_a_path_is_kept_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/data/coco -> /shared/coco on the cluster images: the config keeps the link's name (every node has it)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["data.train_images=link/./train"]).data.train_images == str(tmp_path / "link" / "train")


def test_sweep_paths_relative_to_the_sweep_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experiments = tmp_path / "experiments"
    (experiments / "teachers").mkdir(parents=True)
    (experiments / "teachers" / "w025.pt").write_bytes(b"not read while loading the sweep")
    spec = {"name": "rel", "base": str(REPO / "configs" / "cpu_base.yaml"),
            "config": {"distributed": {"storage_path": "out"}, "data": {"shapes": {"cache_dir": "cache"}}},
            "students": {"teacher_checkpoints": {0.25: "teachers/w025.pt"},
                         "grid": {"model.pretrained": ["a.pt", "/abs/b.pt"]}}}
    (experiments / "rel.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep("experiments/rel.yaml", ["data.val_images=from_cwd"])
    assert sweep.experiment_dir == str(experiments / "out" / "rel")
    first, second = sweep.students
    assert first.teacher_checkpoint == str(experiments / "teachers" / "w025.pt")
    assert first.config["train"]["teacher_checkpoint"] == str(experiments / "teachers" / "w025.pt")
    assert first.config["model"]["pretrained"] == str(experiments / "a.pt")
    assert second.config["model"]["pretrained"] == "/abs/b.pt"
    assert first.config["data"]["shapes"]["cache_dir"] == str(experiments / "cache")
    assert first.config["data"]["val_images"] == str(tmp_path / "from_cwd")
    assert first.config["distributed"]["storage_path"] == str(experiments / "out" / "rel" / "runs")


def test_missing_teacher_names_where_it_was_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "s.yaml").write_text(yaml.safe_dump(
        {"name": "s", "students": {"teacher_checkpoints": {0.25: "t.pt"}}}))
    (tmp_path / "t.pt").write_bytes(b"")  # next to the working directory, not to the sweep file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"file t.pt not found \(looked for .*/sweeps/t.pt; paths in a sweep file"):
        load_sweep("sweeps/s.yaml")


def test_sweep_in_another_folder_trains_from_paths_relative_to_itself(ray_session: None, teacher_run,
                                                                     shapes_cache: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A students-only sweep whose data (COCO-format files) and teacher are named relative to the sweep file, run
    from an unrelated working directory: the trial (its own working directory, in a Ray actor) trains from them."""
    from msad.build import resolve_data_paths
    from msad.sweep.runner import run_sweep
    from msad.sweep.trials import read_trial_summaries

    teacher_cfg, teacher = teacher_run
    study = tmp_path / "study"
    shapes = resolve_data_paths(teacher_cfg.data)
    for split in ("train", "val"):
        shutil.copytree(getattr(shapes, f"{split}_images"), study / "data" / split)
        shutil.copy(getattr(shapes, f"{split}_annotations"), study / "data" / f"{split}.json")
    (study / "teacher").mkdir()
    for suffix in ("", ".sha256"):
        shutil.copy(teacher.checkpoint + suffix, study / "teacher" / f"checkpoint.pt{suffix}")
    base = {k: teacher_cfg.to_dict()[k] for k in ("model", "train")}
    base["train"].update(iterations=2, lr_steps=[1], checkpoint_period=2, eval_period=2, teacher_checkpoint=None)
    base["data"] = {"dataset": "coco", "train_images": "data/train", "train_annotations": "data/train.json",
                    "val_images": "data/val", "val_annotations": "data/val.json", "train_short_sides": [128],
                    "test_short_side": 128, "num_workers": 0}
    base["distributed"] = {"storage_path": "runs", "num_workers": 1, "max_failures": 0}
    base["tracking"] = {"mode": "disabled"}
    (study / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "relative", "config": base, "max_concurrent_trials": 1,
        "students": {"teacher_checkpoints": {0.25: "teacher/checkpoint.pt"}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    home = run_sweep(Path("../study/sweep.yaml"), [])
    assert home == study / "runs" / "relative"
    (row,) = read_trial_summaries(home)
    assert row.status == "TERMINATED", row.error
    assert row.teacher_checkpoint == str(study / "teacher" / "checkpoint.pt")
    assert Path(row.checkpoint).is_file() and str(row.checkpoint).startswith(str(study / "runs" / "relative"))
    assert not any(elsewhere.iterdir())  # nothing written where the sweep was launched from
