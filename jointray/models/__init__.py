"""The joint model family: shared 3D encoder, clinical encoder, fusion, segmentation decoder, outcome heads."""

from jointray.models.joint import JointModel, JointOutput, build_model
from jointray.models.mc import mc_sample

__all__ = ["JointModel", "JointOutput", "build_model", "mc_sample"]
