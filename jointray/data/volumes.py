"""Reading one volume from disk: NIfTI through nibabel, DICOM series through :mod:`jointray.data.dicom`.

The voxel count in the header is checked against a limit *before* the data is read, so a hostile or
broken header cannot make a worker allocate gigabytes. Every failure is an :class:`InputError`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from jointray.data.dicom import read_dicom_series
from jointray.data.errors import InputError


@dataclass
class Volume:
    """A volume in voxel space: ``array`` is (X, Y, Z) or (X, Y, Z, C); ``affine`` maps voxels to RAS+ mm."""

    array: np.ndarray
    affine: np.ndarray
    path: str


def _read_nifti(path: Path, max_voxels: int) -> Volume:
    try:
        image = nib.load(path)  # reads the header only; the data stays on disk until asked for
    except Exception as exc:  # nibabel raises many types for a bad header; all mean "unreadable"
        raise InputError(path, f"unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in image.shape)
    voxels = math.prod(shape) if shape else 0
    if voxels > max_voxels:
        raise InputError(
            path, f"header claims {voxels:,} voxels {shape}, over the limit of {max_voxels:,} (data.max_voxels)"
        )
    try:
        array = np.asarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(path, f"truncated or corrupt data ({type(exc).__name__}: {exc})") from None
    return Volume(array=array, affine=np.asarray(image.affine, dtype=np.float64), path=str(path))


def read_volume(path: str | Path, max_voxels: int) -> Volume:
    """Read a NIfTI file, a DICOM series folder or a zip of one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir() or path.suffix.lower() == ".zip":
        array, affine = read_dicom_series(path, max_voxels)
        return Volume(array=array, affine=affine, path=str(path))
    if path.name.endswith((".nii", ".nii.gz")):
        return _read_nifti(path, max_voxels)
    raise InputError(path, "unknown format: expected .nii, .nii.gz, a DICOM folder or a .zip of one")
