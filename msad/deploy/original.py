"""``launch.py convert``: an original MSAD (Detectron2) ``.pth`` file -> an msad checkpoint.

The key mapping and the input-space fold are ``msad.models.convert``'s; this writes the result as an msad checkpoint
(``msad.checkpoint``) that ``eval``, ``export`` and student runs read like any other.
"""

from __future__ import annotations

from pathlib import Path

from msad.build import build_model
from msad.checkpoint import STANDALONE_KIND, TRAINING_KIND, checkpoint_dict, save_checkpoint
from msad.config import Config, config_from_dict
from msad.errors import UserError
from msad.models.convert import infer_width, load_original
from msad.models.state import load_state_strictly


def import_original_checkpoint(original: str | Path, cfg: Config, output: str | Path) -> Path:
    """Turn an original MSAD (Detectron2) .pth file into an msad checkpoint that `eval` and students can use.

    The config describes the model (width, channels, classes) and is checked against the weights: the width is read
    from the file and must equal model.width; every key is mapped and shape-checked when the model loads.
    A student file becomes a standalone student (the teacher inside it is dropped); a teacher file a teacher.
    """
    output = Path(output)
    if output.exists():
        raise UserError(f"{output}: already exists; choose another --output (nothing was overwritten)")
    converted = load_original(original, fold_input=cfg.data.input_format == "rgb_imagenet")
    weights = converted.student if converted.role == "student" else converted.teacher
    width = infer_width(weights)
    if width != cfg.model.width:
        raise UserError(f"{original}: trained at width {width:g}, but model.width is {cfg.model.width:g}")
    data = cfg.to_dict()
    data["train"]["role"] = converted.role
    data["model"]["fusion"] = any(k.startswith("fusion.") for k in weights) or converted.role == "student"
    model_cfg = config_from_dict(data)
    model = build_model(model_cfg, load_pretrained=False)  # every weight comes from the original file
    load_state_strictly(model, weights, str(original))
    kind = STANDALONE_KIND if converted.role == "student" else TRAINING_KIND
    return save_checkpoint(checkpoint_dict(kind, converted.role, model_cfg, model.state_dict(), 0, {},
                                           source=str(original)), output)
