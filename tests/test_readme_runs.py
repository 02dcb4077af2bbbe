"""README's "Training runs" executed as written, from a fresh working directory, as separate `launch.py` processes.

Tiny-size overrides are appended to each documented command (and the README's checkpoint paths, which name the
config's iteration 300, point at the tiny run's last iteration instead). Along the way:
- the student names its teacher by a RELATIVE path, which must survive Ray's own working directories for trials
  and workers;
- the teacher runs side by side with a second, unrelated `launch.py train`, both without `--address`, while a Ray
  cluster started separately (as `ray start --head` does on a cluster's head) runs on the same machine: each must
  start a Ray of its own;
- `eval` of the student and `export` run from the checkpoints alone (a teacher's `eval`: tests/test_cli.py). That
  they never read `model.pretrained` is tested in tests/test_cli.py with a checkpoint whose config names an absent
  ImageNet file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 2
TINY = ["data.shapes.num_train=24", "data.shapes.num_val=6", "data.shapes.image_size=[96,128]",
        "data.shapes.object_size=[8,40]", "data.train_short_sides=[128]", "data.test_short_side=128",
        "data.num_workers=0", "model.fpn_channels=32", "model.gn_groups=8", "model.width_list=[0.25]",
        f"train.iterations={ITERATIONS}",
        "train.batch_per_worker=2", "train.lr_steps=[1]", "train.warmup_iters=1",
        f"train.checkpoint_period={ITERATIONS}", "train.eval_period=0", "train.log_period=1",
        "train.kd_warmup_iters=1"]


def readme_training_commands() -> list[list[str]]:
    """The `launch.py` command lines of README.md's "Training runs" block, continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Training runs", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("launch.py", 1)[1]) for line in commands if "launch.py" in line]


def launch(cwd: Path, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, what: str) -> str:
    return finish_with_stderr(proc, what)[0]


def finish_with_stderr(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    return out, err


def test_readme_training_runs_as_written(tmp_path: Path, shapes_cache: Path) -> None:
    teacher_cmd, student_cmd, eval_cmd = readme_training_commands()
    assert teacher_cmd[:2] == ["train", "configs/teacher_w025_cpu.yaml"] and student_cmd[0] == "train"
    assert eval_cmd[0] == "eval"
    work = tmp_path / "work"
    shutil.copytree(REPO / "configs", work / "configs")  # the README's relative config paths
    tiny = [f"data.shapes.cache_dir={shapes_cache}", *TINY]
    at_tiny_iteration = [arg.replace("checkpoint_0000300", f"checkpoint_{ITERATIONS:07d}") for arg in student_cmd]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    holder = subprocess.Popen([sys.executable, str(REPO / "tests" / "data" / "two_node_cluster.py"),
                               "--head-cpus", "1", "--worker-nodes", "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip(), "the separately started Ray cluster did not come up"
        teacher = launch(work, [*teacher_cmd, *tiny], env)
        neighbour = launch(work, ["train", "configs/fcos_w025_cpu.yaml", *tiny, "distributed.run_name=neighbour"],
                           env)
        (teacher_out, teacher_err), _ = (finish_with_stderr(teacher, "README teacher"),
                                         finish(neighbour, "second run side by side"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    teacher_summary = json.loads(teacher_out[teacher_out.index("{"):])
    assert teacher_summary["checkpoint"] == str(work / "runs" / "teacher-w0.25-h256" / f"checkpoint_{ITERATIONS:07d}"
                                                / "checkpoint.pt")
    assert (work / "runs" / "neighbour" / "final_metrics.json").is_file()
    # the terminal (a pipe here): where the log is, a progress line per report, the final evaluation; Ray's own
    # messages are in the run's train.log, with what the terminal showed
    log = work / "runs" / "teacher-w0.25-h256" / "train.log"
    shown = [line for line in teacher_err.splitlines() if not line.startswith("msad: generating")]  # a new cache
    assert shown[0].startswith("train teacher-w0.25-h256: 2 iterations on 1 worker(s)") and str(log) in shown[0]
    assert len(shown) <= 5 and any(f"] eval  it {ITERATIONS}/{ITERATIONS}  AP " in line for line in shown), shown
    assert any("] teacher-w0.25-h256 [" in line and f"] {ITERATIONS}/{ITERATIONS}  " in line for line in shown)
    assert "Started a local Ray instance" in log.read_text() and all(line in log.read_text() for line in shown)
    # each started a Ray of its own (not the cluster started separately, not each other's): its own dashboard
    neighbour_log = (work / "runs" / "neighbour" / "train.log").read_text()
    dashboards = [re.findall(r"View the dashboard at \S*?(127\.0\.0\.1:\d+)", text)
                  for text in (log.read_text(), neighbour_log)]
    assert all(len(found) == 1 for found in dashboards) and dashboards[0] != dashboards[1], dashboards
    assert "Connecting to existing Ray cluster" not in log.read_text() + neighbour_log

    student_out = finish(launch(work, [*at_tiny_iteration, *tiny], env), "README student (relative teacher path)")
    student_summary = json.loads(student_out[student_out.index("{"):])
    assert student_summary["iteration"] == ITERATIONS

    eval_argv = [arg.replace("checkpoint_0000300", f"checkpoint_{ITERATIONS:07d}") for arg in eval_cmd]
    metrics = json.loads(finish(launch(work, [*eval_argv, *tiny], env), "README eval of the student"))
    assert metrics["role"] == "student"
    # the AP eval printed is pycocotools' AP of the detections it wrote, on the val annotations
    results = json.loads((work / "eval" / f"checkpoint_{ITERATIONS:07d}" / "coco_results.json").read_text())
    assert metrics["AP"] == pytest.approx(_pycocotools_ap(work, tiny, results), abs=1e-6)
    finish(launch(work, ["export", student_summary["checkpoint"], "--output", "student.pt"], env), "export")
    assert (work / "student.pt").is_file()


def _pycocotools_ap(work: Path, overrides: list[str], results: list[dict]) -> float:
    """COCO box AP of `results` on the val annotations of the README's student config, with pycocotools alone, in the
    unit msad reports (a fraction); 0 when there is no detection."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from msad.build import resolve_data_paths
    from msad.config import load_config

    paths = resolve_data_paths(load_config(work / "configs" / "student_w025_cpu.yaml", overrides).data)
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(paths.val_annotations))
        check = COCOeval(truth, truth.loadRes(results), "bbox")
        check.evaluate()
        check.accumulate()
        check.summarize()
    return max(float(check.stats[0]), 0.0)


@pytest.mark.parametrize("address, message", [
    ("no-such-host:notaport", "--address no-such-host:notaport: invalid address; expected 'auto'"),
    ("127.0.0.1:1", "--address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1"),
])
def test_bad_address_is_one_line_exit_2(tmp_path: Path, shapes_cache: Path, address: str, message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "train", str(REPO / "configs" /
                           "teacher_w025_cpu.yaml"), "--address", address, f"data.shapes.cache_dir={shapes_cache}",
                           *TINY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
