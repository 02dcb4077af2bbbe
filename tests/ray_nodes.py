"""Real Ray nodes for the cluster tests: each `ray start --block` node with its own temp dir and working directory,
as separate machines have them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import descendants, free_port

BIN = Path(sys.executable).parent


class RayNode:
    """One `ray start --block` node with its own temp dir and working directory; `kill` is a machine loss."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str], args: list[str]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"r{name}", dir="/tmp"))  # short: Ray's socket paths
        workdir = tmp / name
        workdir.mkdir()
        ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                        "metrics-export-port", "runtime-env-agent-port")]
        self.log = (tmp / f"{name}.log").open("w")
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", *args, *ports, "--temp-dir", str(self.temp_dir),
                                      "--disable-usage-stats", "--block"],
                                     cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> None:
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


def wait_for_dashboard(port: int, head: RayNode, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # answering (e.g. 401: the token is required)
            return
        except OSError:
            assert head.proc.poll() is None, "the head node did not start"
            assert time.monotonic() < deadline, f"the dashboard did not answer on {port} in {timeout} s"
            time.sleep(0.5)


def ray_list(kind: str, dashboard: int, env: dict[str, str], *filters: str) -> list[dict]:
    """Ray's own `ray list` CLI (the State API) on the test cluster."""
    args = [str(BIN / "ray"), "list", kind, "--address", f"http://127.0.0.1:{dashboard}", "--format", "json",
            "--limit", "1000", *[a for f in filters for a in ("--filter", f)]]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    if "No resource in the cluster" in out:  # what the CLI prints for an empty list, even as JSON
        return []
    return json.loads(out[out.index("["):])
