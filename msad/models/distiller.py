"""The trainable model of a student run: a student, its frozen teacher and the distillation weight's schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from msad.models.student import KDWarmup, MSADStudent, check_teacher_matches, run_frozen_teacher
from msad.models.teacher import MSADTeacher
from msad.models.trainable import Trainable


class Distiller(Trainable):
    """Trains ``student`` on its losses plus the distillation term against ``teacher``'s fused features.

    The student is the only registered submodule: DDP, the optimizer, ``train()``/``eval()``, BatchNorm conversion
    and ``state_dict`` see the student alone, so a training checkpoint's weights are the student's, key for key (the
    deployable model). The teacher is held outside the module tree, frozen, on the device it was loaded to; it runs
    under inference mode only while the distillation weight is above zero.

    Args:
        student: the student, initialised as the run wants (from the teacher, or randomly for the ablation).
        teacher: the trained teacher (``msad.build.load_frozen_teacher``); its width and L must match the student's.
        schedule: the distillation weight per step (alpha and its warm-up ramp); kept in checkpoints.
        teacher_batch_stats: run the teacher's BN with batch statistics (the original's behaviour).
    """

    def __init__(self, student: MSADStudent, teacher: MSADTeacher, schedule: KDWarmup,
                 teacher_batch_stats: bool = False) -> None:
        super().__init__()
        check_teacher_matches(student, teacher)
        self.student = student
        self._frozen = (teacher,)  # a tuple: not a submodule
        self.schedule = schedule
        self.teacher_batch_stats = teacher_batch_stats

    @property
    def teacher(self) -> MSADTeacher:
        return self._frozen[0]

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """The student's losses with ``loss_kd`` weighted by this step's distillation weight (also returned, as the
        diagnostic ``kd_weight``)."""
        weight = self.schedule.weight
        features = run_frozen_teacher(self.teacher, images, self.teacher_batch_stats) if weight > 0 else None
        outputs = self.student(images, targets, teacher_features=features, kd_weight=weight)
        outputs["kd_weight"] = images.new_tensor(float(weight))  # the input's dtype: fp32, also under autocast
        return outputs

    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]], branch: str | None = None,
                **postprocess_kwargs: Any) -> list[dict]:
        """The student's detections (the teacher is not run)."""
        return self.student.predict(images, image_sizes, branch, **postprocess_kwargs)

    def validation_losses(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """The student's own detection terms (the teacher is not run; loss_kd is left out)."""
        outputs = self.student.validation_losses(images, targets)
        outputs.pop("loss_kd", None)
        return outputs

    def evaluation_branches(self) -> dict[str, str | None]:
        return self.student.evaluation_branches()

    def compile_network(self, backend: str = "inductor") -> None:
        """The student's network; the frozen teacher runs eagerly under inference mode (no backward to save)."""
        self.student.compile_network(backend)

    def advance(self) -> None:
        self.schedule.step()

    def training_state(self) -> dict[str, Any]:
        return {"kd_warmup": self.schedule.state_dict()}

    def load_training_state(self, checkpoint: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(checkpoint["kd_warmup"])

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The student's state dict (no ``student.`` prefix): checkpoints hold the deployable student."""
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)
