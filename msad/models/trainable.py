"""What the training loop drives, whatever the role: the `Trainable` base class and the output convention.

A trainable model's ``forward(images, targets)`` returns one dict. Entries named ``loss_*`` are loss terms: the
objective is their plain sum (as Detectron2's and mmdetection's detectors return them). Every other entry is a
diagnostic, detached (C-FF's weight on H per level, the distillation weight a step used): the loop logs it beside the
losses, averaged over the reporting window and over workers. Everything else a role needs -- a frozen teacher, a
schedule kept in checkpoints, extra branches to evaluate -- lives in the model object behind the hooks below, so the
loop only steps, reports, evaluates and checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from msad.errors import UserError

LOSS_PREFIX = "loss_"


def loss_terms(outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The loss terms of a forward's outputs (their plain sum is the objective)."""
    return {name: value for name, value in outputs.items() if name.startswith(LOSS_PREFIX)}


def check_single_branch(model: nn.Module, branch: str | None) -> None:
    """Refuse a `branch` for a model with one output (None is its output)."""
    if branch is not None:
        raise UserError(f"{type(model).__name__} has one output; branch {branch!r} does not exist")


class Trainable(nn.Module):
    """A detector the training loop can train, with the defaults of a model trained on its own.

    Subclasses implement ``forward(images, targets) -> dict`` (see the module docstring) and
    ``predict(images, image_sizes, branch=None)``, and override the hooks they need.
    """

    branches: tuple[str, ...] = ()  # the outputs `predict` can give besides its default (None); () = one output

    def evaluation_branches(self) -> dict[str, str | None]:
        """Metric-key prefix -> the ``predict`` branch evaluated under it; "" is the model's own output."""
        return {"": None}

    def validation_losses(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """The loss terms on held-out images (``train.eval_loss``), without a distillation term so that students
        of any KD weight compare; a plain model's are its training loss terms."""
        return loss_terms(self(images, targets))

    def advance(self) -> None:
        """Called once after every optimizer step (per-iteration schedules move here)."""

    def compile_network(self, backend: str = "inductor") -> None:
        """torch.compile what holds the step's convolutions, in place (parameter names unchanged); losses and
        decoding stay eager. The default compiles the whole forward. `backend`: torch.compile's."""
        self.compile(dynamic=False, backend=backend)

    def training_state(self) -> dict[str, Any]:
        """Entries to keep in training checkpoints besides the weights (schedules), keyed by checkpoint field."""
        return {}

    def load_training_state(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore what ``training_state`` saved, from a training checkpoint's fields."""
