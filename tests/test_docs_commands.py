"""Docs as tests: every `launch.py` command line the docs show is parsed by the real CLI parser, and the config or
sweep it names is loaded with its overrides, exactly as a user would copy it.

Sources: README.md, cluster/README.md (fenced blocks and inline code), cluster/*.yaml (string values such as the
KubeRay entrypoint, and comments), and the comments of sweeps/*.yaml and configs/**/*.yaml. Shell continuation
lines are joined; a command after `ray job submit ... --` counts from `launch.py` on. Usage synopses such as
`launch.py eval CONFIG.yaml --weights CKPT [--branch fused|high|low]` are parsed with their optional parts
spelled out (first alternative of each `a|b`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from msad.cli import parse_command_line
from msad.config import load_config
from msad.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = ("README.md", "cluster/README.md")
YAML_GLOBS = ("cluster/*.yaml", "sweeps/*.yaml", "configs/*.yaml", "configs/**/*.yaml")
COMMAND = re.compile(r"(?:^|[\s`])(?:python3?\s+)?launch\.py\s+(.*)$")


@dataclass(frozen=True)
class DocumentedCommand:
    where: str  # file:line
    line: str  # the command from `launch.py` on, continuation lines joined

    def argv(self) -> list[str]:
        return shlex.split(_spell_out_synopsis(self.line), comments=True)


def _spell_out_synopsis(line: str) -> str:
    """`a [--b X|Y] [k=v ...]   description` -> `a --b X k=v` (an optional part included, its first alternative)."""
    line = re.split(r"\s{3,}", line)[0]  # a synopsis table's description column
    if "[" not in line and "|" not in line:
        return line
    line = line.replace("...", " ")
    line = re.sub(r"(?<=\s)\[([^\[\]]*)\]", r"\1", line)  # optional groups, not YAML lists in key=[1,2]
    return re.sub(r"(\S+?)\|\S+", r"\1", line)


def _joined_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with shell continuations (trailing backslash) joined."""
    joined: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not parts:
            start = number
        line = raw.rstrip()
        if line.endswith("\\"):
            parts.append(line[:-1].strip() if parts else line[:-1].rstrip())
            continue
        joined.append((start, " ".join([*parts, line.strip()]) if parts else line))
        parts = []
    return joined


def _commands_in(text: str, where: str) -> list[DocumentedCommand]:
    found = []
    for number, line in _joined_lines(text):
        for span in re.findall(r"`([^`]*launch\.py[^`]*)`", line) or [line]:
            match = COMMAND.search(span)
            if match:
                found.append(DocumentedCommand(f"{where}:{number}", match.group(1).strip().rstrip("`")))
    return found


def _markdown_commands(path: Path) -> list[DocumentedCommand]:
    return _commands_in(path.read_text(), str(path.relative_to(REPO)))


def _yaml_strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _yaml_strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _yaml_strings(value)]
    return []


def _yaml_commands(path: Path) -> list[DocumentedCommand]:
    where = str(path.relative_to(REPO))
    text = path.read_text()
    comments = "\n".join(re.sub(r"^\s*#\s?", "", line) if line.lstrip().startswith("#") else ""
                         for line in text.splitlines())
    found = _commands_in(comments, where)
    for value in _yaml_strings(yaml.safe_load(text)):
        found += [DocumentedCommand(f"{where} (value)", c.line) for c in _commands_in(value, where)]
    return found


def documented_commands() -> list[DocumentedCommand]:
    commands = [c for name in MARKDOWN for c in _markdown_commands(REPO / name)]
    files = sorted({p for pattern in YAML_GLOBS for p in REPO.glob(pattern)})
    return commands + [c for path in files for c in _yaml_commands(path)]


COMMANDS = documented_commands()


def test_the_docs_commands_are_found() -> None:
    """The extractor sees the commands users copy (so the test below cannot pass by finding nothing)."""
    lines = {c.line for c in COMMANDS}
    assert "sweeps/quickstart.yaml" in lines  # README's main job
    assert any(c.where.startswith("cluster/kuberay-rayjob.yaml") and "--address auto" in c.line for c in COMMANDS)
    assert any(c.where.startswith("cluster/README.md") and "--resume" in c.line for c in COMMANDS)
    assert any(c.where.startswith("sweeps/paper.yaml") and "model.pretrained=" in c.line for c in COMMANDS)
    assert any("train.teacher_checkpoint=runs/" in c.line for c in COMMANDS if c.where.startswith("README.md"))
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses_and_loads(command: DocumentedCommand, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the docs' commands run from the repository root (the job's working directory)
    args = parse_command_line(command.argv())
    assert args is not None, command
    if args.command == "sweep" and Path(args.spec).is_file():
        sweep = load_sweep(args.spec, args.overrides)
        assert sweep.teachers or sweep.students
    elif args.command in ("train", "eval", "convert") and Path(args.config).is_file():
        load_config(args.config, args.overrides)


def test_flags_and_overrides_in_any_order() -> None:
    """The forms the cluster docs use: a global flag between the sweep file and its overrides, --resume last."""
    for argv in (["sweeps/paper.yaml", "--address", "auto", "model.pretrained=/w.pt"],
                 ["sweeps/kd_weights.yaml", "--resume", "train.iterations=5"],
                 ["--address", "auto", "sweeps/paper.yaml", "model.pretrained=/w.pt", "--resume"],
                 ["sweep", "sweeps/paper.yaml", "model.pretrained=/w.pt", "--address=auto", "--resume"]):
        args = parse_command_line(argv)
        assert args.command == "sweep" and args.spec.startswith("sweeps/")
        assert args.overrides == [token for token in argv if "=" in token and not token.startswith("--")]
        assert args.address == ("auto" if any("address" in token for token in argv) else None)
        assert args.resume == ("--resume" in argv)
    args = parse_command_line(["eval", "c.yaml", "data.val_images=/v", "--weights", "w.pt", "model.width=0.5",
                               "--address", "auto"])
    assert (args.config, args.overrides, args.weights, args.address) == ("c.yaml", ["data.val_images=/v",
                                                                                    "model.width=0.5"], "w.pt", "auto")
    args = parse_command_line(["train", "--resume", "c.yaml", "a.b=1", "--address", "ray://h:10001", "c.d=2"])
    assert (args.resume, args.overrides, args.address) == (True, ["a.b=1", "c.d=2"], "ray://h:10001")
