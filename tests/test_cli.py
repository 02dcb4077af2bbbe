"""CLI: exit codes, one-line user errors, help for every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msad.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_launch_py_missing_config_one_line_exit_2() -> None:
    proc = subprocess.run([sys.executable, "launch.py", "train", "does/not/exist.yaml"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: does/not/exist.yaml: config file not found"
    assert "Traceback" not in proc.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "msad"
    assert script.exists(), "pip install -e . should install the `msad` console script"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sweep" in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "--address" in capsys.readouterr().out


def test_misspelt_key_in_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  kd_alhpa: 0.3\n")
    code, _, err = run_main(capsys, "train", str(cfg))
    assert code == 2
    assert err == "error: unknown key train.kd_alhpa (did you mean train.kd_alpha?)\n"


def test_bad_override_value(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code, _, err = run_main(capsys, "train", str(cfg), "train.base_lr=-1")
    assert code == 2 and err.count("\n") == 1
    assert "train.base_lr: invalid value -1.0; allowed: a number > 0" in err


def test_bad_yaml_line_number(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  iterations: 5\n bad: [\n")
    code, _, err = run_main(capsys, "train", str(cfg))
    assert code == 2 and "c.yaml: invalid YAML at line 3" in err and err.count("\n") == 1


def test_student_without_teacher_refused_before_ray(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("train:\n  role: student\n")
    code, _, err = run_main(capsys, "train", str(cfg))
    assert code == 2 and "train.teacher_checkpoint" in err


def test_bare_sweep_spec_is_routed(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "--address", "auto", "sweeps/missing.yaml")
    assert code == 2 and err == "error: sweeps/missing.yaml: sweep file not found\n"


def test_unknown_option_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "capacity", "--jsn")
    assert code == 2 and err.count("\n") == 1 and "unrecognized arguments: --jsn" in err


def test_eval_requires_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code, _, err = run_main(capsys, "eval", str(cfg))
    assert code == 2 and "--weights" in err
    code, _, err = run_main(capsys, "eval", str(cfg), "--weights", str(tmp_path / "none.pt"))
    assert code == 2 and "none.pt: checkpoint not found" in err


def test_report_missing_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "report", str(tmp_path / "nope"))
    assert code == 2 and f"{tmp_path / 'nope'}: no sweep results there (expected results/*.json)" in err
    assert not (tmp_path / "nope").exists()  # nothing written for a wrong path


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys)
    assert code == 2 and "usage:" in out


def test_eval_never_reads_model_pretrained(teacher_run, tmp_path: Path, shapes_cache: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A teacher trained from ImageNet weights keeps their path in its config; `eval` on a machine without that
    file must still work (every weight is in the checkpoint). Before, it rebuilt the model with the file and failed."""
    from msad.checkpoint import load_checkpoint, save_checkpoint

    cfg, result = teacher_run
    state = load_checkpoint(result.checkpoint)
    state["config"]["model"]["pretrained"] = "/nowhere/s_resnet50_0.25_0.5_0.75_1.0.pt"
    weights = save_checkpoint(state, tmp_path / "teacher.pt")
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": cfg.to_dict()["data"], "model": {"num_classes": cfg.model.num_classes,
                                                                               "pretrained": "/nowhere/either.pt"}}))
    code, out, err = run_main(capsys, "eval", str(config), "--weights", str(weights), "--output", str(tmp_path / "e"))
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["role"] == "teacher" and 0.0 <= metrics["AP"] <= 1.0
