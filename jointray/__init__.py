"""jointray: distributed joint segmentation and outcome learning for 3D medical imaging on Ray."""

__version__ = "0.1.0"
