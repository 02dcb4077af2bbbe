"""Deployment: slice a slimmable model to its width, export it (pt, TorchScript, ONNX), hand a teacher to students.

``load_exported(path)`` reads a ``pt`` export; ``export_checkpoint`` is what ``launch.py export`` runs; the teacher
hand-off is ``export_sliced_teacher`` / ``load_sliced_teacher`` (a student starts from either kind of teacher with
``msad.models.student.init_student_from_teacher``); ``import_original_checkpoint`` is ``launch.py convert``.
"""

from msad.deploy.export import FORMATS, ExportResult, export_checkpoint, load_exported, load_sliced_model
from msad.deploy.original import import_original_checkpoint
from msad.deploy.slicing import fold_backbone, slice_model
from msad.deploy.teacher import export_sliced_teacher, load_sliced_teacher

__all__ = [
    "FORMATS", "ExportResult", "export_checkpoint", "load_exported", "load_sliced_model", "fold_backbone",
    "slice_model", "export_sliced_teacher", "load_sliced_teacher", "import_original_checkpoint",
]
