"""benchmarks/gpu_check.py on CPU: the dry-run runs every check to PASS; without --dry-run and no GPU it refuses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
CHECKS = ("teacher_ray_nccl", "student_ray_nccl", "amp_bf16", "amp_fp16", "syncbn_from_checkpoint",
          "fcos_step_vs_torchvision", "precision_steps")


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The script as a user runs it: its own process (and its own Ray, not this session's)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Cells of the final table's rows, by check name."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
             if line.startswith("| ")]
    return {row[0]: row for row in cells if row[0] in CHECKS}


def test_dry_run_passes_every_check(tmp_path: Path) -> None:
    proc = run_script("--dry-run", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert set(rows) == set(CHECKS)
    assert all(rows[name][1] == "PASS" for name in CHECKS), rows
    assert "dry-run: amp off" in rows["amp_bf16"][-1] and "dry-run: amp off" in rows["amp_fp16"][-1]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    by_name = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == list(CHECKS)
    assert all(r["status"] == "PASS" and r["seconds"] > 0 for r in report["rows"])
    teacher = by_name["teacher_ray_nccl"]["numbers"]
    assert isinstance(teacher["AP"], float) and 0.0 <= teacher["AP"] <= 1.0
    assert math.isfinite(teacher["loss_total"]) and Path(teacher["checkpoint"]).is_file()
    assert by_name["student_ray_nccl"]["numbers"]["loss_kd"] > 0
    for amp in ("amp_bf16", "amp_fp16"):
        numbers = by_name[amp]["numbers"]
        assert math.isfinite(numbers["loss_total"]) and 0.0 <= numbers["AP"] <= 1.0
        assert numbers["conv_dtypes"] == "float32"  # dry-run: no autocast
    assert by_name["syncbn_from_checkpoint"]["numbers"]["syncbn_modules"] > 0
    fcos = by_name["fcos_step_vs_torchvision"]["numbers"]
    assert fcos["ratio"] > 0 and fcos["ours_s"] > 0 and fcos["torchvision_s"] > 0
    precision = by_name["precision_steps"]["numbers"]  # on the CPU: fp32 and bf16 timed, fp16 is GPU-only
    assert precision["off_s"] > 0 and precision["bf16_s"] > 0 and "fp16_s" not in precision
    assert precision["auto_picks"] in ("off", "bf16")
    assert "| teacher_ray_nccl | PASS |" in (tmp_path / "gpu_check.md").read_text()
    assert report["environment"]["torch"] == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the GPU run would start")
def test_without_dry_run_and_no_gpu_exits_2(tmp_path: Path) -> None:
    proc = run_script("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == "gpu_check: no CUDA device (use --dry-run on CPU)"
    assert not (tmp_path / "gpu_check.json").exists()
