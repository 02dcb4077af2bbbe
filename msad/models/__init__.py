"""Models: slimmable ResNet-50, P2-P7 pyramid, FCOS head, plain detector, MSAD teacher and student."""

from msad.models.detector import FCOSDetector
from msad.models.fcos import FCOSHead, HeadOutputs
from msad.models.fpn import FeaturePyramid
from msad.models.slimmable import WIDTHS, SlimmableResNet50, load_slimmable_imagenet, load_torchvision_resnet50
from msad.models.student import MSADStudent
from msad.models.teacher import MSADTeacher

__all__ = [
    "WIDTHS", "SlimmableResNet50", "load_slimmable_imagenet", "load_torchvision_resnet50", "FeaturePyramid",
    "FCOSHead", "HeadOutputs", "FCOSDetector", "MSADTeacher", "MSADStudent",
]
