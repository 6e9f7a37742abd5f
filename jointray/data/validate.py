"""Read a case and check that it can be used; anything wrong is an :class:`InputError` with one reason.

Checks, in order: files exist and are readable, the header is not absurdly large, arrays are 3D
(or 4D with one axis per channel), values are finite, the image is not constant, labels are
integers from the declared set, and every channel and the label share one voxel grid (shape and
affine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jointray.data.errors import InputError
from jointray.data.records import CaseRecord
from jointray.data.volumes import Volume, read_volume

#: Affines that differ by less than this (mm, or direction-cosine units) describe the same grid;
#: NIfTI stores float32, so exact equality is too strict.
AFFINE_TOLERANCE = 1e-3


@dataclass
class LoadedCase:
    """A case that passed validation: ``image`` is (C, X, Y, Z) float32 and ``label`` (X, Y, Z) uint8."""

    record: CaseRecord
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray


def _channels_first(volume: Volume, channels: int) -> np.ndarray:
    array = volume.array
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 3:
        return array[None]
    if array.ndim == 4 and channels > 1 and array.shape[3] == channels:
        return np.moveaxis(array, 3, 0)  # MSD stores modalities on the last axis
    raise InputError(volume.path, f"not a 3D volume: shape {array.shape}")


def _check_finite(array: np.ndarray, path: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(path, f"contains {bad} non-finite values (NaN/Inf)")


def _check_grid(reference: Volume, ref_shape: tuple, other: Volume, other_shape: tuple, what: str) -> None:
    if ref_shape != other_shape:
        raise InputError(other.path, f"{what} shape {other_shape} does not match image shape {ref_shape}")
    diff = float(np.abs(reference.affine - other.affine).max())
    if diff > AFFINE_TOLERANCE:
        raise InputError(other.path, f"{what} affine differs from the image affine (max difference {diff:.4g})")


def _label_array(volume: Volume, label_values: set[int]) -> np.ndarray:
    array = volume.array
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(volume.path, f"label is not a 3D volume: shape {array.shape}")
    _check_finite(array, volume.path)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        raise InputError(volume.path, "label has non-integer values")
    values = {int(v) for v in np.unique(array)}
    unknown = sorted(values - label_values)
    if unknown:
        raise InputError(volume.path, f"label values {unknown} are not in the declared set {sorted(label_values)}")
    return array.astype(np.uint8)


def load_case(record: CaseRecord, label_values: set[int], max_voxels: int, channels: int) -> LoadedCase:
    """Read and check one case. Raises :class:`InputError` naming the file at fault."""
    if len(record.images) != channels:
        raise InputError(
            record.images[0], f"{len(record.images)} image(s) given but preprocess.channels is {channels}"
        )
    volumes = [read_volume(p, max_voxels) for p in record.images]
    label_volume = read_volume(record.label, max_voxels) if record.label is not None else None
    return check_case(record, volumes, label_volume, label_values, channels)


def check_case(record: CaseRecord, volumes: list[Volume], label_volume: Volume | None, label_values: set[int],
               channels: int) -> LoadedCase:
    """Check volumes already in memory (read from files, or handed over as arrays) as :func:`load_case` does."""
    arrays = [_channels_first(v, channels if len(volumes) == 1 else 1) for v in volumes]
    reference, ref_shape = volumes[0], arrays[0].shape[1:]
    for volume, array in zip(volumes, arrays):
        _check_finite(array, volume.path)
        if volume is not reference:
            _check_grid(reference, ref_shape, volume, array.shape[1:], "image")
        if volume.affine.shape != (4, 4) or not np.all(np.isfinite(volume.affine)):
            raise InputError(volume.path, "affine is not a finite 4x4 matrix")
        if np.linalg.matrix_rank(volume.affine[:3, :3]) < 3:
            raise InputError(volume.path, "affine is singular: voxel axes do not span 3D space")
    image = np.concatenate(arrays).astype(np.float32)
    if image.shape[0] != channels:
        raise InputError(reference.path, f"has {image.shape[0]} channel(s) but preprocess.channels is {channels}")
    for c, channel in enumerate(image):
        if float(channel.max()) == float(channel.min()):
            raise InputError(volumes[min(c, len(volumes) - 1)].path, f"image is constant (value {channel.flat[0]:g})")
    label = None
    if label_volume is not None:
        label = _label_array(label_volume, label_values)
        _check_grid(reference, ref_shape, label_volume, label.shape, "label")
    return LoadedCase(record=record, image=image, label=label, affine=reference.affine)
