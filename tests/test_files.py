"""The file helpers every writer and reader of weights goes through (msad.files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msad.checkpoint import CorruptCheckpointError
from msad.errors import UserError
from msad.files import read_tensor_file, write_atomically


class Payload:
    """Any class: pickled by reference, so safe loading must refuse it."""


def test_a_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "rows.json"
    write_atomically(target, lambda f: f.write(b"old"))
    assert target.read_bytes() == b"old"

    def half_then_crash(f) -> None:
        f.write(b"new but ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_crash)
    assert target.read_bytes() == b"old"  # readers never see the half-written file
    assert [p.name for p in target.parent.iterdir()] == ["rows.json"]  # the temp file is gone
    write_atomically(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"


def test_tensor_files_load_safely_with_one_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "w.pt"
    torch.save({"model": {"w": torch.ones(2)}}, good)
    assert torch.equal(read_tensor_file(good, "weights file")["model"]["w"], torch.ones(2))
    with pytest.raises(UserError, match=r"weights file .*nope\.pt does not exist"):
        read_tensor_file(tmp_path / "nope.pt", "weights file")
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CorruptCheckpointError, match=r"t\.pt: unreadable checkpoint \(") as caught:
        read_tensor_file(truncated, "checkpoint", CorruptCheckpointError)
    assert "\n" not in str(caught.value)
    unsafe = tmp_path / "u.pt"  # weights_only refuses arbitrary objects: loading never runs code from the file
    torch.save({"x": Payload()}, unsafe)
    with pytest.raises(UserError, match=r"u\.pt: unreadable weights file \("):
        read_tensor_file(unsafe, "weights file")
