"""Command line: `launch.py SWEEP.yaml`, `train`, `eval`, `export`, `capacity`, `report`.

Parsing, config loading and user-facing errors live here; the work itself lives in msad.engine and msad.sweep.
A user error prints one line to stderr and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from msad import console
from msad.errors import RunFailedError, UserError

PROG = "launch.py"
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print only the error, in one line, and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see --help)")


GLOBAL_OPTIONS_HELP = ("global options, accepted before or after the command and between overrides: "
                       "--address auto|ray://HOST:10001|HOST:PORT (default: a private local Ray), --resume, "
                       "--verbose")


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: 'auto' (the cluster running on this machine, or RAY_ADDRESS), "
                             "'ray://HOST:10001' (Ray client) or HOST:PORT (its GCS); default: start a private "
                             "local Ray, whatever else runs on this machine")
    parser.add_argument("--resume", action="store_true", default=False,
                        help="continue the experiment or run of the same name from its checkpoints")
    parser.add_argument("--verbose", action="store_true", default=False,
                        help="print Ray's, Tune's and W&B's messages on the terminal (by default they go to the "
                             "sweep's sweep.log or the run's train.log, and the terminal shows progress and results)")


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    """One parser per command. Each takes the global options too, and parses intermixed (see `parse_command_line`)."""
    parsers: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = OneLineParser(prog=f"{PROG} {name}", description=help_text, epilog=GLOBAL_OPTIONS_HELP + ".")
        sub.help_text = help_text  # type: ignore[attr-defined]  # the one-line summary in the top-level help
        _add_global_options(sub)
        parsers[name] = sub
        return sub

    sweep = command("sweep", "run a sweep of teachers and students (the default: `launch.py SWEEP.yaml`)")
    sweep.add_argument("spec", help="sweep YAML, e.g. sweeps/quickstart.yaml")
    sweep.add_argument("overrides", nargs="*", help="section.key=value applied to every trial, over the sweep "
                       "file's config and its stages' config (keys the sweep varies are refused)")

    train = command("train", "train one teacher, student or plain FCOS with Ray Train")
    train.add_argument("config", help="config YAML, e.g. configs/teacher_w025_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value, values parsed as YAML")

    evaluate = command("eval", "evaluate a checkpoint (teacher, student or standalone student) on the val set")
    evaluate.add_argument("config", help="config YAML describing the data (the model comes from the checkpoint)")
    evaluate.add_argument("overrides", nargs="*", help="section.key=value")
    evaluate.add_argument("--weights", required=True, help="checkpoint file to evaluate")
    evaluate.add_argument("--branch", choices=["fused", "high", "low"], default="fused",
                          help="teacher branch to evaluate (ablation); ignored for students")
    evaluate.add_argument("--output", default=None, help="folder for the results JSON and metrics")

    export = command("export", "write a model at its width for deployment: sliced weights, TorchScript or ONNX, "
                               "checked against the training model")
    export.add_argument("checkpoint", help="training checkpoint of a student, teacher (fused branch) or plain FCOS")
    export.add_argument("--output", required=True, help="file to write (never overwritten)")
    export.add_argument("--format", choices=["pt", "torchscript", "onnx"], default="pt",
                        help="pt: weights-only sliced checkpoint (msad.deploy.load_exported); torchscript: runs with "
                             "torch alone, head outputs and detect(); onnx: head outputs (the 'deploy' extra)")

    convert = command("convert", "import an original MSAD (Detectron2) .pth file as an msad checkpoint")
    convert.add_argument("config", help="config YAML describing the model (width, channels, classes) and data")
    convert.add_argument("overrides", nargs="*", help="section.key=value")
    convert.add_argument("--original", required=True, help="the original project's .pth file")
    convert.add_argument("--output", required=True, help="msad checkpoint to write")

    capacity = command("capacity", "backbone capacity and detector GFLOPs per width and role, beside the paper's")
    capacity.add_argument("--json", action="store_true", help="print JSON rows for machines")
    capacity.add_argument("--latency", action="store_true",
                          help="also time each row's deployed network on this machine (batch 1, random weights)")
    capacity.add_argument("--sizes", choices=["cpu", "paper"], default="cpu",
                          help="--latency image sizes: cpu (H 256x384, L 128x192) or paper (H 800x1333, L 400x667)")
    capacity.add_argument("--repeats", type=int, default=3, help="--latency: timed runs per model (median)")

    report = command("report", "results table (Markdown + CSV) and AP-vs-capacity plot of an experiment")
    report.add_argument("experiment_dir", help="a sweep's experiment: <distributed.storage_path>/<sweep name>, a "
                        "folder or an s3:// URI (its report is then written locally and uploaded beside it)")
    return parsers


COMMAND_PARSERS = _command_parsers()
COMMANDS = tuple(COMMAND_PARSERS)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: `launch.py --help` (each command's own parser does the parsing)."""
    lines = "\n".join(f"  {name:<9} {parser.help_text}" for name, parser in COMMAND_PARSERS.items())  # type: ignore
    parser = OneLineParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [--address ADDRESS] [--resume] [--verbose] [COMMAND] ARGS [section.key=value ...]",
        description="msad: Multi-Scale Aligned Distillation on Ray. Run a sweep with "
                    f"`{PROG} SWEEP.yaml [section.key=value ...]`, or one of the commands below "
                    f"(`{PROG} COMMAND --help` for its arguments).",
        epilog=f"commands:\n{lines}\n\n{GLOBAL_OPTIONS_HELP}. Options and overrides may come in any order, e.g. "
               f"`{PROG} sweeps/paper.yaml --address auto model.pretrained=/w.pt --resume`.")
    _add_global_options(parser)
    return parser


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The command and the rest of the line; `launch.py SWEEP.yaml ...` means `launch.py sweep SWEEP.yaml ...`."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--address":  # the only global option that takes a separate value
            i += 2
            continue
        if token.startswith("-"):
            i += 1
            continue
        if token in COMMANDS:
            return token, [*argv[:i], *argv[i + 1:]]
        return "sweep", argv
    return None, argv


def parse_command_line(argv: list[str]) -> argparse.Namespace | None:
    """Parse a whole command line: flags and `section.key=value` overrides in any order, for every command.

    Returns None when there is no command (the caller prints the top-level help). argparse's intermixed parsing
    lets positionals (the file, the overrides) and options alternate, as users write them on clusters
    (`launch.py sweeps/paper.yaml --address auto model.pretrained=/w.pt`).
    """
    command, rest = _split_command(argv)
    if command is None:
        if any(token in ("-h", "--help") for token in rest):
            build_parser().print_help()
            raise SystemExit(0)
        build_parser().parse_args(rest)  # unknown options: one-line error
        return None
    args = COMMAND_PARSERS[command].parse_intermixed_args(rest)
    args.command = command
    return args


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if "://" not in path and not p.is_file():  # storage URIs are checked when read
        raise UserError(f"{path}: {what} not found")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from msad.config import check_ready_to_train, load_config

    cfg = load_config(_existing_file(args.config, "config file"), args.overrides)
    check_ready_to_train(cfg)
    from msad.engine.trainer import fit  # heavy (torch, Ray): only once the input is known to be good

    with console.capture(args.verbose) as con:
        try:
            # an existing run of the same name and config is always continued: --resume changes nothing here
            result = fit(cfg, address=args.address, progress=True)
            con.result(json.dumps(result.summary(), indent=2))
        finally:
            _stop_ray()  # inside the capture: Ray's goodbyes go to the log too
    return 0


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cmd_eval(args: argparse.Namespace) -> int:
    from msad.config import load_config

    cfg = load_config(_existing_file(args.config, "config file"), args.overrides)
    weights = args.weights
    _existing_file(weights, "checkpoint")
    from msad.engine.in_process import evaluate_checkpoint

    output = Path(args.output) if args.output else Path("eval") / Path(weights.partition("?")[0]).parent.name
    metrics = evaluate_checkpoint(cfg, weights, output_dir=output, branch=args.branch)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from msad.deploy.export import export_checkpoint

    result = export_checkpoint(_existing_file(args.checkpoint, "checkpoint"), Path(args.output), args.format)
    print(result.summary())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from msad.config import load_config

    cfg = load_config(_existing_file(args.config, "config file"), args.overrides)
    original = _existing_file(args.original, "original checkpoint")
    from msad.deploy.original import import_original_checkpoint

    print(f"wrote {import_original_checkpoint(original, cfg, Path(args.output))}")
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from msad.models.capacity import capacity_json, capacity_rows, format_capacity_table

    rows = capacity_rows()
    if args.repeats < 1:
        raise UserError(f"--repeats: invalid value {args.repeats}; allowed: an integer >= 1")
    if not args.latency:
        print(json.dumps(capacity_json(rows), indent=2) if args.json else format_capacity_table(rows))
        return 0
    from msad.deploy.latency import latency_table, measure

    timed = [measure(r.role, r.width, args.sizes, args.repeats) for r in rows]
    if args.json:
        print(json.dumps([{**row, "latency_input": list(t.size), "latency_gflops": t.gflops,
                           "eager_ms": t.eager_ms, "torchscript_ms": t.torchscript_ms}
                          for row, t in zip(capacity_json(rows), timed, strict=True)], indent=2))
    else:
        print(format_capacity_table(rows) + "\n\n" + latency_table(timed, args.sizes))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    _existing_file(args.spec, "sweep file")
    from msad.sweep.runner import run_sweep

    with console.capture(args.verbose):
        try:
            run_sweep(Path(args.spec), args.overrides, address=args.address, resume=args.resume,
                      verbose=args.verbose)
        finally:
            _stop_ray()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from msad import storage
    from msad.sweep.experiment_files import ExperimentFiles
    from msad.sweep.report import REPORT_CSV, REPORT_MD, REPORT_PLOT, write_report
    from msad.sweep.trials import RESULTS_DIR

    files = ExperimentFiles(args.experiment_dir)
    try:
        found = storage.exists(storage.join(files.location, RESULTS_DIR))
        if found:
            files.pull(RESULTS_DIR)
    except OSError as err:  # an object store that cannot be reached, or refuses the credentials
        raise UserError(f"{args.experiment_dir}: cannot read the experiment: {str(err).splitlines()[0]}") from None
    if not found:
        raise UserError(f"{args.experiment_dir}: no sweep results there (expected {RESULTS_DIR}/*.json); give "
                        "the experiment folder or URI: <distributed.storage_path>/<sweep name>")
    print(write_report(files.local))
    files.upload(REPORT_MD, REPORT_CSV, REPORT_PLOT)
    print(f"report: {files.describe()}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "sweep": cmd_sweep, "train": cmd_train, "eval": cmd_eval, "export": cmd_export, "convert": cmd_convert,
    "capacity": cmd_capacity, "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `launch.py` and the `msad` console script; returns the exit code."""
    try:
        args = parse_command_line(list(sys.argv[1:] if argv is None else argv))
        if args is None:
            build_parser().print_help()
            return EXIT_USER_ERROR
        return HANDLERS[args.command](args)
    except UserError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return EXIT_USER_ERROR
    except RunFailedError as err:  # a run that started and failed: one line, exit 1
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt or 'run the same command with --resume to continue'}", file=sys.stderr)
        return 130


def entry_point() -> NoReturn:
    """Console-script wrapper: exit with main()'s code."""
    sys.exit(main())
