"""An object-store outage changes nothing but the time it takes (issue: faults change nothing): the parts.

A real S3 server (moto) is reached through a TCP forwarder that the tests switch off and on
(`tcp_proxy.SwitchableProxy`): connections refused, open ones cut, the store's contents kept, as when an endpoint or
the network goes down. Here: the retry rule (what is retried, for how long, said how often), the sweep driver's own
uploads (kept, one line, uploaded after), and a store that stays down past `distributed.storage_retry_s` (the run
fails in one line naming the checkpoint). A whole sweep through an outage, on a real cluster: tests/test_node_loss.py.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
from conftest import make_tiny_config, wait_until
from tcp_proxy import SwitchableProxy, through

from msad import console, storage
from msad.engine.trainer import fit
from msad.errors import RunFailedError
from msad.sweep.experiment_files import ExperimentFiles


class Terminal(io.StringIO):
    def lines(self) -> list[str]:
        text, _ = self.getvalue(), self.truncate(0)
        self.seek(0)
        return text.splitlines()


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """msad's console lines of this test; this process's record of outages reset (other tests of the session may
    have come through one)."""
    for name, value in (("since", None), ("count", 0), ("said_until", 0.0)):
        monkeypatch.setattr(storage._Outage, name, value)
    lines = Terminal()
    monkeypatch.setattr(console, "_current", console.Console(lines, lines))
    return lines


def test_retrying_waits_out_an_outage_saying_so_once(terminal: Terminal, ray_session: None) -> None:
    attempts, slept = [], []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) <= 3:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7\nsecond line")
        return "stored"

    assert storage.retrying("writing s3://b/x", flaky, retry_s=60, sleep=slept.append) == "stored"
    assert len(attempts) == 4 and slept == [0.5, 1.0, 2.0]  # backoff
    err = terminal.lines()
    assert [line for line in err if "warning:" in line] == [
        "warning: the object store failed (writing s3://b/x: AWS Error NETWORK_CONNECTION during PutObject operation: "
        "curlCode: 7); msad retries for up to 60 s (distributed.storage_retry_s) and keeps training"]
    assert sum("answers again" in line for line in err) == 1
    (record,) = [r for r in storage.published_outages().values() if r["what"].startswith("writing s3://b/x: AWS")]
    storage.notice_outage(record)  # the same outage, published to the cluster and read back: not said twice
    assert terminal.lines() == []


def test_retrying_gives_up_in_one_line_naming_the_file_and_the_setting(terminal: Terminal) -> None:
    clock = iter(range(0, 1000, 3))  # each attempt takes 3 s

    def down() -> None:
        raise OSError("Could not connect to server")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage.time, "monotonic", lambda: float(next(clock)))
        with pytest.raises(storage.StorageUnavailableError) as failed:
            storage.retrying("uploading checkpoint_0000004 to bucket/run", down, retry_s=10, sleep=lambda s: None)
    assert str(failed.value).splitlines() == [
        "uploading checkpoint_0000004 to bucket/run: the object store kept failing for 9 s "
        "(distributed.storage_retry_s = 10): Could not connect to server"]
    # answers, not outages: raised at the first attempt (a wrong key must not wait 300 s to say so)
    for answer in (FileNotFoundError("Path does not exist 'b/none'"),
                   OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."),
                   OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation")):
        attempts: list[int] = []

        def answering(answer: OSError = answer, attempts: list[int] = attempts) -> None:
            attempts.append(1)
            raise answer

        with pytest.raises(type(answer)):
            storage.retrying("reading s3://b/none", answering, retry_s=60, sleep=lambda s: None)
        assert attempts == [1]
    assert [line for line in terminal.lines() if "warning" in line and "ACCESS_DENIED" in line] == []


def test_an_outage_of_another_process_reaches_the_terminal_once(terminal: Terminal) -> None:
    record = {"start": time.time() - 10.0, "seconds": 3.0, "what": "writing b/r/checkpoint_manager_snapshot.json: "
              "Could not connect"}
    storage.notice_outage(record)
    storage.notice_outage({**record, "start": record["start"] + 5})  # another process, the same outage
    assert terminal.lines() == [
        "warning: the object store failed for 3 s (writing b/r/checkpoint_manager_snapshot.json: Could not connect); "
        "training waited and went on: nothing lost"]
    storage.notice_outage({**record, "start": time.time() + 100.0})  # a new outage
    assert len(terminal.lines()) == 1


def test_experiment_files_wait_for_the_store_and_say_so_once(terminal: Terminal, s3_bucket: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep driver's uploads (rows, W&B runs, report) during an outage: kept locally, one line, all uploaded
    with the first upload after it."""
    proxy = SwitchableProxy(int(s3_bucket.rsplit(":", 1)[1]))
    prefix = f"files-{time.time_ns()}"
    monkeypatch.chdir(tmp_path)
    files = ExperimentFiles(storage.join(through(s3_bucket, proxy.port), prefix, "exp"))
    for item in ("results/teacher.json", "results/student.json", "report.md"):
        (files.local / item).parent.mkdir(parents=True, exist_ok=True)
        (files.local / item).write_text(item)
    direct = storage.join(s3_bucket, prefix, "exp")
    assert not files.upload("results/teacher.json")  # the proxy is off: the store is unreachable
    assert not files.upload("results/student.json")
    assert not storage.exists(storage.join(direct, "results"))
    proxy.on()
    try:
        assert files.upload("report.md")
    finally:
        proxy.off()
    for item in ("results/teacher.json", "results/student.json", "report.md"):
        assert storage.read_bytes(storage.join(direct, item)) == item.encode()
    lines = terminal.lines()
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the object store failed (uploading "
                                                         "results/teacher.json: "), lines
    assert warnings[0].endswith("uploaded with the next upload and at the end"), lines
    assert sum("answers again" in line for line in lines) == 1, lines
    assert lines[-1].startswith("the files that waited for the object store are in s3://"), lines
    # an outage another process came through at the same time is the same one: not told again
    storage.notice_outage({"start": time.time() - 20.0, "seconds": 15.0, "what": "writing x: Could not connect"})
    assert terminal.lines() == []


def test_a_checkpoint_upload_that_keeps_failing_fails_the_run_in_one_line(
        ray_session: None, s3_bucket: str, shapes_cache: Path, tmp_path: Path) -> None:
    proxy = SwitchableProxy(int(s3_bucket.rsplit(":", 1)[1]))
    proxy.on()
    prefix = f"fail-{time.time_ns()}"
    cfg = make_tiny_config(storage.join(through(s3_bucket, proxy.port), prefix), shapes_cache, "teacher",
                           "upload", "distributed.num_workers=1", "distributed.storage_retry_s=2", "train.iterations=8",
                           "train.lr_steps=[7]", "train.eval_period=8")
    snapshot = storage.join(s3_bucket, prefix, "upload", "checkpoint_manager_snapshot.json")

    def registered() -> list[str]:
        if not storage.exists(snapshot):
            return []
        return [r["checkpoint_dir_name"] for r in json.loads(storage.read_bytes(snapshot))["checkpoint_results"]]

    # off once Train has registered checkpoint 2: the next thing to reach the store is checkpoint 4's upload
    watcher = threading.Thread(target=lambda: (wait_until(lambda: "checkpoint_0000002" in registered(), 240,
                                                          "checkpoint 2 registered"), proxy.off()), daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        with pytest.raises(RunFailedError) as failed:
            fit(cfg)
    finally:
        proxy.off()
    line = str(failed.value)
    assert len(line.splitlines()) == 1 and time.monotonic() - start < 120
    assert line.startswith("run s3://") and "failed: rank 0: " in line, line
    assert "checkpoint_0000004" in line and "distributed.storage_retry_s = 2" in line, line


def test_a_store_that_never_answers_is_refused_in_one_line_in_seconds(s3_bucket: str) -> None:
    """A wrong endpoint (a closed port) looks like an outage, but before anything starts it is bad input: refused
    within the first-contact window, not after `distributed.storage_retry_s`; a missing bucket is named at once."""
    from msad.errors import UserError

    proxy = SwitchableProxy(int(s3_bucket.rsplit(":", 1)[1]))  # never switched on: connections are refused
    wrong = storage.join(through(s3_bucket, proxy.port), "exp")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"^distributed.storage_path: s3://.* did not answer in 2 s \(.*\); check "
                                        r"the bucket's endpoint \(endpoint_override=\.\.\.\)"):
        storage.check_reachable(wrong, within=2)
    assert time.monotonic() - start < 15  # the S3 client's own retries (6 s) once or twice, not minutes
    storage.check_reachable(storage.join(s3_bucket, "exp"))  # negative control: the store that answers passes
    missing = s3_bucket.replace("s3://", "s3://no-such-bucket-", 1)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"^distributed.storage_path: s3://no-such-bucket-.*: bucket .* does not exist"):
        storage.check_reachable(missing)
    assert time.monotonic() - start < 15
