"""train.amp: auto picks bf16 only where the device runs it natively, warns on an emulated explicit bf16, records the
resolved value in the run's config.yaml and checkpoints, keeps it on resume; no shipped file pins bf16 or fp16."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, make_tiny_config

from msad.build import resolve_data_paths
from msad.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from msad.engine.compilation import AUTO_MIN_ITERATIONS, choose_compile
from msad.engine.in_process import LocalContext
from msad.engine.loop import run_training
from msad.engine.precision import DeviceFacts, choose_amp, cpu_has_native_bf16, device_facts, gpu_facts

# The rule, written out by hand: (device, requested) -> resolved. GPUs: bf16 from compute capability 8.0 (A100)
# on; 7.0 (V100) and 7.5 (T4) have no bf16 units, so auto trains them in fp32.
CPU_BF16 = DeviceFacts("cpu", "Xeon (AMX)", native_bf16=True)
CPU_AVX2 = DeviceFacts("cpu", "EPYC (AVX2)", native_bf16=False)
TABLE = [
    (CPU_BF16, "auto", "bf16"), (CPU_AVX2, "auto", "off"),
    (gpu_facts("V100", (7, 0)), "auto", "off"), (gpu_facts("T4", (7, 5)), "auto", "off"),
    (gpu_facts("A100", (8, 0)), "auto", "bf16"), (gpu_facts("H100", (9, 0)), "auto", "bf16"),
    (CPU_AVX2, "off", "off"), (CPU_BF16, "off", "off"), (CPU_AVX2, "bf16", "bf16"),
    (gpu_facts("T4", (7, 5)), "fp16", "fp16"), (gpu_facts("A100", (8, 0)), "fp16", "fp16"),
]


@pytest.mark.parametrize(("facts", "requested", "resolved"), TABLE,
                         ids=[f"{f.name}-{r}" for f, r, _ in TABLE])
def test_auto_rule_against_a_hand_written_table(facts: DeviceFacts, requested: str, resolved: str) -> None:
    assert choose_amp(requested, facts).amp == resolved


def test_explicit_bf16_where_emulated_warns_in_one_line_naming_the_device() -> None:
    precision = choose_amp("bf16", CPU_AVX2)
    assert precision.warning is not None and "\n" not in precision.warning
    assert "EPYC (AVX2)" in precision.warning and "13x" in precision.warning and "train.amp=auto" in precision.warning
    # negative controls: native bf16, or auto, warn of nothing
    assert choose_amp("bf16", CPU_BF16).warning is None
    assert choose_amp("auto", CPU_AVX2).warning is None
    assert choose_amp("bf16", gpu_facts("T4", (7, 5))).warning is not None


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the kernel's CPU flags")
def test_native_bf16_detection_agrees_with_the_kernels_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked against the kernel's own flags, not against torch: AVX-512 BF16 or AMX-BF16 means native, unless
    oneDNN is capped below them (ONEDNN_MAX_CPU_ISA), when it emulates bf16 whatever the CPU has."""
    flags = _cpu_flags()
    if not flags & {"avx2", "avx512f"}:
        pytest.skip("not an x86 CPU")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert device_facts(torch.device("cpu")).native_bf16 == cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_native_bf16()


def _train(cfg: Any, run_dir: Path) -> LocalContext:
    ctx = LocalContext(torch.device("cpu"), run_dir=run_dir)
    run_training(cfg, resolve_data_paths(cfg.data), ctx, run_dir=str(run_dir))
    return ctx


def test_resolved_precision_lands_in_config_yaml_checkpoints_and_reports_and_survives_resume(
        tmp_path: Path, shapes_cache: Path) -> None:
    expected = "bf16" if cpu_has_native_bf16() else "off"
    cfg = make_tiny_config(tmp_path, shapes_cache, "fcos", "amp", "train.amp=auto", "train.iterations=2",
                           "train.lr_steps=[1]", "train.checkpoint_period=2", "train.eval_period=0",
                           "train.bootstrap_samples=0", "distributed.num_workers=1")
    run_dir = tmp_path / "amp"
    run_dir.mkdir()
    ctx = _train(cfg, run_dir)
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text())["train"]["amp"] == expected
    checkpoint = load_checkpoint(run_dir / "checkpoint_0000002" / "checkpoint.pt")
    assert checkpoint["config"]["train"]["amp"] == expected
    assert all(r["precision"].startswith("precision: ") for r in ctx.reports)

    # A run resumed from a checkpoint trained in the other arithmetic keeps that arithmetic.
    other = "off" if expected == "bf16" else "bf16"
    checkpoint["config"]["train"]["amp"] = other
    save_checkpoint(checkpoint, run_dir / "checkpoint_0000002" / "checkpoint.pt")  # with its digest
    longer = make_tiny_config(tmp_path, shapes_cache, "fcos", "amp", "train.amp=auto", "train.iterations=4",
                              "train.checkpoint_period=2", "train.eval_period=0", "train.bootstrap_samples=0",
                              "train.lr_steps=[3]", "distributed.num_workers=1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(longer, run_dir)
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text())["train"]["amp"] == other
    assert load_checkpoint(run_dir / "checkpoint_0000004" / "checkpoint.pt")["config"]["train"]["amp"] == other
    emulated = other == "bf16" and not cpu_has_native_bf16()
    assert any("bf16 is emulated" in str(w.message) for w in caught) == emulated


def amp_pins(tree: Any) -> list[str]:
    """Every `amp` value set anywhere in a loaded YAML tree (a sweep's config, grid or stage sections)."""
    if isinstance(tree, dict):
        found = [str(v) for k, v in tree.items() if k in ("amp", "train.amp") and not isinstance(v, (dict, list))]
        for key, value in tree.items():
            if key in ("amp", "train.amp") and isinstance(value, list):
                found += [str(v) for v in value]
            found += amp_pins(value)
        return found
    if isinstance(tree, list):
        return [pin for item in tree for pin in amp_pins(item)]
    return []


def test_no_shipped_config_or_sweep_pins_a_precision_some_machines_emulate() -> None:
    files = sorted([*(REPO / "configs").rglob("*.yaml"), *(REPO / "sweeps").rglob("*.yaml")])
    assert len(files) >= 10
    pinned = {str(f.relative_to(REPO)): pins for f in files
              if (pins := [p for p in amp_pins(yaml.safe_load(f.read_text())) if p in ("bf16", "fp16")])}
    assert pinned == {}
    # negative control: the same search finds a pin in a sweep grid and in a stage's train section
    assert amp_pins({"students": {"grid": {"train.amp": ["off", "bf16"]}}}) == ["off", "bf16"]
    assert amp_pins({"teachers": {"config": {"train": {"amp": "fp16"}}}}) == ["fp16"]


def test_rerunning_a_run_with_auto_accepts_the_value_its_workers_wrote(tmp_path: Path, shapes_cache: Path) -> None:
    """config.yaml holds what auto resolved to; the same command again (auto) resumes instead of being refused as a
    changed config, while an explicit change of train.amp still is."""
    from msad.engine.trainer import prepare_run
    from msad.errors import UserError

    cfg = make_tiny_config(tmp_path, shapes_cache, "fcos", "rerun", "train.amp=auto")
    _, run_dir = prepare_run(cfg)
    saved = Path(run_dir) / CONFIG_FILE
    resolved = yaml.safe_load(saved.read_text())
    resolved["train"]["amp"] = "bf16"  # as a worker with native bf16 rewrites it
    saved.write_text(yaml.safe_dump(resolved, sort_keys=False))
    prepare_run(cfg)
    saved.write_text(yaml.safe_dump(resolved, sort_keys=False))
    with pytest.raises(UserError, match="train.amp: 'bf16' -> 'off'"):
        prepare_run(make_tiny_config(tmp_path, shapes_cache, "fcos", "rerun", "train.amp=off"))


FP32_CPU = AUTO_MIN_ITERATIONS[("cpu", "off")]
COMPILE_TABLE = [  # (requested, iterations, device, amp, C++ compiler) -> compiled?
    ("off", 100_000, "cpu", "off", True, False), ("on", 10, "cpu", "bf16", True, True),
    ("on", 10, "cpu", "off", False, False), ("auto", FP32_CPU - 1, "cpu", "off", True, False),
    ("auto", FP32_CPU, "cpu", "off", True, True), ("auto", 10 * FP32_CPU, "cpu", "bf16", True, False),
    ("auto", 100_000, "cpu", "off", False, False), ("auto", 100_000, "cuda", "bf16", True, False),
    ("on", 10, "cuda", "fp16", False, True),
]


@pytest.mark.parametrize(("requested", "iterations", "device", "amp", "compiler", "compiled"), COMPILE_TABLE)
def test_compile_rule(requested: str, iterations: int, device: str, amp: str, compiler: bool, compiled: bool) -> None:
    choice = choose_compile(requested, iterations, device, amp, compiler)
    assert choice.enabled == compiled and "\n" not in choice.line()


def test_the_sweep_view_says_each_precision_once_with_its_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every report carries the precision line: the terminal gets it once per sweep (not per trial or report), with
    the emulation warning once; the compile line only when a trial compiles."""
    import io
    from types import SimpleNamespace

    from msad import console
    from msad.sweep.live import SweepView

    err = io.StringIO()
    monkeypatch.setattr(console, "_current", console.Console(err, io.StringIO()))
    view = SweepView("s", [], 1)
    emulated = choose_amp("bf16", CPU_AVX2)
    for name in ("t1", "t2"):
        trial = SimpleNamespace(config={"role": "teacher", "width": 0.25, "trial_name": name,
                                        "msad": {"data": {"test_short_side": 128}, "train": {"iterations": 10}}})
        view.on_trial_start(0, [], trial)
        for iteration, compiled in ((5, "torch.compile: off (auto)"), (10, "torch.compile: on (train.compile=on)")):
            view.on_trial_result(0, [], trial, {"iteration": iteration, "precision": emulated.line(),
                                                "precision_warning": emulated.warning, "compile": compiled})
    lines = err.getvalue().splitlines()
    assert sum(emulated.line() in line for line in lines) == 1
    assert sum("bf16 is emulated" in line for line in lines) == 1
    assert sum("torch.compile: on" in line for line in lines) == 1 and not any("compile: off" in line for line in lines)


def test_compiled_network_keeps_parameter_names_and_computes_the_same_losses(tmp_path: Path,
                                                                              shapes_cache: Path) -> None:
    """train.compile compiles backbone, pyramid, head and C-FF in place: the state dict is the eager one key for key
    (checkpoints unchanged), the loss terms equal the eager model's on the same batch, and gradients flow.
    Negative control: compiling does change which forward runs. Traced by torch.compile with AOTAutograd's eager
    backend (every graph captured, forward and backward, in seconds); Inductor's code generation itself took 197 s
    here for this model, and is what benchmarks/RESULTS.md times ("Fast on the user's hardware")."""
    from msad.build import build_model, build_train_dataset
    from msad.data.transforms import collate
    from msad.models.trainable import loss_terms

    cfg = make_tiny_config(tmp_path, shapes_cache, "teacher", "compiled")
    dataset = build_train_dataset(cfg, resolve_data_paths(cfg.data))
    landscape = dataset.landscape()
    batch = collate([dataset[i] for i in range(len(dataset)) if landscape[i] == landscape[0]][:2],
                    cfg.data.size_divisibility)
    torch.manual_seed(0)
    eager = build_model(cfg).train()
    torch.manual_seed(0)
    compiled = build_model(cfg).train()
    keys = list(compiled.state_dict())
    compiled.compile_network(backend="aot_eager")
    assert list(compiled.state_dict()) == keys and keys == list(eager.state_dict())
    assert compiled.backbone._compiled_call_impl is not None and eager.backbone._compiled_call_impl is None
    expected = loss_terms(eager(batch.images, batch.targets))
    got = loss_terms(compiled(batch.images, batch.targets))
    assert got.keys() == expected.keys()
    for name in expected:
        assert float(got[name].detach()) == pytest.approx(float(expected[name].detach()), rel=1e-4, abs=1e-5), name
    sum(got.values()).backward()
    assert all(p.grad is not None for p in compiled.head.parameters() if p.requires_grad)
