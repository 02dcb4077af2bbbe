"""Chaos benchmark: a sweep on a three-node `ray start` cluster whose worker nodes are SIGKILLed at random moments
(and whose driver is SIGKILLed once, then run again with `--resume`) ends with the weights of the same sweep run
without faults; how long each recovery took and how much work each kill cost.

The cluster: a head (1 CPU: the trial drivers only) and two worker nodes (1 CPU each: one Train worker), each
`ray start --block` with its own temp and working directory, as separate machines have them. The sweep: two teacher
widths, a student for each (KD ramp over half its iterations), two trials at a time, tiny synthetic data, W&B
offline. It runs twice on the same cluster: first without faults (the reference), then with the killer:

- a node kill every `--gap` seconds (uniform, seeded): a random live worker node loses its raylet and every process
  under it, as when a machine disappears; a replacement joins `--replace-after` seconds later, as an autoscaler
  would add one;
- the driver (`launch.py`) is SIGKILLed once, the moment the first teacher's result row is written (between a
  teacher's end and Tune's next experiment checkpoint, or inside Tune's write of it; `--driver-kill-delay` waits
  longer), Ray's state API is asked until no placement group of the killed driver's is left, and the same command
  runs again with `--resume`.

Pass: every trial TERMINATED; every teacher's and student's final weights identical to the reference's (max
difference 0); each trial's W&B history (its offline folders in order) holds no iteration twice, and misses only
the reports a killed driver never received (Train had them, with their checkpoint; training resumed after them).
For each kill: the Train workers alive on the node, the trials it hit, the time from the kill to each one's first
reported iteration afterwards (recovery, which includes that one iteration), and the iterations trained and thrown
away (the last one reported before the kill minus the checkpoint it resumed from).

    python benchmarks/chaos.py --out runs/chaos --teacher-iterations 120 --student-iterations 60   # ~8 min, 2 cores
    python benchmarks/chaos.py --out runs/chaos --quick   # one width, the driver kill and one node kill (3 min)

The cluster helpers come from the test suite (`tests/ray_nodes.py`, `tests/conftest.py`), which starts the same
kind of cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import free_port, tiny_sweep, train_undisturbed, wait_until, wandb_steps, weights_difference  # noqa: E402
from ray_nodes import BIN, RayNode, ray_list, wait_for_dashboard  # noqa: E402

from msad.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint  # noqa: E402
from msad.sweep.trials import read_trial_summaries  # noqa: E402


@dataclass
class Kill:
    at: float  # time.time() of the SIGKILL
    target: str  # a node's name, or "driver"
    train_workers: int | None = None  # Ray Train workers alive on the node just before (Ray's state API)


@dataclass
class Cluster:
    """A head and worker nodes started with `ray start`; nodes are named (`--node-name`) so that Ray's node list
    maps the ids in the reports back to them."""

    tmp: Path
    env: dict[str, str]
    gcs: int = field(default_factory=free_port)
    dashboard: int = field(default_factory=free_port)
    workers: dict[str, RayNode] = field(default_factory=dict)
    started: int = 0

    def __post_init__(self) -> None:
        self.head = RayNode(self.tmp, "head", self.env,
                            ["--head", f"--port={self.gcs}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={free_port()}",
                             "--node-name=head"])
        try:
            wait_for_dashboard(self.dashboard, self.head)
        except BaseException:
            self.shutdown()
            raise

    def add_worker(self) -> str:
        self.started += 1
        name = f"worker{self.started}"
        self.workers[name] = RayNode(self.tmp, name, self.env, ["--address", f"127.0.0.1:{self.gcs}",
                                                                "--num-cpus=1", f"--node-name={name}"])
        return name

    def kill_worker(self, name: str) -> Kill:
        """SIGKILL a worker node; the kill, with how many Train workers were alive there (from a trial training or
        starting there: a start-up has no report to tell it by)."""
        node_id = {name: node for node, name in self.node_names().items()}[name]
        workers = ray_list("actors", self.dashboard, self.env, "class_name=RayTrainWorker", "state=ALIVE",
                           f"node_id={node_id}")
        kill = Kill(time.time(), name, len(workers))
        self.workers.pop(name).kill()
        return kill

    def node_names(self) -> dict[str, str]:
        """Node id -> node name, dead nodes included."""
        return {n["node_id"]: n["node_name"] for n in ray_list("nodes", self.dashboard, self.env)}

    def live_placement_groups(self) -> list[dict]:
        return [pg for pg in ray_list("placement-groups", self.dashboard, self.env) if pg["state"] != "REMOVED"]

    def shutdown(self) -> None:
        for node in [*self.workers.values(), self.head]:
            if node.proc.poll() is None:
                node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def sweep_file(out: Path, name: str, widths: list[float], teacher_iterations: int, student_iterations: int,
               workers: int = 1) -> Path:
    return tiny_sweep(out, out / "cache", name, {
        "teachers": {"grid": {"model.width": widths}},
        "students": {"grid": {"model.width": widths}, "config": {"train": {
            "iterations": student_iterations, "lr_steps": [student_iterations - 1], "eval_period": student_iterations,
            "kd_warmup_iters": student_iterations // 2}}},  # the KD ramp spans most kills
        "max_concurrent_trials": 2,
    }, iterations=teacher_iterations, config={
        "model": {"width_list": widths},
        # 1 CPU per worker: only worker nodes have a whole one free (the head's goes to trial drivers)
        "distributed": {"num_workers": workers, "cpus_per_worker": 1, "max_failures": 20},
    })


class Sweep:
    """`launch.py SWEEP --address` as a user runs it against a cluster; its output goes to a log file."""

    def __init__(self, path: Path, cluster: Cluster, log: Path) -> None:
        self.path, self.cluster, self.log = path, cluster, log
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "launch.py"), str(self.path), "--address", f"127.0.0.1:{self.cluster.gcs}",
                 *extra], cwd=self.path.parent, env=self.cluster.env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)  # `kill -9 PID`: the driver only, as an OOM killer would
        self.proc.wait(timeout=30)


def run_reference(out: Path, cluster: Cluster, widths: list[float], args: argparse.Namespace) -> dict[str, Path]:
    """The fault-free sweep on the same cluster; each trial's final checkpoint."""
    path = sweep_file(out, "reference", widths, args.teacher_iterations, args.student_iterations, args.workers)
    sweep = Sweep(path, cluster, out / "reference.log")
    start = time.monotonic()
    sweep.start()
    assert sweep.proc is not None
    if sweep.proc.wait(timeout=args.timeout) != 0:
        raise RuntimeError(f"the fault-free sweep failed; see {sweep.log}")
    print(f"fault-free sweep: {time.monotonic() - start:.0f} s", flush=True)
    return {row.name: Path(row.checkpoint) for row in read_trial_summaries(out / "runs" / "reference")}


def run_chaos(out: Path, cluster: Cluster, widths: list[float], args: argparse.Namespace) -> tuple[Path, list[Kill],
                                                                                                  dict[str, float]]:
    """The same sweep under the killer; returns the experiment folder, the kills and the driver kill's numbers."""
    path = sweep_file(out, "chaos", widths, args.teacher_iterations, args.student_iterations, args.workers)
    home = out / "runs" / "chaos"
    sweep = Sweep(path, cluster, out / "chaos.log")
    rng = random.Random(args.seed)
    kills: list[Kill] = []
    driver: dict[str, float] = {}
    done = threading.Event()

    def kills_of_nodes() -> int:
        return sum(k.target != "driver" for k in kills)

    student_host: list[str] = []

    def student_node() -> str | None:
        """The node the student's Train worker runs on (its rank-0 worker's, with `--workers 2`),
        once the student has saved checkpoint `--kill-student-at` (in the middle of its KD ramp). One trial trains
        at a time here (quick: one width), so the live Train workers, asked of Ray's state API as the student
        starts, are the student's."""
        run = next(iter(home.glob("runs/student-*")), None)
        if run is None:
            return None
        if not student_host:
            workers = ray_list("actors", cluster.dashboard, cluster.env, "class_name=RayTrainWorker", "state=ALIVE")
            if len(workers) != args.workers:
                return None
            if args.workers == 1:
                student_host.append(cluster.node_names()[workers[0]["node_id"]])
            else:  # rank 0's node, where its reports come from (the state API lists workers in no rank order): the
                # kill then hits a worker whose reports time the recovery
                written = sorted(home.glob("student-*/result.json"), key=lambda f: f.stat().st_mtime)  # Tune's
                rows = reports(written[-1].parent) if written else []
                if not rows:
                    return None
                student_host.append(cluster.node_names()[rows[-1]["node_id"]])
        return student_host[0] if (run / f"checkpoint_{args.kill_student_at:07d}").exists() else None

    def node_killer() -> None:
        while True:
            if args.kill_student_at and not kills_of_nodes():
                name = None
                while name not in cluster.workers:
                    if done.wait(0.1):
                        return
                    name = student_node()
            elif done.wait(rng.uniform(*args.gap)) or kills_of_nodes() >= args.max_node_kills:
                return
            else:
                name = rng.choice(sorted(cluster.workers))
            try:
                kills.append(cluster.kill_worker(name))
            except (subprocess.SubprocessError, KeyError) as err:  # the state API did not answer: no kill this time
                print(f"could not kill {name}: {err}", flush=True)
                continue
            print(f"killed {name} at {datetime.now():%H:%M:%S}", flush=True)
            if done.wait(args.replace_after):
                return
            print(f"{cluster.add_worker()} joins", flush=True)

    start = time.monotonic()
    sweep.start()
    killer = threading.Thread(target=node_killer, daemon=True)
    killer.start()
    try:
        # the driver dies `--driver-kill-delay` s after the first teacher's row is written: Tune may not have
        # checkpointed the experiment since, so --resume must cope with a teacher that had ended. At 0 s the kill
        # can also land inside Tune's write of its experiment state: before Ray's files went through temp file +
        # rename (storage.AtomicLocalHandler) that left them empty, and --resume started over without the students
        wait_until(lambda: any((home / "results").glob("teacher-*.json")) or sweep.proc.poll() is not None,
                   args.timeout, "the first teacher's row", poll=0.05)
        time.sleep(args.driver_kill_delay)
        kills.append(Kill(time.time(), "driver"))
        sweep.kill()
        print(f"killed the driver at {datetime.now():%H:%M:%S}", flush=True)
        driver["placement_groups_gone_s"] = wait_until(lambda: not cluster.live_placement_groups(), 120,
                                                       "the killed driver's placement groups", poll=1.0)
        sweep.start("--resume")
        assert sweep.proc is not None
        sweep.proc.wait(timeout=args.timeout)
    finally:
        done.set()
        killer.join(timeout=60)
    if sweep.proc.returncode != 0:
        raise RuntimeError(f"the resumed sweep failed ({sweep.proc.returncode}); see {sweep.log}")
    print(f"sweep under chaos: {time.monotonic() - start:.0f} s, {len(kills)} kills", flush=True)
    return home, kills, driver


def reports(trial_dir: Path) -> list[dict]:
    """The trial's reports in the order Tune recorded them (every attempt, replayed iterations included)."""
    rows = []
    for line in (trial_dir / "result.json").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # read while Tune writes it: the last line may be partial
            continue
        if "reported_at" in row:
            rows.append({**row, "t": datetime.fromisoformat(row["reported_at"]).timestamp()})
    return rows


def step_seconds(rows: list[dict]) -> float:
    steps = [b["t"] - a["t"] for a, b in zip(rows, rows[1:], strict=False) if b["iteration"] == a["iteration"] + 1]
    return statistics.median(steps) if steps else float("nan")


def recoveries(home: Path, kills: list[Kill], names: dict[str, str]) -> list[dict]:
    """For each kill and each trial it hit: recovery seconds and iterations thrown away. A trial was hit by a node
    kill when Train workers were alive there and its last report before the kill came from that node, and by the
    driver kill when it reported on both sides of it."""
    # a trial's reports by its id: Tune may start a resumed trial in a second folder (`<name>_<suffix>`)
    names_of = {row.trial_id: row.name for row in read_trial_summaries(home)}
    trials: dict[str, list[dict]] = {}
    for d in sorted(home.iterdir()):
        if (d / "result.json").is_file():
            for row in reports(d):
                trials.setdefault(names_of.get(row.get("trial_id"), d.name), []).append(row)
    trials = {name: sorted(rows, key=lambda r: r["t"]) for name, rows in trials.items()}
    rows = []
    for kill in kills:
        hit = []
        for trial, runs in trials.items():
            before = [r for r in runs if r["t"] < kill.at]
            after = [r for r in runs if r["t"] > kill.at]
            if not before or not after:
                continue  # not started yet, or ended before the kill
            last = before[-1]
            # a node kill hits the trials whose workers were alive there (a driver kill may have ended them first)
            if kill.target != "driver" and (not kill.train_workers or names.get(last["node_id"]) != kill.target):
                continue
            first = after[0]
            later = [k.at for k in kills if kill.at < k.at < first["t"]]
            redone = max(last["iteration"] - (first["iteration"] - 1), 0)
            hit.append({"trial": trial, "recovery_s": first["t"] - kill.at, "cut_by_later_kill": bool(later),
                        "redone": redone, "redone_s": redone * step_seconds(runs),
                        # a report Train had (with its checkpoint) that never reached the killed driver
                        "reports_lost": max(first["iteration"] - 1 - last["iteration"], 0)})
        rows.append({"target": kill.target, "at": kill.at, "train_workers": kill.train_workers, "hit": hit})
    return rows


def undisturbed_checkpoints(home: Path, out: Path) -> dict[str, Path]:
    """The in-process reference: each trial's config (its config.yaml, as it ran) trained in this process without
    Ray or faults (a student from its teacher's file in this experiment, itself compared); final checkpoints."""
    checkpoints = {}
    for row in read_trial_summaries(home):
        run_dir = out / "undisturbed" / row.name
        train_undisturbed(home / "runs" / row.name / CONFIG_FILE, run_dir)
        iterations = load_checkpoint(row.checkpoint)["config"]["train"]["iterations"]
        checkpoints[row.name] = run_dir / f"checkpoint_{iterations:07d}" / CHECKPOINT_FILE
    return checkpoints


def compare(home: Path, reference: dict[str, Path]) -> list[dict]:
    """Each trial's row, its final weights against the reference's, and its W&B steps."""
    out = []
    for row in read_trial_summaries(home):
        folders = sorted((home / "wandb").glob(f"offline-run-*-{row.trial_id}"))
        steps = [s for folder in folders for s in wandb_steps(folder)]
        iterations = int(load_checkpoint(row.checkpoint)["config"]["train"]["iterations"])
        out.append({"trial": row.name, "status": row.status, "error": row.error,
                    "difference": weights_difference(row.checkpoint, reference[row.name]),
                    "wandb_folders": len(folders), "wandb_steps": len(steps),
                    "wandb_duplicates": len(steps) - len(set(steps)),
                    "wandb_missing": sorted(set(range(1, iterations + 1)) - set(steps))})
    return out


def markdown(compared: list[dict], kills: list[dict], driver: dict[str, float], seconds: dict[str, float]) -> str:
    lines = ["| trial | status | max weight difference vs fault-free | W&B folders | W&B steps (duplicated, missing) |",
             "|---|---|---:|---:|---|"]
    for c in compared:
        lines.append(f"| {c['trial']} | {c['status']} | {c['difference']:.3g} | {c['wandb_folders']} | "
                     f"{c['wandb_steps']} ({c['wandb_duplicates']}, {len(c['wandb_missing'])}) |")
    lines += ["", "| kill | at (s into the sweep) | Train workers there | trials hit (reporting) | recovery s (kill -> "
              "first iteration reported) | iterations redone | redone s | reports lost |",
              "|---|---:|---:|---|---|---|---|---|"]
    start = seconds["start"]
    for k in kills:
        hit = k["hit"]

        def column(key: str, fmt: str, hit: list[dict] = hit) -> str:
            return ", ".join(format(h[key], fmt) + ("*" if key == "recovery_s" and h["cut_by_later_kill"] else "")
                             for h in hit) or "-"

        workers = "-" if k["train_workers"] is None else k["train_workers"]
        lines.append(f"| {k['target']} | {k['at'] - start:.0f} | {workers} | {column('trial', 's')} | "
                     f"{column('recovery_s', '.1f')} | {column('redone', 'd')} | {column('redone_s', '.1f')} | "
                     f"{column('reports_lost', 'd')} |")
    lines += ["", "A trial is hit (reporting) when Train workers were alive on the node and the trial's last report "
              "before the kill came from there (the driver: every trial reporting on both sides of it). A node "
              "with Train workers but no trial hit was starting one (a restart after an earlier kill, or a new "
              "trial): that costs a start-up, seen only in the wall time. *: another kill came before this trial "
              "trained again (the time includes that one's recovery). Reports lost: iterations whose report (and "
              "checkpoint) Train had registered but the killed driver never received; training resumed after them, "
              "so neither Tune's results nor W&B have them."]
    reference = (f"fault-free sweep {seconds['reference']:.0f} s" if seconds["reference"] > 1
                 else "reference trained in-process")
    lines += ["", f"Placement groups of the killed driver gone after {driver.get('placement_groups_gone_s', 0):.1f} s; "
              f"{reference}; sweep under chaos {seconds['chaos']:.0f} s."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/chaos"),
                        help="output folder: new, empty, or an earlier run of this benchmark (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="the killer's random seed (which node, when)")
    parser.add_argument("--gap", type=float, nargs=2, default=[20.0, 45.0], metavar=("MIN", "MAX"),
                        help="seconds between node kills, uniform")
    parser.add_argument("--replace-after", type=float, default=5.0, help="seconds until a replacement node joins")
    parser.add_argument("--max-node-kills", type=int, default=100, help="stop killing nodes after this many")
    parser.add_argument("--driver-kill-delay", type=float, default=0.0,
                        help="seconds after the first teacher's row until the driver is killed (0: at once)")
    parser.add_argument("--kill-student-at", type=int, default=0,
                        help="the first node kill: the node the student trains on, once it has saved this checkpoint "
                             "(one width only; 0: random, as every later one)")
    parser.add_argument("--workers", type=int, default=1, choices=[1, 2],
                        help="Train workers per trial (1 CPU each: with 2, a trial spans both worker nodes)")
    parser.add_argument("--teacher-iterations", type=int, default=60)
    parser.add_argument("--student-iterations", type=int, default=30)
    parser.add_argument("--reference", choices=["sweep", "in-process"], default="sweep",
                        help="what the weights are compared with: the same sweep without faults on the same cluster, "
                             "or each trial's config trained in this process without Ray (cheaper: the CI version)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds any one wait may take")
    parser.add_argument("--quick", action="store_true",
                        help="one width, shorter runs, one node kill (with the driver kill): the CI version")
    args = parser.parse_args(argv)
    if args.workers > 1 and args.reference == "in-process":
        parser.error("--workers 2 needs --reference sweep: one process without Ray does not train as two workers")
    if args.quick:
        args.teacher_iterations, args.student_iterations, args.max_node_kills, args.kill_student_at = 24, 16, 1, 4
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = args.out.resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / "chaos.yaml").is_file():
        sys.exit(f"--out {out}: not empty and not an earlier chaos run (no chaos.yaml); nothing was deleted")
    shutil.rmtree(out, ignore_errors=True)  # an earlier run of this benchmark
    out.mkdir(parents=True)
    widths = [0.25] if args.quick else [0.25, 0.5]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               WANDB_MODE="offline", WANDB_SILENT="true", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    cluster = Cluster(out, env)
    try:
        for _ in range(2):
            cluster.add_worker()
        wait_until(lambda: sum(n["state"] == "ALIVE" for n in ray_list("nodes", cluster.dashboard, env)) == 3,
                   120, "three nodes", poll=1.0)
        t0 = time.monotonic()
        reference = run_reference(out, cluster, widths, args) if args.reference == "sweep" else {}
        t1 = time.monotonic()
        start = time.time()
        home, kills, driver = run_chaos(out, cluster, widths, args)
        seconds = {"reference": t1 - t0, "chaos": time.monotonic() - t1, "start": start}
        names = cluster.node_names()
    finally:
        cluster.shutdown()
    if args.reference == "in-process":
        reference = undisturbed_checkpoints(home, out)
    compared = compare(home, reference)
    hits = recoveries(home, kills, names)
    table = markdown(compared, hits, driver, seconds)
    print(table)
    result = {"compared": compared, "kills": hits, "driver": driver, "seconds": seconds, "nodes": names,
              # W&B's history: no step twice; a step is missing only where a driver kill lost its report
              "passed": all(c["status"] == "TERMINATED" and c["difference"] == 0.0 and c["wandb_duplicates"] == 0
                            for c in compared)
                        and sum(len(c["wandb_missing"]) for c in compared)
                        == sum(h["reports_lost"] for k in hits if k["target"] == "driver" for h in k["hit"])}
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    (out / "chaos.md").write_text(table + "\n")
    print("PASS" if result["passed"] else "FAIL", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
