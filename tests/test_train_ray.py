"""Ray Train on CPU (gloo): teacher and student runs, 1-vs-2-worker equivalence, restarts, resume, guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAULT_DIR, make_tiny_config, weights_difference

from msad.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from msad.engine.trainer import fit, prepare_run
from msad.errors import RunFailedError, UserError


def test_teacher_two_workers_reports_metrics_and_checkpoints(teacher_run) -> None:
    cfg, result = teacher_run
    m = result.metrics
    assert m["iteration"] == 6
    for key in ("loss_cls_high", "loss_box_low", "loss_ctr_fused", "loss_total", "lr", "AP", "AP50", "APs",
                "images_per_sec_per_worker"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert abs(m["loss_total"] - sum(v for k, v in m.items() if k.startswith("loss_") and k != "loss_total")) < 1e-6
    fusion = [m[f"fusion_high_p{k}"] for k in range(3, 8)]  # C-FF's weight on H per level, averaged over workers
    assert all(0.0 < w < 1.0 for w in fusion) and any(w != 0.5 for w in fusion)  # zero init, then the loss moved it
    state = load_checkpoint(result.checkpoint)
    assert state["role"] == "teacher" and state["iteration"] == 6 and state["width"] == 0.25
    assert [h["iteration"] for h in state["history"]] == [1, 2, 3, 4, 5, 6]  # every report: the loss curve
    assert [h["iteration"] for h in state["history"] if "AP" in h] == [6]  # eval_period 6
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped from DDP
    kept = sorted(p.name for p in Path(result.run_dir).glob("checkpoint_0*"))
    assert kept[-1] == "checkpoint_0000006" and len(kept) <= cfg.train.keep_checkpoints + 1
    run_dir = Path(result.run_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final_metrics.json").is_file()
    results = json.loads((Path(result.checkpoint).parent / "coco_results.json").read_text())
    assert isinstance(results, list)  # COCO results JSON (may be empty this early: scores below 0.05)
    assert all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)


STUDENT_KD_RAMP = ("train.kd_warmup_iters=4",)  # the KD weight still ramps up at the fault below (iteration 3)


@pytest.fixture(scope="module")
def two_worker_student(teacher_run, tmp_path_factory: pytest.TempPathFactory, shapes_cache: Path):
    """A tiny student trained with 2 Ray workers, undisturbed."""
    _, teacher = teacher_run
    tmp = tmp_path_factory.mktemp("student")
    return fit(make_tiny_config(tmp, shapes_cache, "student", "student",
                                f"train.teacher_checkpoint={teacher.checkpoint}", *STUDENT_KD_RAMP))


def test_student_two_workers_distils_from_teacher(two_worker_student) -> None:
    m = two_worker_student.metrics
    assert m["iteration"] == 6 and m["loss_kd"] > 0 and m["kd_weight"] == pytest.approx(0.2)
    state = load_checkpoint(two_worker_student.checkpoint)
    assert state["role"] == "student" and state["kd_warmup"]["iteration"] == 6
    assert not any(k.startswith("fusion") for k in state["model"])  # the teacher is not in the student's file


def test_one_worker_batch_4_matches_two_workers_batch_2(tiny_config, ray_session: None, tmp_path: Path,
                                                        shapes_cache: Path) -> None:
    """Same images per global step, identically augmented (seeded sampler and augmentation), summed FCOS
    normalisers and averaged gradients: the curves differ only through per-worker BN statistics (2 vs 4 images;
    SyncBN removes that on GPUs). Stated tolerance: 3% relative per loss term at every one of 6 iterations."""
    common = ("train.eval_period=0", "train.checkpoint_period=6", "train.base_lr=0.002", "data.hflip_prob=0.5")
    one = fit(tiny_config(tmp_path, shapes_cache, "fcos", "one", "distributed.num_workers=1",
                   "train.batch_per_worker=4", *common))
    two = fit(tiny_config(tmp_path, shapes_cache, "fcos", "two", "distributed.num_workers=2",
                   "train.batch_per_worker=2", *common))
    curve_one = load_checkpoint(one.checkpoint)["history"]
    curve_two = load_checkpoint(two.checkpoint)["history"]
    assert [h["iteration"] for h in curve_one] == [h["iteration"] for h in curve_two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(curve_one, curve_two, strict=True):
        for key in ("loss_cls", "loss_box", "loss_ctr"):
            assert b[key] == pytest.approx(a[key], rel=0.03), (a["iteration"], key)
    assert curve_one[-1]["loss_cls"] < curve_one[0]["loss_cls"]  # and they are learning, not flat


def test_interrupted_run_resumes_and_skips_a_corrupt_checkpoint(tiny_config, ray_session: None, tmp_path: Path,
                                                                shapes_cache: Path) -> None:
    cfg = tiny_config(tmp_path, shapes_cache, "fcos", "again", "train.eval_period=0", "train.keep_checkpoints=3")
    (FAULT_DIR / "again.fail-at-5").touch()
    with pytest.raises(RunFailedError, match="injected failure at iteration 5"):
        fit(cfg)
    run_dir = tmp_path / "again"
    latest = run_dir / "checkpoint_0000004" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as a crash during a copy would leave it
    result = fit(cfg)  # started again with the same name and config
    state = load_checkpoint(result.checkpoint)
    assert state["iteration"] == 6 and state["resumed_from"] == [2]  # the corrupt one skipped, the previous used


def test_changed_config_under_the_same_name_is_refused(tiny_config, tmp_path: Path, shapes_cache: Path) -> None:
    prepare_run(tiny_config(tmp_path, shapes_cache, "fcos", "same"))
    with pytest.raises(UserError, match=r"exists with another config \(train.base_lr: 0.01 -> 0.02\)"):
        prepare_run(tiny_config(tmp_path, shapes_cache, "fcos", "same", "train.base_lr=0.02"))


def test_student_teacher_guards_before_workers(tiny_config, teacher_run, tmp_path: Path, shapes_cache: Path) -> None:
    _, teacher = teacher_run
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=f"{missing}: checkpoint not found"):
        prepare_run(tiny_config(tmp_path, shapes_cache, "student", "s1", f"train.teacher_checkpoint={missing}"))
    with pytest.raises(UserError, match="teacher width 0.25 differs from model.width 0.5"):
        prepare_run(tiny_config(tmp_path, shapes_cache, "student", "s2",
                                f"train.teacher_checkpoint={teacher.checkpoint}", "model.width=0.5"))
    state = load_checkpoint(teacher.checkpoint)
    student_file = save_checkpoint({**state, "role": "student"}, tmp_path / "student.pt")
    with pytest.raises(UserError, match="must be a teacher checkpoint, this one is a 'student'"):
        prepare_run(tiny_config(tmp_path, shapes_cache, "student", "s3", f"train.teacher_checkpoint={student_file}"))


def test_non_finite_loss_stops_with_iteration_and_term(tiny_config, tmp_path: Path, shapes_cache: Path) -> None:
    from msad.build import resolve_data_paths
    from msad.engine.in_process import LocalContext
    from msad.engine.loop import NonFiniteLossError, run_training

    cfg = tiny_config(tmp_path, shapes_cache, "fcos", "nan", "train.base_lr=1e30", "train.warmup_iters=0",
               "train.iterations=20", "train.lr_steps=[]", "train.checkpoint_period=20")
    ctx = LocalContext(device=torch.device("cpu"), run_dir=tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration \d+: loss_\w+=(nan|inf)"):
        run_training(cfg, resolve_data_paths(cfg.data), ctx)
    assert not list((tmp_path / "nan").glob("checkpoint_*"))  # nothing saved from a diverged model


def test_a_killed_teacher_worker_resumes_to_identical_weights(tiny_config, teacher_run, tmp_path: Path,
                                                              shapes_cache: Path) -> None:
    """2 workers, one SIGKILLed at iteration 5 (after checkpoint 4): Ray Train restarts both from checkpoint 4, and
    the run ends with the weights of the same run left alone (`teacher_run`), to the bit."""
    _, undisturbed = teacher_run
    cfg = tiny_config(tmp_path, shapes_cache, "teacher", "killed", "distributed.max_failures=1")
    kill = FAULT_DIR / "killed.kill-at-5"
    kill.touch()
    result = fit(cfg)
    assert not kill.exists()  # a worker took it, and died
    state = load_checkpoint(result.checkpoint)
    assert state["iteration"] == 6 and state["resumed_from"] == [4]
    assert weights_difference(result.checkpoint, undisturbed.checkpoint) == 0.0
    # negative control: the comparison sees one more step (checkpoint 4 vs 6 of the same run)
    assert weights_difference(str(Path(result.run_dir) / "checkpoint_0000004" / "checkpoint.pt"),
                               undisturbed.checkpoint) > 1e-6


def test_a_failed_student_worker_resumes_to_identical_weights_mid_kd_ramp(two_worker_student, teacher_run,
                                                                          tmp_path: Path, shapes_cache: Path) -> None:
    """2 workers, one raising at iteration 3 while the KD weight still ramps up: Ray Train restarts both from
    checkpoint 2 (`distributed.max_failures`), and the student ends with the weights of the same run left alone
    (`two_worker_student`), to the bit. (A worker that dies instead of raising: the teacher test above.)"""
    _, teacher = teacher_run
    fault = FAULT_DIR / "failed-student.fail-at-3"
    fault.touch()
    failed = fit(make_tiny_config(tmp_path, shapes_cache, "student", "failed-student",
                                  f"train.teacher_checkpoint={teacher.checkpoint}", *STUDENT_KD_RAMP,
                                  "distributed.max_failures=1"))
    assert not fault.exists()  # a worker took it, and raised
    state = load_checkpoint(failed.checkpoint)
    assert state["iteration"] == 6 and state["resumed_from"] == [2]
    assert weights_difference(failed.checkpoint, two_worker_student.checkpoint) == 0.0
    # negative control: the comparison sees the last two steps (checkpoint 4 vs 6)
    assert weights_difference(str(Path(failed.run_dir) / "checkpoint_0000004" / CHECKPOINT_FILE),
                              two_worker_student.checkpoint) > 1e-6
