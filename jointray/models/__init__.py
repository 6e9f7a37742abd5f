"""The joint model family: shared 3D encoder, clinical encoder, fusion, segmentation decoder, outcome heads."""

from jointray.models.joint import JointModel, build_model
from jointray.models.mc import MC_MODES, MCSampler, mc_sample
from jointray.tasks import JointOutput

__all__ = ["MC_MODES", "JointModel", "JointOutput", "MCSampler", "build_model", "mc_sample"]
