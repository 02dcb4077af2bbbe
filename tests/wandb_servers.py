"""Failing W&B servers on 127.0.0.1 for the outage tests, and the measurement of what each costs a run.

`FailingServer(kind)`: "503" answers every request with HTTP 503, "401" (a refused key) and "429" (rate limit or
quota) likewise; "silent" accepts connections and never answers; "closed" is a port nothing listens on.
`python tests/wandb_servers.py` times msad's `start_run` + `finish_run` (online, falling back to offline) against
each, with a 40-character key in a temporary netrc.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KINDS = ("503", "silent", "closed", "401", "429")
STATUS = {"503": 503, "401": 401, "429": 429}


ANALYTICS_PATH = "/sdk/otel/"  # wandb's own usage analytics (OpenTelemetry), sent without credentials


@dataclass(frozen=True)
class Request:
    """One request the server got: its path, its headers as text, its body."""

    path: str
    headers: str
    body: bytes

    def holds(self, secret: str) -> bool:
        """Whether `secret` is in the path, the body or a header, also inside HTTP basic auth (base64)."""
        decoded = [base64.b64decode(m, validate=False) for m in re.findall(r"Basic ([A-Za-z0-9+/=]+)", self.headers)]
        return (secret in self.path or secret in self.headers or secret.encode() in self.body
                or any(secret.encode() in d for d in decoded))


class _AnswerStatus(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.requests.append(Request(self.path, str(self.headers), body))  # type: ignore[attr-defined]
        answer = b'{"errors": [{"message": "failing on purpose"}]}'
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        """Quiet: tests read the server's hit counter, not a line per request on stderr."""


class FailingServer:
    """A W&B server that fails in one way, on 127.0.0.1; `url` for WANDB_BASE_URL, `hits`: requests (HTTP kinds) or
    connections (silent) it got. Use as a context manager."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r}; allowed: {KINDS}")
        self.kind = kind
        self._http: ThreadingHTTPServer | None = None
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._connections = 0
        self._stop = threading.Event()

    @property
    def requests(self) -> list[Request]:
        """The HTTP requests answered so far (HTTP kinds; none for "silent" and "closed")."""
        return list(self._http.requests) if self._http is not None else []  # type: ignore[attr-defined]

    @property
    def hits(self) -> int:
        return self._http.hits if self._http is not None else self._connections  # type: ignore[attr-defined]

    def __enter__(self) -> FailingServer:
        if self.kind in STATUS:
            self._http = ThreadingHTTPServer(("127.0.0.1", 0), _AnswerStatus)
            self._http.hits = 0  # type: ignore[attr-defined]
            self._http.requests = []  # type: ignore[attr-defined]
            self._http.status = STATUS[self.kind]  # type: ignore[attr-defined]
            self._http.daemon_threads = True
            self.port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, daemon=True).start()
        elif self.kind == "silent":
            self._listener = socket.create_server(("127.0.0.1", 0))
            self._listener.settimeout(0.2)
            self.port = self._listener.getsockname()[1]
            threading.Thread(target=self._accept_forever, daemon=True).start()
        else:  # a port that was free a moment ago: connections are refused
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _accept_forever(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._connections += 1
            self._held.append(conn)  # read nothing, answer nothing, close nothing

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._listener is not None:
            self._listener.close()
        for conn in self._held:
            conn.close()


class CommandLines:
    """Watches every process's whole command line (`ps -eww -o args`: plain `ps -eo args` cuts them at 80 columns
    when writing to a pipe) while it is open; `found`: lines holding `secret`."""

    def __init__(self, secret: str) -> None:
        self.secret, self.found, self.looks = secret, set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            lines = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout.splitlines()
            self.found.update(line for line in lines if self.secret in line)
            self.looks += 1
            self._stop.wait(0.3)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_netrc(home: Path, url: str, key: str) -> Path:
    """`~/.netrc` in `home` as `wandb login --host URL` writes it: an entry for the server's host:port."""
    host = url.split("://", 1)[1].rstrip("/")
    path = home / ".netrc"
    path.write_text(f"machine {host}\n  login user\n  password {key}\n")
    path.chmod(0o600)
    return path


def measure(kind: str, key: str = "msadmeasure" + "0123456789abcdef" * 2 + "abcdefghijklm") -> dict[str, float]:
    """Seconds a trial waits for W&B with this failing server: the first run (online tried, then offline), and a
    second run right after (W&B known to be failing: offline at once)."""
    import tempfile

    import wandb

    from msad.sweep import tracking

    with tempfile.TemporaryDirectory() as tmp, FailingServer(kind) as server:
        home = Path(tmp)
        write_netrc(home, server.url, key)
        saved = {k: os.environ.get(k) for k in ("HOME", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_API_KEY", "NETRC")}
        os.environ.update(HOME=str(home), WANDB_BASE_URL=server.url)
        for k in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
            os.environ.pop(k, None)
        wandb.teardown()
        try:
            assert tracking.wandb_mode("auto") == "online"
            times = {}
            for label in ("first run", "next run"):
                start = time.monotonic()
                run = tracking.start_run("online", home, project="msad-measure", dir=str(home), reinit="create_new")
                run.log({"x": 1.0}, step=1)
                tracking.finish_run(run, home)
                times[label] = time.monotonic() - start
            times["requests"] = server.hits
            return times
        finally:
            wandb.teardown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


if __name__ == "__main__":
    for kind in KINDS:
        print(kind, {k: round(v, 1) for k, v in measure(kind).items()}, flush=True)
