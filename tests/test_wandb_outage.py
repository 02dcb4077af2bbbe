"""W&B down never stops a sweep: failing servers on 127.0.0.1 (503, no answer, closed port) with a well-formed
canary key in a netrc as `wandb login` writes it, and a malformed key; real wandb, real Ray, no mocks.

Each sweep must end with every trial's row, the report and offline W&B runs, one line on the terminal naming the
problem (its details in sweep.log), and the key in no file and no process command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import terminal_to_file, tiny_sweep
from wandb_servers import ANALYTICS_PATH, CommandLines, FailingServer, write_netrc

from msad.sweep.tracking import INIT_TIMEOUT_S, online_settings, wandb_mode
from msad.sweep.trials import read_trial_summaries

REPO = Path(__file__).resolve().parents[1]
CANARY = "msadoutage" + "0123456789abcdef" * 2  # 42 characters: a key wandb's client accepts
MALFORMED = "msadshort" + "0123456789abcdef" + "012345678"  # 34 characters: one it rejects before sending
TRIALS = {"teacher-w0.25-h128", "student-w0.25-l64-kd0.2-t3"}
ONE_TRIAL = {"teacher-w0.25-h128"}
WANDB_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC", "WANDB_DIR", "WANDB_CONFIG_DIR",
             "WANDB_CACHE_DIR", "WANDB_DATA_DIR")


def files_holding(secret: str, *roots: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Every regular file under `roots` (links not followed) whose bytes hold `secret`, `skip` left out."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_file() and not path.is_symlink() and path not in skip and secret.encode() in path.read_bytes():
                found.append(path)
    return found


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary HOME (wandb's ~/.netrc, ~/.config/wandb, ~/.cache/wandb), no W&B variables, and a fresh wandb
    session before and after (wandb reads its environment once per session)."""
    import wandb

    home = tmp_path / "home"
    home.mkdir()
    for var in WANDB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    wandb.teardown()
    yield home
    wandb.teardown()


@pytest.fixture
def fresh_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    """No W&B failure reported yet in this process (each sweep is a process of its own)."""
    from msad.sweep import tracking

    monkeypatch.setattr(tracking, "_problems", {})


@pytest.mark.parametrize("where", ["environment", "netrc"])
def test_a_malformed_key_means_offline_runs_and_one_line(where: str, wandb_home: Path, fresh_problems: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from msad import console

    terminal = io.StringIO()
    monkeypatch.setattr(console, "_current", console.Console(terminal, terminal))  # msad's lines, as a sweep shows
    if where == "environment":
        monkeypatch.setenv("WANDB_API_KEY", MALFORMED)
        source = "WANDB_API_KEY"
    else:
        write_netrc(wandb_home, "https://api.wandb.ai", MALFORMED)
        source = f"{wandb_home / '.netrc'} (machine api.wandb.ai)"
    assert wandb_mode("online", "/exp") == wandb_mode("auto", "/exp") == "offline"
    assert terminal.getvalue().splitlines() == [
        f"warning: W&B (https://api.wandb.ai): {source}: API key must have 40+ characters, has 34; training goes on, "
        "W&B runs are kept offline: upload them later with: wandb sync /exp/wandb/offline-run-*"]
    assert MALFORMED not in terminal.getvalue()
    terminal.truncate(0)
    monkeypatch.setenv("WANDB_MODE", "offline")  # offline anyway: nothing to say
    assert wandb_mode("auto") == "offline"
    # negative control: a well-formed key is online, silently
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    assert wandb_mode("auto") == "online" and terminal.getvalue() == ""


def _sweep_file(tmp: Path, cache: Path, name: str, mode: str, students: bool = True) -> Path:
    """One teacher, then (with `students`) its student: one or two trials and the report run, one at a time."""
    body = {"teachers": {"grid": {"model.width": [0.25]}}, "max_concurrent_trials": 1}
    if students:
        body["students"] = {"grid": {"model.width": [0.25]}}
    return tiny_sweep(tmp, cache, name, body, config={"tracking": {"mode": mode}})


def _check_outcome(experiment: Path, terminal: list[str], server_url: str, trials: set[str] = TRIALS) -> None:
    """Every trial's row, the report, an offline W&B run per trial and one for the report; one W&B line."""
    from test_tracking import _read_wandb_run

    rows = {row.name: row for row in read_trial_summaries(experiment)}
    assert set(rows) == trials and all(row.status == "TERMINATED" for row in rows.values())
    assert (experiment / "report.md").read_text().count("| FCOS ") == len(trials)
    runs = [_read_wandb_run(d) for d in sorted((experiment / "wandb").glob("offline-run-*"))]
    assert sorted(run["display_name"] for run in runs) == sorted([*trials, f"{experiment.name}-report"])
    named = [line for line in terminal if f"W&B ({server_url})" in line]
    assert len(named) == 1, "\n".join(terminal)
    assert f"upload them later with: wandb sync {experiment}/wandb/offline-run-*" in named[0]
    others = [line for line in terminal if line != named[0]]  # the named line may quote wandb's "while retrying"
    assert not [line for line in others if re.search(r"wandb:|Traceback|[Rr]etry", line)], "\n".join(terminal)


# The three ways a server fails, each in one mode, both modes covered (what differs between them, how the mode
# is chosen, is tested without a sweep below); a sweep costs about 30 s on 2 cores.
OUTAGES = [("503", "online"), ("silent", "auto"), ("closed", "auto")]


@pytest.mark.parametrize(("kind", "mode"), OUTAGES)
def test_a_sweep_survives_a_failing_wandb_server(kind: str, mode: str, ray_session: None, tmp_path: Path,
                                                 shapes_cache: Path, wandb_home: Path, fresh_problems: None) -> None:
    import ray

    from msad.sweep.runner import run_sweep

    with FailingServer(kind) as server:
        os.environ["WANDB_BASE_URL"] = server.url  # undone by wandb_home's monkeypatch
        netrc = write_netrc(wandb_home, server.url, CANARY)
        assert wandb_mode(mode) == "online"  # the key is found for this server: W&B is really tried
        path = _sweep_file(tmp_path, shapes_cache, f"outage_{kind}", mode, students=kind == "503")
        with CommandLines(CANARY) as commands, terminal_to_file(tmp_path / "terminal.txt"):
            experiment = run_sweep(path, [])  # returns: the sweep ends normally (exit code 0 from launch.py)
        hits, requests = server.hits, server.requests
    terminal = (tmp_path / "terminal.txt").read_text().splitlines()
    _check_outcome(experiment, terminal, server.url, TRIALS if kind == "503" else ONE_TRIAL)
    log = (experiment / "sweep.log").read_text()
    waits = [float(s) for s in re.findall(r"wandb\.init online gave up after ([\d.]+) s", log)]
    assert len(waits) == 1 and waits[0] < INIT_TIMEOUT_S + 4, log[-3000:]  # once per sweep, bounded
    assert "Traceback" in log  # the details are in the log
    if kind != "closed":
        assert hits > 0  # the client did reach this server (not another one, not nothing)
    if kind == "503":  # the key was really loaded: wandb sent it (basic auth) to this server, and only there
        assert [r for r in requests if r.holds(CANARY)]

    # the canary: in no file of the experiment, of wandb (HOME) or of the test's Ray, in no command line
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    roots = (experiment, wandb_home, session, tmp_path / "terminal.txt")
    assert commands.looks > 10 and commands.found == set()
    assert files_holding(CANARY, *roots, skip=(netrc,)) == []
    # negative control: the same search finds a planted copy (and the netrc it skipped)
    planted = experiment / "wandb" / "planted.txt"
    planted.write_text(f"x{CANARY}y")
    assert set(files_holding(CANARY, *roots)) == {planted, netrc}


def test_the_command_line_watch_finds_a_planted_key() -> None:
    """Negative control of `CommandLines`: a process whose arguments hold the canary is seen."""
    with CommandLines(CANARY) as commands:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)", CANARY])
        proc.wait(timeout=30)
    assert any(CANARY in line for line in commands.found)


@pytest.mark.parametrize("kind", ["503", "silent", "closed", "401"])  # 429 fails as 503 does
def test_online_wandb_init_fails_against_each_server_within_the_bound(kind: str, wandb_home: Path,
                                                                     fresh_problems: None) -> None:
    """Negative control of the sweeps above: without msad's fallback, wandb.init itself raises against each failing
    server (a Tune callback that raises ends the sweep), and with msad's settings it gives up within seconds
    (wandb's defaults: 90 s and more per run)."""
    import wandb

    with FailingServer(kind) as server:
        os.environ["WANDB_BASE_URL"] = server.url
        write_netrc(wandb_home, server.url, CANARY)
        started = time.monotonic()
        with pytest.raises(Exception) as raised:  # noqa: B017 (wandb raises CommError, or others)
            wandb.init(mode="online", project="msad-test", dir=str(wandb_home), reinit="create_new",
                       settings=online_settings())
        waited = time.monotonic() - started
    assert waited < INIT_TIMEOUT_S + 4, f"{waited:.1f} s"
    assert CANARY not in str(raised.value)


def test_a_malformed_key_is_named_before_ray_starts_and_the_sweep_logs_offline(tmp_path: Path,
                                                                             shapes_cache: Path) -> None:
    """`python launch.py` with a 34-character WANDB_API_KEY (in the environment before Ray starts, so every Ray
    process inherits it): one line before Ray starts, exit 0, offline runs, the server never asked, the key
    written nowhere (experiment, HOME, this Ray's temp folder) and on no command line."""
    path = _sweep_file(tmp_path, shapes_cache, "malformed", "auto", students=False)
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="msadw", dir="/tmp"))  # short: Ray's socket paths must stay short
    try:
        with FailingServer("503") as server:
            env = {k: v for k, v in os.environ.items() if k not in WANDB_ENV}
            env.update(HOME=str(home), WANDB_API_KEY=MALFORMED, WANDB_BASE_URL=server.url, RAY_TMPDIR=str(ray_tmp),
                       PYTHONPATH=str(REPO))
            with CommandLines(MALFORMED) as commands:
                proc = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path)], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=420)
            requests = server.requests
        terminal = (proc.stderr + proc.stdout).splitlines()
        assert proc.returncode == 0, proc.stderr[-3000:]
        experiment = tmp_path / "runs" / "malformed"
        _check_outcome(experiment, terminal, server.url, ONE_TRIAL)
        (named,) = [i for i, line in enumerate(terminal) if f"W&B ({server.url})" in line]
        assert "WANDB_API_KEY: API key must have 40+ characters, has 34;" in terminal[named]
        started = [i for i, line in enumerate(terminal) if line.startswith("sweep malformed: 1 trial,")]
        assert started and named < started[0]  # named before Ray started (that line follows ray.init)
        # the malformed key was never sent: no request holds it, and the only requests the server got are wandb's
        # own analytics (OpenTelemetry, sent without credentials), never W&B's API
        assert not [r for r in requests if r.holds(MALFORMED)]
        assert all(r.path.startswith(ANALYTICS_PATH) and "Authorization" not in r.headers for r in requests), \
            [r.path for r in requests]
        sessions = list((ray_tmp / "ray").glob("session_2*"))
        assert len(sessions) == 1 and len(list(sessions[0].rglob("*.log"))) > 5  # this sweep's Ray wrote here
        assert commands.looks > 10 and commands.found == set()
        assert files_holding(MALFORMED, experiment, home, ray_tmp) == []
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
