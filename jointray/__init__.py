"""jointray: distributed joint segmentation and outcome learning for 3D medical imaging on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jointray")  # pyproject.toml is the one place the version is written
except PackageNotFoundError:  # imported from a source tree that pip never installed (a Ray job's working dir)
    __version__ = "unknown"
