"""Preprocessing of one case, and its exact inverse for masks.

Steps (every parameter lives in :class:`~jointray.data.spec.PreprocessSpec`):

1. **Reorient** to RAS+ by permuting/flipping voxel axes (no interpolation; nibabel orientations).
2. **Resample** to ``target_spacing``: trilinear for images, nearest for labels, with the
   ``align_corners=False`` convention — output voxel ``i`` samples input index ``(i + 0.5) * r - 0.5``
   with ``r = n_in / n_out`` — and the affine updated with the same map, so world coordinates of
   voxel centres stay correct.
3. **Normalise** intensity per channel (MONAI): z-score over the foreground (non-zero voxels) or a
   percentile clip rescaled to [0, 1].
4. **Crop/pad** to ``target_shape``. An axis that fits is padded symmetrically; a longer axis is
   cropped to a window centred on the label's bounding box (``crop_center="label"``, when the case
   has a label) or on the image centre. One integer ``crop_start`` per axis records both (negative
   means padding): prepared voxel ``i`` is resampled voxel ``crop_start + i``.

:func:`restore_to_original` undoes 4 → 2 → 1 for a prepared-space map (a predicted mask or a
probability map). Without resampling it reproduces an original label exactly, voxel for voxel, as
long as the crop kept the whole structure (``label_voxels_cropped == 0``).

Shapes: image (C, X, Y, Z) float32; label (X, Y, Z) uint8; outputs (C, *target_shape) and target_shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles
from nibabel import orientations as ornt_lib

from jointray.data.spec import PreprocessSpec

#: Relative difference below which a spacing counts as already on target (no resampling).
SPACING_TOLERANCE = 1e-3


@dataclass
class Geometry:
    """What it takes to map a prepared-space array back onto the original voxel grid."""

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray  # (4, 4)
    resampled_shape: tuple[int, int, int]  # after reorientation and resampling
    crop_start: tuple[int, int, int]
    affine: np.ndarray  # (4, 4) of the prepared grid

    @property
    def to_ras(self) -> np.ndarray:
        """nibabel orientation transform (3, 2) from the original axes to RAS."""
        return ornt_lib.ornt_transform(ornt_lib.io_orientation(self.original_affine), ornt_lib.axcodes2ornt("RAS"))

    @property
    def original_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.original_affine[:3, :3], axis=0))


@dataclass
class Prepared:
    image: np.ndarray  # (C, *target_shape) float32
    label: np.ndarray | None  # target_shape uint8
    geometry: Geometry
    label_voxels_cropped: int  # foreground voxels that fell outside the crop window


def _resample(array: np.ndarray, size: tuple[int, int, int], mode: str) -> np.ndarray:
    """(C, X, Y, Z) → (C, *size); ``mode`` is "trilinear" or "nearest-exact"."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(tensor, size=size, mode=mode, **kwargs)[0].numpy()


def _scale_affine(affine: np.ndarray, n_in: tuple[int, ...], n_out: tuple[int, ...]) -> np.ndarray:
    ratio = np.array(n_in, dtype=np.float64) / np.array(n_out, dtype=np.float64)
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = np.diag(ratio)
    voxel_map[:3, 3] = (ratio - 1.0) / 2.0  # the align_corners=False centre shift
    return affine @ voxel_map


def _resampled_shape(shape: tuple[int, ...], spacing: np.ndarray, target: tuple[float, float, float] | None):
    if target is None or np.allclose(spacing, target, rtol=SPACING_TOLERANCE):
        return tuple(shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def _normalise(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    if spec.intensity.mode == "zscore":
        transform = NormalizeIntensity(nonzero=spec.intensity.foreground_only, channel_wise=True)
    else:
        low, high = spec.intensity.percentiles
        transform = ScaleIntensityRangePercentiles(low, high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    return np.asarray(transform(image), dtype=np.float32)


def _crop_starts(shape: tuple[int, ...], spec: PreprocessSpec, label: np.ndarray | None,
                 keep_whole: bool = False) -> tuple[int, int, int]:
    centre = np.array(shape, dtype=np.float64) / 2.0
    if spec.crop_center == "label" and label is not None and label.any():
        nonzero = np.nonzero(label)
        centre = np.array([(idx.min() + idx.max() + 1) / 2.0 for idx in nonzero])
    starts = []
    for n, t, c in zip(shape, spec.target_shape, centre):
        if n <= t:
            starts.append(-((t - n) // 2))
        elif keep_whole:
            starts.append(0)
        else:
            starts.append(int(np.clip(round(c - t / 2.0), 0, n - t)))
    return tuple(starts)


def _window(array: np.ndarray, starts: tuple[int, ...], size: tuple[int, ...], fill: float) -> np.ndarray:
    """Take ``array[..., s:s+t]`` per spatial axis, filling outside the array with ``fill``."""
    out = np.full(array.shape[:-3] + tuple(size), fill, dtype=array.dtype)
    src, dst = [Ellipsis], [Ellipsis]
    for s, t, n in zip(starts, size, array.shape[-3:]):
        lo, hi = max(s, 0), min(s + t, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _unwindow(array: np.ndarray, starts: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_window`: place a window back into a zero array of ``shape``."""
    out = np.zeros(array.shape[:-3] + tuple(shape), dtype=array.dtype)
    src, dst = [Ellipsis], [Ellipsis]
    for s, t, n in zip(starts, array.shape[-3:], shape):
        lo, hi = max(s, 0), min(s + t, n)
        dst.append(slice(lo, hi))
        src.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def preprocess_case(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, spec: PreprocessSpec,
                    keep_whole: bool = False) -> Prepared:
    """Apply the spec to one case; see the module docstring for the steps and shapes.

    ``keep_whole``: an axis longer than ``target_shape`` is kept whole instead of cropped (inference over
    inputs larger than the training window); shorter axes are still padded, so every axis of the output
    is at least ``target_shape``.
    """
    original_shape = tuple(int(n) for n in image.shape[1:])
    to_ras = ornt_lib.ornt_transform(ornt_lib.io_orientation(affine), ornt_lib.axcodes2ornt("RAS"))
    ras_affine = affine @ ornt_lib.inv_ornt_aff(to_ras, original_shape)
    image = np.stack([ornt_lib.apply_orientation(c, to_ras) for c in image])
    if label is not None:
        label = ornt_lib.apply_orientation(label, to_ras)

    ras_shape = image.shape[1:]
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    resampled_shape = _resampled_shape(ras_shape, spacing, spec.target_spacing)
    if resampled_shape != ras_shape:
        image = _resample(image, resampled_shape, "trilinear")
        if label is not None:
            label = _resample(label[None], resampled_shape, "nearest-exact")[0].astype(np.uint8)
        ras_affine = _scale_affine(ras_affine, ras_shape, resampled_shape)

    image = _normalise(image, spec)
    starts = _crop_starts(resampled_shape, spec, label, keep_whole)
    size = tuple(max(n, t) for n, t in zip(resampled_shape, spec.target_shape)) if keep_whole else spec.target_shape
    shift = np.eye(4)
    shift[:3, 3] = starts
    geometry = Geometry(
        original_shape=original_shape,
        original_affine=np.asarray(affine, dtype=np.float64),
        resampled_shape=resampled_shape,
        crop_start=starts,
        affine=ras_affine @ shift,
    )
    out_label, lost = None, 0
    if label is not None:
        out_label = _window(label, starts, size, 0)
        lost = int(np.count_nonzero(label)) - int(np.count_nonzero(out_label))
    out_image = _window(image, starts, size, spec.pad_value).astype(np.float32)
    return Prepared(image=out_image, label=out_label, geometry=geometry, label_voxels_cropped=lost)


def restore_to_original(array: np.ndarray, geometry: Geometry, mode: str = "nearest") -> np.ndarray:
    """Map a prepared-space array ((*target_shape) or (C, *target_shape)) onto the original voxel grid.

    ``mode="nearest"`` for label maps (dtype kept), ``"linear"`` for probabilities or uncertainty.
    Voxels outside the crop window get 0.
    """
    squeeze = array.ndim == 3
    values = array[None] if squeeze else array
    full = _unwindow(values, geometry.crop_start, geometry.resampled_shape)
    to_ras = geometry.to_ras
    ras_shape = [0, 0, 0]
    for axis, (target_axis, _) in enumerate(to_ras):  # original axis → its RAS axis
        ras_shape[int(target_axis)] = geometry.original_shape[axis]
    ras_shape = tuple(ras_shape)
    if tuple(geometry.resampled_shape) != ras_shape:
        resample_mode = "nearest-exact" if mode == "nearest" else "trilinear"
        full = _resample(full, ras_shape, resample_mode).astype(values.dtype)
    from_ras = ornt_lib.ornt_transform(ornt_lib.axcodes2ornt("RAS"), ornt_lib.io_orientation(geometry.original_affine))
    out = np.stack([ornt_lib.apply_orientation(c, from_ras) for c in full])
    return out[0] if squeeze else out
