"""Clusters at runtime: object storage through a real S3 server on localhost (moto's, installed from PyPI, started
by the `s3_bucket` fixture on 127.0.0.1). A sweep submitted with `ray job submit` to a two-node Ray started with
`ray start`, storing in S3, with a node lost mid-run, is in tests/test_node_loss.py.
"""

from __future__ import annotations

from pathlib import Path

from msad.engine import storage
from msad.engine.checkpoint import load_checkpoint
from msad.engine.trainer import fit

REPO = Path(__file__).resolve().parents[1]


def test_storage_round_trip_on_s3(s3_bucket: str) -> None:
    location = storage.join(s3_bucket, "a", "b.bin")
    storage.write_bytes(location, b"\x00msad")
    assert storage.exists(location) and storage.read_bytes(location) == b"\x00msad"
    assert storage.local_copy(location).read_bytes() == b"\x00msad"
    assert not storage.exists(storage.join(s3_bucket, "a", "missing.bin"))


def test_student_fetches_its_teacher_through_s3(ray_session: None, tiny_config, s3_bucket: str, tmp_path: Path,
                                               shapes_cache: Path) -> None:
    """A teacher checkpoint in the object store (uploaded, digest beside it, as a cluster run leaves it); a student
    run whose storage is that store reads it from there and writes its own checkpoints there.

    Single-width weights (`model.width_list=[0.25]`): the shared multi-width teacher's checkpoints are ~190 MB (full
    ResNet-50 tensors plus momentum), and moto's server returns one that size in about 80 s per read; 12 MB takes
    0.2 s through the same code path."""
    one_width = ("model.width_list=[0.25]", "distributed.num_workers=1")
    teacher = fit(tiny_config(tmp_path, shapes_cache, "teacher", "local-teacher", *one_width, "train.iterations=2",
                              "train.lr_steps=[1]", "train.warmup_iters=1", "train.eval_period=2"))
    remote_teacher = storage.join(s3_bucket, "teacher", "checkpoint_0000002", "checkpoint.pt")
    for suffix in ("", ".sha256"):
        head, _, query = remote_teacher.partition("?")
        storage.write_bytes(f"{head}{suffix}?{query}", Path(teacher.checkpoint + suffix).read_bytes())
    assert load_checkpoint(remote_teacher)["role"] == "teacher"  # round trip, digest checked
    student = fit(tiny_config(tmp_path, shapes_cache, "student", "s3-student", f"distributed.storage_path={s3_bucket}",
                              *one_width, f"train.teacher_checkpoint={remote_teacher}"))
    assert student.metrics["iteration"] == 6 and student.metrics["loss_kd"] > 0
    assert student.best_checkpoint.startswith("s3://msad-test/runs/s3-student/checkpoint_")
    assert "endpoint_override=" in student.best_checkpoint
    state = load_checkpoint(student.best_checkpoint)  # the student's own checkpoint, read back from S3
    assert state["role"] == "student" and state["config"]["train"]["teacher_checkpoint"] == remote_teacher
    assert storage.exists(storage.join(s3_bucket, "s3-student", "config.yaml"))
    assert not (tmp_path / "s3-student").exists()  # nothing went to the local disk instead
