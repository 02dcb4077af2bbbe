"""Ray's files on a local or NFS storage path are written whole (msad.storage.AtomicLocalHandler).

Tune writes its resume state (experiment_state-*.json, the searcher's state) and Train its checkpoint list in place;
a driver SIGKILLed in the middle of such a write left them empty, and `--resume` restarted the experiment (found by
the chaos test). These tests kill a real writer half-way through a real file, through the filesystem msad hands to
Ray, and through pyarrow's plain local filesystem as the negative control.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from msad import storage

OLD = b'{"trial_data": ["the whole previous state"]}'

# writes OLD whole, then starts writing the new state the way Train writes its checkpoint list
# (storage_filesystem.open_output_stream) and is SIGKILLed half-way
WRITER = """
import sys, time
import pyarrow.fs as pafs
from msad import storage
path, kind = sys.argv[1], sys.argv[2]
fs = storage.ray_storage(path)[1] if kind == "msad" else pafs.LocalFileSystem()
with fs.open_output_stream(path) as f:
    f.write(sys.argv[3].encode())
f = fs.open_output_stream(path)
f.write(b'{"trial_data": [')
f.flush()
print("half", flush=True)
time.sleep(60)
"""


def _kill_half_way(path: Path, kind: str) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), kind, OLD.decode()], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"half\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)


def test_a_writer_killed_half_way_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    state = tmp_path / "experiment_state-2026-12-08.json"
    _kill_half_way(state, "msad")
    assert state.read_bytes() == OLD
    # what it left is hidden and does not end like a file that Tune restores (.json, .pkl)
    leftovers = [p.name for p in tmp_path.iterdir() if p != state]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{state.name}.") and leftovers[0].endswith(".partial")


def test_negative_control_pyarrows_local_filesystem_leaves_half_a_file(tmp_path: Path) -> None:
    state = tmp_path / "experiment_state-2026-12-08.json"
    _kill_half_way(state, "plain")
    assert state.read_bytes() == b'{"trial_data": ['  # what made --resume start over


def test_files_written_and_copied_through_ray_are_whole_with_the_usual_permissions(tmp_path: Path) -> None:
    from ray.train._internal.storage import _download_from_fs_path, _upload_to_fs_path

    _, fs = storage.ray_storage(str(tmp_path))
    source = tmp_path / "local" / "checkpoint_0000004"
    source.mkdir(parents=True)
    payload = os.urandom(3 << 20)
    (source / "checkpoint.pt").write_bytes(payload)
    (source / "checkpoint.pt.sha256").write_text("abc\n")
    target = tmp_path / "store" / "run" / "checkpoint_0000004"
    _upload_to_fs_path(str(source), fs, str(target))  # how Ray uploads a checkpoint and Tune its state
    assert (target / "checkpoint.pt").read_bytes() == payload
    assert (target / "checkpoint.pt.sha256").read_text() == "abc\n"
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]  # no leftovers
    plain = tmp_path / "plain.txt"
    with pafs.LocalFileSystem().open_output_stream(str(plain)) as f:
        f.write(b"x")
    assert stat.S_IMODE((target / "checkpoint.pt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    back = tmp_path / "back"
    _download_from_fs_path(fs, str(target), str(back))
    assert (back / "checkpoint.pt").read_bytes() == payload
    fs.copy_file(str(target / "checkpoint.pt"), str(tmp_path / "copy.pt"))
    assert (tmp_path / "copy.pt").read_bytes() == payload


def test_a_copy_that_fails_half_way_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "searcher-state.pkl"
    target.write_bytes(OLD)
    handler = storage.AtomicLocalHandler()
    with pytest.raises(OSError):
        handler.copy_file(str(tmp_path), str(target))  # a folder: reading it fails after the temp file exists
    assert target.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["searcher-state.pkl"]


def test_the_handler_travels_to_rays_processes_and_compares_equal() -> None:
    import pickle

    _, fs = storage.ray_storage("/tmp/anywhere")
    assert pickle.loads(pickle.dumps(fs)) == fs
    assert fs.type_name == "py::msad-atomic+local"


def test_local_checkpoints_are_read_where_they_are_and_object_store_ones_copied() -> None:
    """Ray's as_directory() copies a checkpoint on any filesystem but pyarrow's own local one into a temp folder that
    a node's workers share: a two-worker run restoring through it hung (one worker evaluating, one reporting)."""
    assert storage.local_folder(storage.ray_storage("/tmp/runs")[1], "/tmp/runs/a/checkpoint_0000004") == Path(
        "/tmp/runs/a/checkpoint_0000004")
    assert storage.local_folder(pafs.LocalFileSystem(), "/x") == Path("/x")
    s3 = pafs.PyFileSystem(storage.RetryingHandler("s3://bucket/runs?endpoint_override=127.0.0.1:9", 1.0))
    assert storage.local_folder(s3, "bucket/runs/a/checkpoint_0000004") is None
