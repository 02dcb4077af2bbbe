"""W&B tracking: mode selection, secret scrubbing, and a real Tune run logged offline, read back with wandb's reader."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from msad.config import Config, TrackingConfig
from msad.errors import UserError
from msad.sweep.experiment_files import ExperimentFiles
from msad.sweep.tracking import make_wandb_callback, scrub_secrets, sync_command, wandb_mode
from msad.sweep.trials import REPLICATE_KEYS, TrialSummary

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
    assert make_wandb_callback(TrackingConfig(mode="disabled"), "exp", ExperimentFiles(str(tmp_path))) is None


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
    "student-w0.25-l128-kd0.5-t3": ("student", 0.5, 3.0, None),  # fails after two iterations
}


# what every report of a worker says it resolved (msad.engine.loop): the W&B run keeps it in its config
RESOLVED = {"precision": "precision: fp32 (auto: CPU test (no native bf16))", "compile": "torch.compile: off (test)"}


def _msad_config(role: str, kd_alpha: float | None) -> dict[str, Any]:
    config = Config().to_dict()
    config["train"]["role"] = role
    config["model"]["width"] = 0.25
    config["data"]["test_short_side"] = 256
    if kd_alpha is not None:
        config["train"]["kd_alpha"] = kd_alpha
    return config


def _trainable(config: dict[str, Any]) -> None:
    """Two training reports, then the trial's final metrics (as the sweep runner reports them last): the same
    iteration again, with the AP and the best checkpoint. One student fails instead."""
    from ray import tune

    for step in (1, 2):
        tune.report({"iteration": step, "loss_total": 2.0 / step, "lr": 0.01, **RESOLVED})
    _, _, _, ap = TRIALS[config["trial_name"]]
    if ap is None:
        raise RuntimeError("injected failure after iteration 2")
    tune.report({"iteration": 2, "loss_total": 1.0, "AP": ap, "AP50": 0.25, "best_checkpoint": "/ckpt/model.pt"})


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
    """A real Tune run with the sweep's two driver callbacks (W&B logger and report rows), W&B offline, a key in
    the driver's environment."""
    from ray import cloudpickle, tune

    from msad.sweep.callbacks import TrialSummaryCallback

    storage = tmp_path_factory.mktemp("tune")
    experiment_dir = storage / "exp"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_API_KEY", FAKE_KEY)  # in the driver's environment for the whole run: must be written nowhere
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    try:
        callback = make_wandb_callback(TrackingConfig(project="msad-test", mode="offline", tags=["sweep-test"]),
                                       "exp", ExperimentFiles(str(experiment_dir)))
        spec = lambda s: TRIALS[s.config.trial_name]  # noqa: E731
        tuner = tune.Tuner(
            _trainable,
            param_space={"trial_name": tune.grid_search(list(TRIALS)), "role": tune.sample_from(lambda s: spec(s)[0]),
                         "msad": tune.sample_from(lambda s: _msad_config(spec(s)[0], spec(s)[1]))},
            tune_config=tune.TuneConfig(max_concurrent_trials=3),
            run_config=tune.RunConfig(name="exp", storage_path=str(storage), verbose=0,
                                      callbacks=[callback, TrialSummaryCallback(callback.files, callback)]),
        )
        results = tuner.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        mp.undo()
    assert len(results.errors) == 1
    return experiment_dir


def test_tune_trials_become_offline_wandb_runs_named_grouped_and_tagged(tune_run: Path) -> None:
    run_dirs = sorted((tune_run / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 3 and all(len(list(d.glob("run-*.wandb"))) == 1 for d in run_dirs)
    runs = {run["display_name"]: run for run in map(_read_wandb_run, run_dirs)}
    assert set(runs) == set(TRIALS)
    for name, (role, kd_alpha, kd_temperature, ap) in TRIALS.items():
        run = runs[name]
        assert (run["project"], run["run_group"], run["job_type"]) == ("msad-test", "exp", role)
        assert run["tags"] == ["sweep-test", role, "w0.25", "exp"]

        expected = _msad_config(role, kd_alpha)
        assert {key: run["config"][key] for key in expected} == expected  # the whole msad config, sections nested
        assert not {"trial_name", "role", "msad"} & set(run["config"])  # Tune's trial config is not mixed in
        assert run["config"]["resolved"] == RESOLVED  # what train.amp / train.compile "auto" meant there

        summary = run["summary"]
        row_fields = {f.name for f in dataclasses.fields(TrialSummary)} - set(REPLICATE_KEYS)
        assert row_fields <= set(summary)  # the same keys on every run (the report row's), however it ended
        assert not set(REPLICATE_KEYS) & set(summary)  # the long per-resample lists stay in the JSON rows
        assert (summary["name"], summary["role"], summary["width"], summary["h_short_side"]) == (name, role, 0.25,
                                                                                                256)
        assert summary["gflops"] > 0 and summary["capacity"] > 0
        if ap is None:
            assert summary["status"] == "ERROR" and "injected failure after iteration 2" in summary["error"]
            assert summary["AP"] is None  # unmeasured: the key is there (NaN in the run, null in wandb's JSON)
        else:
            assert summary["status"] == "TERMINATED" and summary["error"] is None
            assert summary["AP"] == ap and summary["AP50"] == 0.25 and summary["checkpoint"] == "/ckpt/model.pt"
            assert summary["AP75"] is None
        if role == "student":
            assert (summary["kd_alpha"], summary["kd_temperature"]) == (kd_alpha, kd_temperature)
        else:
            assert summary["kd_alpha"] is None and summary["teacher_checkpoint"] is None
        # step = the msad iteration; the final report repeats iteration 2 and adds no point
        assert [h["_step"] for h in run["history"]] == [1, 2]
        assert [h["loss_total"] for h in run["history"]] == [2.0, 1.0]
        assert not math.isnan(summary["_runtime"])


def test_no_file_in_the_experiment_holds_the_api_key(tune_run: Path) -> None:
    files = [p for p in tune_run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name.endswith(".log") for p in files)
    assert [p for p in files if FAKE_KEY.encode() in p.read_bytes()] == []


def test_run_config_drops_credential_keys(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from msad.sweep.tracking import WandbTrialLogger

    trial = SimpleNamespace(config={"msad": {"distributed": {"aws_secret_access_key": PLANTED_SECRET, "x": 1}}})
    assert WandbTrialLogger.run_config(trial) == {"distributed": {"x": 1}}


def test_the_sweep_report_is_one_wandb_run_with_tables_and_the_plot(tmp_path: Path) -> None:
    """`log_report_run` after `write_report`: read back with wandb's reader, the logged table files and image."""
    from msad.sweep.report import write_report
    from msad.sweep.tracking import log_report_run
    from msad.sweep.trials import write_trial_summary
    from tests.test_compare import one_seed_sweep

    for summary in one_seed_sweep():
        write_trial_summary(tmp_path, summary)
    write_report(tmp_path)
    folder = log_report_run(TrackingConfig(project="msad-test", mode="offline", tags=["t"]), "exp",
                            ExperimentFiles(str(tmp_path)))
    run_dir = tmp_path / folder
    run = _read_wandb_run(run_dir)
    assert (run["run_group"], run["job_type"], run["display_name"], run["tags"]) == ("exp", "report", "exp-report",
                                                                                   ["t", "report", "exp"])
    assert run["summary"]["trials"] == 4 and run["summary"]["real_differences"] >= 2
    (logged,) = run["history"]

    def media(key: str, kind: str = "table-file") -> Path:  # wandb's reader flattens a media item: key._type
        assert logged[f"{key}._type"] == kind
        return run_dir / "files" / logged[f"{key}.path"]

    table = json.loads(media("report").read_text())
    assert table["columns"][:9] == ["Method", "Backbone", "Capacity", "Sched", "Width", "Role", "Resolution", "BoxAP",
                                    "95% CI"]
    assert [row[table["columns"].index("name")] for row in table["data"]] == [
        "teacher-w0.25-h256", "fcos-w0.25-l128", "student-w0.25-l128-kd0-t3", "student-w0.25-l128-kd0.2-t3"]
    comparisons = json.loads(media("comparisons").read_text())
    assert comparisons["columns"] == ["Comparison", "Seeds", "A", "B", "A - B", "Per seed", "95% CI", "Interval",
                                      "Real?"]  # the report's own comparisons table, per-seed values included
    verdicts = {row[0]: row[-1] for row in comparisons["data"]}
    assert verdicts["student w0.25 L128 KD 0.2 vs plain FCOS w0.25 L128"] is True
    assert verdicts["student w0.25 L128 KD 0.2 vs without KD"] is False
    assert media("ap_vs_capacity", "image-file").read_bytes().startswith(b"\x89PNG")


def test_persisted_step_reads_what_earlier_offline_folders_of_a_run_hold(tmp_path: Path) -> None:
    """A resumed sweep's offline run skips the steps its earlier folders hold (read by wandb's own reader), and only
    those: a folder of another run, or the new run's own, does not count."""
    import wandb

    from msad.sweep.tracking import base_settings, persisted_step

    folders = {}
    for run_id, steps in (("trial1", range(1, 6)), ("trial2", range(1, 9)), ("trial1", range(6, 8))):
        if run_id in folders:  # a folder is named by the second its run started: a resumed run's is a later one
            time.sleep(1.1)
        run = wandb.init(mode="offline", settings=base_settings(), dir=str(tmp_path), id=run_id, project="p",
                         resume="allow", reinit="create_new")
        for step in steps:
            run.log({"loss": 1.0 / step}, step=step, commit=True)
        folders.setdefault(run_id, []).append(Path(run.dir).parent)
        if run_id != "trial1" or len(folders[run_id]) == 1:
            run.finish()
    current = folders["trial1"][1]  # still open, as the resumed run is when it asks
    assert persisted_step(tmp_path, "trial1", exclude=current) == 5
    assert persisted_step(tmp_path, "trial2", exclude=current) == 8
    # negative control: the open run's own folder is what `exclude` leaves out (its steps are not "earlier")
    run.finish()
    assert persisted_step(tmp_path, "trial1", exclude=tmp_path / "none") == 7
    assert persisted_step(tmp_path, "trial3", exclude=current) == 0
