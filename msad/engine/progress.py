"""A single run's progress on the driver's terminal: a bar (iteration, rate, ETA, loss, lr) and one line per
evaluation.

Train V2 runs its callbacks on the controller actor, not on the driver, so `ReportForwarder` (a Train
`UserCallback`) puts rank 0's reported numbers on a Ray queue and `TrainProgress`, a thread on the driver, draws them.
On a terminal the bar is redrawn in place; otherwise (a file, `ray job logs`) it is a line per tenth of the run.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

from ray.train import UserCallback

from msad import console
from msad.console import Pace, ap_text, duration


class ReportForwarder(UserCallback):
    """On the Train controller: hands each report of rank 0 to the driver's queue, never failing the run for it."""

    def __init__(self, reports: Any) -> None:
        self.reports = reports  # a ray.util.queue.Queue (an actor handle: it travels to the controller)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        with contextlib.suppress(Exception):  # a full queue, or a driver gone: the bar is not worth the run
            self.reports.put_nowait({k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))})


class TrainProgress:
    """The driver's side: `with TrainProgress(...) as progress: trainer.fit(callbacks=[progress.forwarder])`.

    Args:
        name: the run's name, shown on the bar.
        iterations: the run's total iterations.
    """

    def __init__(self, name: str, iterations: int) -> None:
        from ray.util.queue import Queue

        self.name, self.iterations = name, iterations
        self.reports = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self.forwarder = ReportForwarder(self.reports)
        self.pace = Pace(iterations)
        self.latest: dict[str, Any] = {}
        self._tenths = -1
        self._precision_said = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="msad-progress", daemon=True)

    def __enter__(self) -> TrainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        con = console.current()
        con.status([])
        if con.tty and self.pace.points:  # the bar's last state stays on screen
            con.event(f"[{console.stamp()}] {self.bar()}")
        self.reports.shutdown()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.show(self.reports.get(timeout=0.5))
            except queue.Empty:
                continue
            except Exception:  # the queue's actor is gone (Ray shutting down)
                return

    def _drain(self) -> None:
        with contextlib.suppress(Exception):  # the queue's actor is gone (Ray shutting down)
            while not self.reports.empty():
                self.show(self.reports.get_nowait())

    def bar(self) -> str:
        rate = self.pace.seconds_per_iteration()
        speed = "?" if rate is None else (f"{1 / rate:.2f} it/s" if rate < 1 else f"{rate:.1f} s/it")
        loss, lr = self.latest.get("loss_total"), self.latest.get("lr")
        return (f"{self.name} {self.pace.bar(30)}  {speed}  ETA {duration(self.pace.eta())}"
                + (f"  loss {loss:.3f}" if isinstance(loss, float) else "")
                + (f"  lr {lr:.3g}" if isinstance(lr, float) else ""))

    def show(self, metrics: dict[str, Any]) -> None:
        """One report: the bar, plus a line for an evaluation (and, off a terminal, for each tenth of the run)."""
        it = int(metrics.get("iteration", 0))
        self.pace.record(it)
        self.latest = metrics
        con = console.current()
        if "precision" in metrics and not self._precision_said:  # what train.amp resolved to on the workers
            self._precision_said = True
            con.event(f"[{console.stamp()}] {metrics['precision']}; {metrics.get('compile', '')}".rstrip("; "))
            if "precision_warning" in metrics:
                con.warn(str(metrics["precision_warning"]))
        if "AP" in metrics:
            high = f"  H-branch AP {ap_text(metrics, 'H_AP')}" if "H_AP" in metrics else ""
            con.event(f"[{console.stamp()}] eval  it {it}/{self.iterations}  AP {ap_text(metrics)}{high}")
        tenths = 10 * it // max(1, self.iterations)
        if con.tty:
            con.status([self.bar()])
        elif tenths > self._tenths:
            self._tenths = tenths
            con.event(f"[{console.stamp()}] {self.bar()}")
