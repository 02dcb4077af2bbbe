"""What the user watches: msad's own lines on the terminal, everything else (Ray's, Train's, Tune's, W&B's and
pycocotools' messages, workers' output forwarded by Ray) in a log file.

The split is made on file descriptors, not by parsing anyone's output: while `capture()` is active, descriptors 1
and 2 (and `sys.stdout` / `sys.stderr`) point at the log, so every library and every child process writes there;
msad's own lines go to the terminal through `Console`, which kept copies of the original descriptors, and are also
written to the log, so the log holds at least what the terminal showed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass
class Pace:
    """A run's iterations over time, from its reports: speed from the first to the latest report (start-up
    excluded; from `started` while only one came) and the time left."""

    total: int
    started: float = field(default_factory=time.time)
    points: list[tuple[float, int]] = field(default_factory=list)  # (time, iteration): the first and the latest

    def record(self, iteration: int) -> None:
        point = (time.time(), iteration)
        self.points = [self.points[0], point] if self.points else [point]

    @property
    def iteration(self) -> int:
        return self.points[-1][1] if self.points else 0

    def seconds_per_iteration(self) -> float | None:
        if len(self.points) >= 2 and self.points[-1][1] > self.points[0][1]:
            (t0, i0), (t1, i1) = self.points[0], self.points[-1]
            return (t1 - t0) / (i1 - i0)
        if self.points and self.points[-1][1] > 0:
            return (self.points[-1][0] - self.started) / self.points[-1][1]
        return None

    def eta(self) -> float | None:
        rate = self.seconds_per_iteration()
        return None if rate is None else rate * max(0, self.total - self.iteration)

    def bar(self, width: int) -> str:
        filled = min(width, width * self.iteration // max(1, self.total))
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.iteration}/{self.total}"


def ap_text(metrics: dict[str, Any], key: str = "AP") -> str:
    """'17.0 [15.5, 17.9]' (AP as a percentage, with its interval when the metrics hold one); '-' when absent."""
    value, low, high = (metrics.get(k) for k in (key, f"{key}_lo", f"{key}_hi"))
    if not isinstance(value, (int, float)):
        return "-"
    interval = f" [{100 * low:.1f}, {100 * high:.1f}]" if isinstance(low, float) and isinstance(high, float) else ""
    return f"{100 * value:.1f}{interval}"


def duration(seconds: float | None) -> str:
    """'42s', '7m05s', '2h03m'; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Console:
    """msad's own output: `event` lines (kept), a `status` block redrawn in place at the bottom of a terminal (not
    shown when the output is a file or a pipe), and `result` (tables, summaries) on standard output.

    Args:
        err: where events and the status block go (the terminal's standard error).
        out: where results go (the terminal's standard output).
        log: the log file, when the rest of the output is captured there; events and results are copied to it.
        live: whether to draw anything beyond what `print` would (False under `--verbose`: libraries print too).
    """

    def __init__(self, err: TextIO, out: TextIO, log: TextIO | None = None, live: bool = False) -> None:
        self.err, self.out, self.log, self.live = err, out, log, live
        self.tty = live and err.isatty()
        self.log_path: Path | None = None
        self._shown = 0  # lines of the status block now on screen
        self._block: list[str] = []  # the status block's lines, redrawn below each event

    def _clear(self) -> None:
        if self._shown:
            self.err.write(f"\x1b[{self._shown}F\x1b[J")  # up to the block's first line, erase to the end
            self._shown = 0

    def _copy_to_log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()

    def event(self, text: str) -> None:
        """A line that stays: a trial started, evaluated, ended or failed; a warning."""
        if self.tty:
            block = self._block
            self._clear()
            self.err.write(text + "\n")
            self.status(block)
        else:
            self.err.write(text + "\n")
        self.err.flush()
        self._copy_to_log(text)

    def status(self, lines: list[str]) -> None:
        """Replace the status block (a terminal only): lines are cut to the terminal's width so they never wrap."""
        self._block = list(lines)
        if not self.tty:
            return
        width = shutil.get_terminal_size((120, 24)).columns - 1
        self._clear()
        for line in lines:
            self.err.write(line[:width] + "\n")
        self._shown = len(lines)
        self.err.flush()

    def result(self, text: str) -> None:
        """Tables and summaries: standard output, after the status block is gone."""
        if self.tty:
            self._clear()
            self._block = []
        self.out.write(text + "\n")
        self.out.flush()
        self._copy_to_log(text)

    def warn(self, text: str) -> None:
        self.event(f"warning: {text}")


_current = Console(sys.stderr, sys.stdout)


def current() -> Console:
    """The console of the command now running (a plain one, printing to stderr/stdout, outside `capture`)."""
    return _current


class _Capture:
    """The descriptors a `capture()` replaced, and the file they now point at."""

    def __init__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.saved_streams = (sys.stdout, sys.stderr)
        self.file: TextIO = tempfile.TemporaryFile("w+", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (kept open until restore)
        self._point_at(self.file)

    def _point_at(self, file: TextIO) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        sys.stdout = sys.stderr = file

    def keep_in(self, path: Path) -> None:
        """Go on in `path` (appended to: a resumed run continues its log), with what was captured so far."""
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("a", buffering=1, encoding="utf-8", errors="replace")
        self.file.flush()
        self.file.seek(0)
        shutil.copyfileobj(self.file, log)
        self._point_at(log)
        self.file.close()
        self.file = log

    def restore(self) -> None:
        self.file.flush()
        sys.stdout, sys.stderr = self.saved_streams
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.close()


_active: _Capture | None = None


@contextmanager
def capture(verbose: bool = False) -> Iterator[Console]:
    """Send everything printed in this process (and by the processes it starts) to a log file and give msad a
    `Console` on the terminal. Until `keep_log` names the file, the log is an anonymous temporary file.

    With `verbose`, nothing is captured: the terminal shows everything, as the libraries print it.
    """
    global _current, _active
    if verbose or _active is not None:
        yield _current
        return
    taken = _Capture()
    err = os.fdopen(os.dup(taken.saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    out = os.fdopen(os.dup(taken.saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    previous, _current, _active = _current, Console(err, out, log=taken.file, live=True), taken
    try:
        yield _current
    finally:
        _current._clear()
        err.flush()
        out.flush()
        taken.restore()
        err.close()
        out.close()
        _current, _active = previous, None


def keep_log(path: Path) -> Path | None:
    """Make the active capture's log `path` (what it holds so far included); None when nothing is captured."""
    if _active is None:
        return None
    _active.keep_in(path)
    _current.log = _active.file
    _current.log_path = path
    return path


def stamp() -> str:
    """The time of day for event lines."""
    return time.strftime("%H:%M:%S")
