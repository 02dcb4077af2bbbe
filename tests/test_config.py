"""Config loading, `_base_` inheritance, overrides and every validation message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from msad.config import Config, check_ready_to_train, config_from_dict, load_config, parse_overrides
from msad.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.width == 0.25 and cfg.train.kd_alpha == 0.2


def test_chain_of_two_bases_with_relative_paths(tmp_path: Path) -> None:
    write(tmp_path / "base" / "root.yaml", "model:\n  fpn_channels: 64\n  num_classes: 5\ntrain:\n  iterations: 50\n"
          "  lr_steps: [30]\n")
    write(tmp_path / "base" / "mid.yaml", "_base_: root.yaml\nmodel:\n  fpn_channels: 128\ntrain:\n  base_lr: 0.02\n")
    leaf = write(tmp_path / "leaf.yaml", "_base_: base/mid.yaml\ntrain:\n  role: student\n")
    cfg = load_config(leaf)
    assert cfg.model.fpn_channels == 128  # mid overrides root
    assert cfg.model.num_classes == 5  # root survives through mid
    assert cfg.train.base_lr == 0.02 and cfg.train.iterations == 50 and cfg.train.lr_steps == [30]
    assert cfg.train.role == "student"  # leaf wins
    assert cfg.model.head_convs == 4  # untouched defaults stay


def test_base_list_merges_in_order(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "train:\n  seed: 1\n  iterations: 40\n  lr_steps: [20]\n")
    write(tmp_path / "b.yaml", "train:\n  seed: 2\n")
    cfg = load_config(write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n"))
    assert cfg.train.seed == 2 and cfg.train.iterations == 40


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UserError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_names_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "a.yaml", "_base_: nope.yaml\n")
    with pytest.raises(UserError, match=r"nope\.yaml: file not found"):
        load_config(cfg)


def test_overrides_nested_and_typed(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.kd_alpha=0.5", "model.width_list=[0.25, 1.0]", "model.width=1.0",
                             "data.shapes.num_train=32", "train.teacher_checkpoint=/tmp/t.pt", "data.hflip_prob=0",
                             "tracking.entity=null", "distributed.use_gpu=false"])
    assert cfg.train.kd_alpha == 0.5 and isinstance(cfg.train.kd_alpha, float)
    assert cfg.model.width_list == [0.25, 1.0] and cfg.model.width == 1.0
    assert cfg.data.shapes.num_train == 32 and isinstance(cfg.data.shapes.num_train, int)
    assert cfg.train.teacher_checkpoint == "/tmp/t.pt"
    assert cfg.data.hflip_prob == 0.0 and isinstance(cfg.data.hflip_prob, float)  # int widens to float
    assert cfg.tracking.entity is None and cfg.distributed.use_gpu is False


def test_overrides_beat_files(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train:\n  kd_alpha: 0.1\n")
    assert load_config(path, ["train.kd_alpha=0.3"]).train.kd_alpha == 0.3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.kd_alhpa=0.1"], "unknown key train.kd_alhpa (did you mean train.kd_alpha?)"),
        (["modle.width=0.5"], "unknown key modle (did you mean model?)"),
        (["train.fpn_channels=64"], "unknown key train.fpn_channels (did you mean model.fpn_channels?)"),
        (["data.shapes.num_trian=3"], "unknown key data.shapes.num_trian (did you mean data.shapes.num_train?)"),
        (["train.iterations=ten"], "train.iterations: invalid value 'ten'; expected an integer"),
        (["train.iterations=3.5"], "train.iterations: invalid value 3.5; expected an integer"),
        (["train.kd_alpha=true"], "train.kd_alpha: invalid value True; expected a number"),
        (["train.role=teacherr"], "train.role: invalid value 'teacherr'; expected one of 'teacher', 'student', 'fcos'"),
        (["model.width=0.3"], "model.width: invalid value 0.3; allowed: one of model.width_list [0.25, 0.5, 0.75"),
        (["model.width_list=[0.25, 0.6]"], "model.width_list: invalid value [0.25, 0.6]; allowed: a non-empty list"),
        (["data.low_res_scale=0.25"], "data.low_res_scale: invalid value 0.25; it is no longer a setting"),
        (["train.base_lr=-0.01"], "train.base_lr: invalid value -0.01; allowed: a number > 0"),
        (["train.lr_steps=[250, 100]"], "train.lr_steps: invalid value [250, 100]; allowed: increasing iterations"),
        (["train.amp=fp16"],
         "train.amp: invalid value 'fp16'; allowed: 'auto', 'off' or 'bf16' unless distributed.use_gpu"),
        (["data.size_divisibility=100"], "data.size_divisibility: invalid value 100; allowed: a positive multiple"),
        (["data.dataset=coco"], "data.train_images: invalid value None; allowed: a path when data.dataset is coco"),
        (["model=3"], "model: invalid value 3; expected ModelConfig"),
        (["train.kd_alpha"], "override 'train.kd_alpha': expected section.key=value"),
        (["train.lr_steps=[1, 2"], "override 'train.lr_steps=[1, 2': value '[1, 2' is not valid YAML"),
    ],
)
def test_validation_messages(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_student_without_teacher_checkpoint_fails_once_training_starts() -> None:
    cfg = load_config(None, ["train.role=student"])  # fine to load: a sweep fills the checkpoint in
    with pytest.raises(UserError, match="train.teacher_checkpoint: a student needs"):
        check_ready_to_train(cfg)
    check_ready_to_train(load_config(None, ["train.role=student", "train.teacher_checkpoint=t.pt"]))


def test_coco_training_without_imagenet_weights_is_refused_unless_asked_for(tmp_path: Path) -> None:
    coco = ["data.dataset=coco", f"data.train_images={tmp_path}", f"data.train_annotations={tmp_path / 'a.json'}",
            f"data.val_images={tmp_path}", f"data.val_annotations={tmp_path / 'a.json'}"]
    with pytest.raises(UserError, match=r"^model.pretrained: a COCO run needs the ImageNet backbone weights .* "
                                        r"set model.random_init=true to train from random weights on purpose$"):
        check_ready_to_train(load_config(None, coco))
    check_ready_to_train(load_config(None, [*coco, "model.random_init=true"]))
    check_ready_to_train(load_config(None, [*coco, f"model.pretrained={tmp_path / 'w.pt'}"]))
    # a student starts from its teacher's weights; eval and convert never call this check
    check_ready_to_train(load_config(None, [*coco, "train.role=student", f"train.teacher_checkpoint={tmp_path}"]))
    check_ready_to_train(load_config(None, ["train.role=fcos"]))  # the built-in dataset: random init is the point


def test_bad_yaml_reports_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "model:\n  width: 0.25\n  fpn_channels: [64\ntrain:\n  iterations: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml: invalid YAML at line 4"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_parse_overrides_conflict() -> None:
    with pytest.raises(UserError, match="set both as a value and as a section"):
        parse_overrides(["train=1", "train.seed=2"])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    """What runs and checkpoints store (`Config.to_dict()` as YAML) loads back as the same config."""
    cfg = load_config(None, ["train.kd_alpha=0.7", "model.fpn_channels=64"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["kd_alpha"] == 0.7
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_retired_key_at_its_only_value_still_loads() -> None:
    """Configs and checkpoints written when data.low_res_scale was a key (always 0.5) load unchanged."""
    old = load_config(None, ["train.kd_alpha=0.7"]).to_dict()
    old["data"]["low_res_scale"] = 0.5
    assert config_from_dict(old) == load_config(None, ["train.kd_alpha=0.7"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


def test_scientific_notation_is_a_number(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train:\n  weight_decay: 5e-5\n")
    cfg = load_config(path, ["train.base_lr=1e-3"])
    assert cfg.train.base_lr == 0.001 and cfg.train.weight_decay == 0.00005


def test_yaml_words_off_on_yes_no_are_strings_not_booleans(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML's default) reads `off` as False, so `amp: off` was refused as "invalid value False"."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\nmodel:\n  fusion: false\n")
    cfg = load_config(path, ["train.role=teacher"])
    assert cfg.train.amp == "off" and cfg.model.fusion is False
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(UserError, match=r"model.fusion: invalid value 'yes'; expected true/false"):
        load_config(None, ["model.fusion=yes"])


def test_original_yaml_turns_on_every_original_behaviour_the_departures_table_names() -> None:
    """Each switch of README's "Departures from the original" table, set to the original's value in
    configs/paper/original.yaml and different from msad's default."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Departures from the original", 1)[1].split("\n\n")[2]
    switches = {key for key in re.findall(r"`([a-z_]+\.[a-z_]+): ", table)}
    assert switches == {"model.fusion_init", "train.giou_plus_one", "train.teacher_batch_stats",
                        "data.drop_train_images_without_boxes", "data.input_format", "train.sync_bn", "train.amp"}
    original, default = load_config(REPO / "configs" / "paper" / "original.yaml").to_dict(), Config().to_dict()
    for key in switches - {"train.sync_bn"}:  # sync_bn: the original's newest configs use SyncBN, as msad
        section, name = key.split(".")
        assert original[section][name] != default[section][name], key
    assert original["model"]["fusion_init"] == "original" and original["data"]["drop_train_images_without_boxes"]
    assert original["train"]["giou_plus_one"] and original["train"]["teacher_batch_stats"]
    assert original["data"]["input_format"] == "bgr_255"
    assert original["train"]["amp"] == "off"  # fp32, as the original trained


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLE:s3cr3tCanary@bucket/runs",
                                 "s3://bucket/runs?endpoint_override=localhost:9000&secret_key=s3cr3tCanary"])
def test_credentials_in_the_storage_uri_are_refused_without_echoing_them(uri: str) -> None:
    with pytest.raises(UserError) as info:
        load_config(None, [f"distributed.storage_path={uri}"])
    text = str(info.value)
    assert text.startswith("distributed.storage_path: the URI holds credentials") and "\n" not in text
    assert "s3cr3tCanary" not in text and "AKIA" not in text
    # negative control: the same places without credentials load (a user@host path, an endpoint with a port)
    for fine in ("s3://bucket/runs?endpoint_override=localhost:9000", "/nfs/user@site/runs", "gs://bucket/a@b"):
        assert load_config(None, [f"distributed.storage_path={fine}"]).distributed.storage_path == fine
