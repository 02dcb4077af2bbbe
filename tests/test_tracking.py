"""W&B tracking: mode selection, secret scrubbing, and a real Tune run logged offline, read back with wandb's reader."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from msad.config import Config, TrackingConfig
from msad.errors import UserError
from msad.sweep.report import TrialSummary
from msad.sweep.tracking import SUMMARY_KEYS, make_wandb_callback, scrub_secrets, sync_command, wandb_mode

FAKE_KEY = "fakewandbkey0123456789abcdef0123456789abcd"  # 40 characters, like a real key
PLANTED_SECRET = "s3-secret-value-do-not-log"


@pytest.fixture
def no_wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No key in the environment, no WANDB_MODE, and an empty netrc; returns the netrc path to write to."""
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_explicit_modes_pass_through_and_bad_ones_are_user_errors() -> None:
    for mode in ("online", "offline", "disabled"):
        assert wandb_mode(mode) == mode
    with pytest.raises(UserError, match="tracking.mode: invalid value 'cloud'; allowed: auto, online"):
        wandb_mode("cloud")


def test_auto_is_offline_without_a_key(no_wandb_env: Path) -> None:
    assert wandb_mode("auto") == "offline"


def test_auto_is_online_with_a_key_in_the_environment(no_wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode("auto") == "online"


def test_auto_is_online_with_a_netrc_entry_for_the_wandb_host(no_wandb_env: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    no_wandb_env.write_text(f"machine example.com login user password other\nmachine api.wandb.ai login user "
                            f"password {FAKE_KEY}\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.internal")  # a W&B server: its own entry
    assert wandb_mode("auto") == "offline"
    no_wandb_env.write_text("machine api.wandb.ai login user\n")  # an entry without a key
    monkeypatch.delenv("WANDB_BASE_URL")
    assert wandb_mode("auto") == "offline"


def test_auto_follows_wandb_mode_in_the_environment(no_wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older word for offline
    assert wandb_mode("auto") == "offline"


def test_disabled_tracking_makes_no_callback(tmp_path: Path) -> None:
    assert make_wandb_callback(TrackingConfig(mode="disabled"), "exp", tmp_path) is None


def test_scrub_secrets_drops_credential_keys_at_any_depth() -> None:
    config = {"model": {"width": 0.25}, "WANDB_API_KEY": "k", "storage": {"aws_secret_access_key": "s", "token": 1,
              "endpoint": "http://x", "items": [{"password": "p", "user": "u"}], "apiKey": "k"}}
    assert scrub_secrets(config) == {"model": {"width": 0.25},
                                     "storage": {"endpoint": "http://x", "items": [{"user": "u"}]}}


def test_sync_command_quotes_the_folder_and_leaves_the_glob() -> None:
    assert sync_command(Path("/runs/paper")) == "wandb sync /runs/paper/wandb/offline-run-*"
    assert sync_command("/my runs/x") == "wandb sync '/my runs/x'/wandb/offline-run-*"


# ---------------------------------------------------------------------------------------------------------------------
# A real Tune run with the callback, W&B offline
# ---------------------------------------------------------------------------------------------------------------------

TRIALS = {
    "teacher-w0.25-h256": ("teacher", None, None, 0.0852),
    "student-w0.25-l128-kd0.2-t3": ("student", 0.2, 3.0, 0.1331),
}


def _msad_config(role: str) -> dict[str, Any]:
    config = Config().to_dict()
    config["train"]["role"] = role
    config["model"]["width"] = 0.25
    config["distributed"]["storage_credentials"] = {"aws_secret_access_key": PLANTED_SECRET}  # must be scrubbed
    return config


def _trainable(config: dict[str, Any]) -> None:
    """Two training reports, then the trial's summary (as the sweep runner reports it last)."""
    from ray import tune

    for step in (1, 2):
        tune.report({"iteration": step, "loss_total": 2.0 / step})
    role, kd_alpha, kd_temperature, ap = TRIALS[config["trial_name"]]
    summary = TrialSummary(
        name=config["trial_name"], role=role, width=0.25, h_short_side=256, l_short_side=128,
        resolution="H & L" if role == "teacher" else "L", kd_alpha=kd_alpha, kd_temperature=kd_temperature,
        iterations=2, sched="2it", capacity=0.085, capacity_at_run_resolution=0.0087, published_capacity=0.08,
        gflops=71.5, AP=ap, AP50=0.25, AP75=None, APs=0.01, APm=0.1, APl=0.2, status="TERMINATED", error=None,
        checkpoint="/ckpt/model.pt", teacher_checkpoint=None, trial_id=None)
    tune.report({"iteration": 3, **summary.tune_metrics()})


def _read_wandb_run(run_dir: Path) -> dict[str, Any]:
    """Run metadata, config, summary and history of an offline run, from its run-*.wandb file via wandb's own
    reader (`wandb leet inspect --json` prints the file's records, one JSON object per line)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": []}
    for record in map(json.loads, out.splitlines()):
        kind = record["type"]
        if kind == "run":
            run.update({key: record["run"].get(key) for key in ("run_group", "job_type", "display_name", "tags",
                                                                 "project")})
            run["config"].update(record["run"]["config"]["update"])
        elif kind == "config":
            run["config"].update(record["config"].get("update", {}))
        elif kind == "summary":
            run["summary"].update(record["summary"].get("update", {}))
        elif kind == "history":
            run["history"].append(record["history"]["item"])
    return run


@pytest.fixture(scope="module")
def tune_run(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ray import cloudpickle, tune

    storage = tmp_path_factory.mktemp("tune")
    experiment_dir = storage / "exp"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_API_KEY", FAKE_KEY)  # in the driver's environment for the whole run: must be written nowhere
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    try:
        callback = make_wandb_callback(TrackingConfig(project="msad-test", mode="offline", tags=["sweep-test"]),
                                       "exp", experiment_dir)
        role_of = lambda spec: TRIALS[spec.config.trial_name][0]  # noqa: E731
        tuner = tune.Tuner(
            _trainable,
            param_space={"trial_name": tune.grid_search(list(TRIALS)), "role": tune.sample_from(role_of),
                         "msad": tune.sample_from(lambda spec: _msad_config(role_of(spec)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=2),
            run_config=tune.RunConfig(name="exp", storage_path=str(storage), callbacks=[callback], verbose=0),
        )
        results = tuner.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        mp.undo()
    assert not results.errors
    return experiment_dir


def test_tune_trials_become_offline_wandb_runs_named_grouped_and_tagged(tune_run: Path) -> None:
    run_dirs = sorted((tune_run / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(len(list(d.glob("run-*.wandb"))) == 1 for d in run_dirs)
    runs = {run["display_name"]: run for run in map(_read_wandb_run, run_dirs)}
    assert set(runs) == set(TRIALS)
    for name, (role, kd_alpha, kd_temperature, ap) in TRIALS.items():
        run = runs[name]
        assert (run["project"], run["run_group"], run["job_type"]) == ("msad-test", "exp", role)
        assert run["tags"] == ["sweep-test", role, "w0.25"]

        expected = scrub_secrets(_msad_config(role))
        assert {key: run["config"][key] for key in expected} == expected  # the whole msad config, sections nested
        assert run["config"]["distributed"]["storage_credentials"] == {}
        assert not {"trial_name", "role", "msad"} & set(run["config"])  # Tune's trial config is not mixed in

        summary = run["summary"]
        assert set(SUMMARY_KEYS) <= set(summary)  # the same keys on every run, strings and missing values too
        assert (summary["name"], summary["role"], summary["status"]) == (name, role, "TERMINATED")
        assert (summary["width"], summary["h_short_side"], summary["capacity"], summary["gflops"]) == (
            0.25, 256, 0.085, 71.5)
        assert summary["AP"] == ap and summary["AP50"] == 0.25 and summary["sched"] == "2it"
        assert summary["AP75"] == "NaN"  # None is logged as NaN so the column exists; wandb's JSON spells it so
        if role == "student":
            assert (summary["kd_alpha"], summary["kd_temperature"]) == (kd_alpha, kd_temperature)
        else:
            assert summary["kd_alpha"] == "NaN" and summary["teacher_checkpoint"] == "NaN"
        assert [h["loss_total"] for h in run["history"] if "loss_total" in h] == [2.0, 1.0]
        assert [h["_step"] for h in run["history"]] == [1, 2, 3]  # Tune's training_iteration is the W&B step
        assert not math.isnan(summary["_runtime"])


def test_no_file_in_the_experiment_holds_the_api_key_or_a_scrubbed_secret(tune_run: Path) -> None:
    files = [p for p in tune_run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name.endswith(".log") for p in files)
    assert [p for p in files if FAKE_KEY.encode() in p.read_bytes()] == []
    # Tune itself stores the trial config (params.json, result.json); W&B's files must not hold the scrubbed value.
    assert [p for p in (tune_run / "wandb").rglob("*") if p.is_file() and PLANTED_SECRET.encode() in p.read_bytes()
            ] == []
