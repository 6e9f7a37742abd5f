"""Reading one DICOM series (a folder, searched recursively, or a .zip of one) into a volume and an affine.

Conventions
-----------
* The volume is float32 of shape ``(columns, rows, slices)``. Voxel ``(i, j, k)`` has ``i`` along the
  row direction cosine (first ImageOrientationPatient triplet; ``i`` counts columns), ``j`` along the
  column direction cosine (second triplet; ``j`` counts rows) and ``k`` along the slice normal
  ``row x column``. pydicom's ``pixel_array`` is indexed ``[row j, column i]``, so
  ``volume[i, j, k] = slice_k.pixel_array[j, i]``. Stored values are mapped through
  RescaleSlope/RescaleIntercept, slice by slice (they may differ between slices).
* Slices are ordered by ImagePositionPatient projected on the slice normal, never by file name or
  InstanceNumber: neither is required to follow the anatomy.
* The affine maps voxel indices to RAS+ millimetres (the nibabel/NIfTI convention). DICOM patient
  coordinates are LPS+, and per PS3.3 C.7.6.2.1.1::

      P_lps(i, j, k) = IPP_0 + X * di * i + Y * dj * j + S * k

  with ``X``, ``Y`` the row and column direction cosines, ``di = PixelSpacing[1]`` (the distance
  between columns), ``dj = PixelSpacing[0]`` (the distance between rows), ``IPP_0`` the position of
  the first sorted slice and ``S = (IPP_last - IPP_0) / (N - 1)`` the mean step between slices (a
  gantry tilt shows up as a shear in ``S``). ``RAS = diag(-1, -1, 1) @ LPS``.

Reading happens in two passes: every header first (``stop_before_pixels=True``), so that mixed
series, broken geometry and voxel counts over ``max_voxels`` are refused before any pixel data is
decoded; then the pixel data of the accepted slices, one file at a time.

Files without the ``DICM`` prefix, hidden files and DICOM objects that are not images (DICOMDIR,
structured reports, private non-image objects) are skipped quietly. Anything else that cannot be used
raises :class:`~jointray.data.errors.InputError` with the input path and a one-line reason.

References
----------
* DICOM PS3.3 C.7.6.2.1.1, Image Position and Image Orientation:
  https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.7.6.2.html
* DICOM PS3.3 10.7.1.3, Pixel Spacing value order:
  https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_10.7.html
* nibabel, "Defining the DICOM orientation": https://nipy.org/nibabel/dicom/dicom_orientation.html
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from jointray.data.errors import InputError

__all__ = ["MAX_ZIP_MEMBER_BYTES", "read_dicom_series"]

#: A zip member whose header declares more uncompressed bytes than this is refused. One slice of a
#: 3D series is a few MiB at most, and :mod:`zipfile` never yields more bytes than the header declares,
#: so this bounds the memory a zip bomb can take.
MAX_ZIP_MEMBER_BYTES = 64 * 1024 * 1024

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PREAMBLE_BYTES = 128  # a DICOM Part 10 file is a 128-byte preamble followed by b"DICM"
_REQUIRED_TAGS = (
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
)
# zipfile's bzip2/lzma readers decompress a whole compressed chunk at once, without an output bound.
_SAFE_ZIP_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)

# Scanners write direction cosines with about six decimals and positions with sub-micron jitter;
# differences above these tolerances are real differences in geometry.
_COSINE_TOLERANCE = 1e-3
_PIXEL_SPACING_TOLERANCE_MM = 1e-3
_DUPLICATE_TOLERANCE_MM = 1e-3
#: A step between neighbouring slices above this multiple of the median step is a missing slice.
_GAP_FACTOR = 1.5
#: How far (as a fraction of the mean step) a slice may sit from the even grid the affine assumes.
_GRID_TOLERANCE = 0.05
_MAX_SERIES_LISTED = 5


@dataclass(frozen=True)
class _Member:
    """One candidate file: ``name`` (relative to the input, for messages) and a way to open it."""

    name: str
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class _Slice:
    """The header facts of one image file that the volume needs."""

    member: _Member
    series_uid: str
    description: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # DICOM order: (between rows, between columns)
    orientation: np.ndarray  # 6 direction cosines: row direction, then column direction
    position: np.ndarray  # ImagePositionPatient, LPS mm

    @property
    def row_cosine(self) -> np.ndarray:
        return self.orientation[:3]

    @property
    def column_cosine(self) -> np.ndarray:
        return self.orientation[3:]


def _describe(exc: Exception) -> str:
    """The exception as one short line: reasons must fit on one line of a quarantine report."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:200]}"


def _is_hidden(relative: str) -> bool:
    # Covers .DS_Store, AppleDouble "._x.dcm" files and the "__MACOSX" folder that macOS adds to zips.
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.split("/"))


def _folder_members(root: Path) -> list[_Member]:
    members = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for file in sorted(files):
            full = Path(folder) / file
            relative = full.relative_to(root).as_posix()
            if not _is_hidden(relative):
                members.append(_Member(relative, functools.partial(open, full, "rb")))
    return members


def _zip_members(path: Path, archive: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if info.is_dir() or _is_hidden(info.filename):
            continue
        if info.file_size > MAX_ZIP_MEMBER_BYTES:
            raise InputError(
                path,
                f"zip member {info.filename} is {info.file_size:,} bytes uncompressed, over the "
                f"limit of {MAX_ZIP_MEMBER_BYTES:,} bytes for one file",
            )
        if info.compress_type not in _SAFE_ZIP_COMPRESSION:
            raise InputError(
                path, f"zip member {info.filename} uses compression method {info.compress_type}; "
                "only stored and deflate are accepted"
            )
        if info.flag_bits & 0x1:
            raise InputError(path, f"zip member {info.filename} is encrypted")
        members.append(_Member(info.filename, functools.partial(archive.open, info)))
    return members


@contextmanager
def _open_members(path: Path) -> Iterator[list[_Member]]:
    """The candidate files of a folder or a zip; a zip stays open (and in memory only) meanwhile."""
    if path.is_dir():
        yield _folder_members(path)
        return
    if not (path.is_file() and path.suffix.lower() == ".zip"):
        raise InputError(path, "not a DICOM series: expected a folder or a .zip of one series")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(path, f"unreadable zip file ({_describe(exc)})") from None
    with archive:
        yield _zip_members(path, archive)


def _is_image_object(ds: Dataset) -> bool:
    """Whether the SOP class is an image storage class (unknown counts as an image, to stay strict)."""
    file_meta = getattr(ds, "file_meta", None)
    sop_class = (file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None) or ds.get("SOPClassUID")
    return sop_class is None or "Image Storage" in UID(str(sop_class)).name


def _read_header(path: Path, member: _Member) -> Dataset | None:
    """The header of an image file, or None for a file that is not a DICOM image."""
    try:
        with member.open() as fp:
            if fp.read(_PREAMBLE_BYTES + 4)[_PREAMBLE_BYTES:] != b"DICM":
                return None
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except Exception as exc:  # pydicom and zipfile raise many types for damaged bytes; all mean "corrupt"
        raise InputError(path, f"corrupt DICOM file {member.name} ({_describe(exc)})") from None
    if "Rows" in ds:
        return ds
    # pydicom stops quietly at the end of a truncated file, so an image cut inside its header looks
    # like a header without Rows; only a non-image SOP class (DICOMDIR, SR, ...) may lack them.
    if _is_image_object(ds):
        raise InputError(path, f"corrupt DICOM file {member.name}: image header without Rows/Columns (truncated?)")
    return None


def _is_missing(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is None or (isinstance(value, (str, bytes, list, tuple, MultiValue)) and not value)


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds[keyword].value
    values = [float(v) for v in (value if isinstance(value, MultiValue) else [value])]
    if len(values) != count or not np.all(np.isfinite(values)):
        raise ValueError(f"{keyword} should hold {count} finite numbers, got {value!r}")
    return np.asarray(values, dtype=np.float64)


def _check_orientation(orientation: np.ndarray) -> None:
    row, column = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > _COSINE_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > _COSINE_TOLERANCE
        or abs(row @ column) > _COSINE_TOLERANCE
    ):
        raise ValueError(f"ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")


def _int_tag(path: Path, member: _Member, ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword) or default)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"malformed {keyword} in {member.name} ({_describe(exc)})") from None


def _parse_header(path: Path, member: _Member, ds: Dataset) -> _Slice:
    frames = _int_tag(path, member, ds, "NumberOfFrames", 1)
    if frames > 1:
        raise InputError(
            path, f"multi-frame DICOM is not supported: {member.name} holds {frames} frames; "
            "give one file per slice"
        )
    samples = _int_tag(path, member, ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise InputError(
            path, f"not a grayscale image: {member.name} has SamplesPerPixel={samples} "
            f"(PhotometricInterpretation {ds.get('PhotometricInterpretation')}); "
            "only single-channel series are supported"
        )
    missing = [keyword for keyword in _REQUIRED_TAGS if _is_missing(ds, keyword)]
    if missing:
        raise InputError(path, f"missing geometry tag(s) {', '.join(missing)} in {member.name}")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        pixel_spacing = _floats(ds, "PixelSpacing", 2)
        orientation = _floats(ds, "ImageOrientationPatient", 6)
        position = _floats(ds, "ImagePositionPatient", 3)
        if rows < 1 or columns < 1 or np.any(pixel_spacing <= 0):
            raise ValueError(
                f"Rows {rows}, Columns {columns} and PixelSpacing {pixel_spacing.tolist()} must be positive"
            )
        _check_orientation(orientation)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"malformed geometry in {member.name}: {_describe(exc)}") from None
    return _Slice(
        member=member,
        series_uid=str(ds.SeriesInstanceUID),
        description=str(ds.get("SeriesDescription") or ""),
        rows=rows,
        columns=columns,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        orientation=orientation,
        position=position,
    )


def _one_series(path: Path, slices: list[_Slice], looked_at: int) -> list[_Slice]:
    if not slices:
        raise InputError(path, f"no DICOM image files found ({looked_at} files looked at)")
    by_uid: dict[str, list[_Slice]] = {}
    for s in slices:
        by_uid.setdefault(s.series_uid, []).append(s)
    if len(by_uid) == 1:
        return slices
    listed = [
        f"{group[0].description or 'no description'!r} with {len(group)} files, UID {uid}"
        for uid, group in list(by_uid.items())[:_MAX_SERIES_LISTED]
    ]
    more = len(by_uid) - len(listed)
    if more:
        listed.append(f"and {more} more")
    raise InputError(
        path, f"mixed series: {len(by_uid)} series found ({'; '.join(listed)}); give one series per input"
    )


def _check_size(path: Path, slices: list[_Slice], max_voxels: int) -> None:
    voxels = sum(s.rows * s.columns for s in slices)
    if voxels > max_voxels:
        first = slices[0]
        raise InputError(
            path, f"headers claim {voxels:,} voxels ({len(slices)} slices of {first.rows}x{first.columns}), "
            f"over the limit of {max_voxels:,} (data.max_voxels)"
        )


def _check_consistent(path: Path, slices: list[_Slice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(
                path, f"inconsistent image size: {first.member.name} is {first.rows}x{first.columns} "
                f"(rows x columns) but {s.member.name} is {s.rows}x{s.columns}"
            )
        if np.abs(np.subtract(s.pixel_spacing, first.pixel_spacing)).max() > _PIXEL_SPACING_TOLERANCE_MM:
            raise InputError(
                path, f"inconsistent PixelSpacing: {first.member.name} has {list(first.pixel_spacing)} "
                f"but {s.member.name} has {list(s.pixel_spacing)}"
            )
        if np.abs(s.orientation - first.orientation).max() > _COSINE_TOLERANCE:
            raise InputError(
                path, f"inconsistent ImageOrientationPatient: {first.member.name} has {first.orientation.tolist()} "
                f"but {s.member.name} has {s.orientation.tolist()}"
            )


def _sort_by_position(path: Path, slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """The slices in order along the normal, with their distances along it (mm)."""
    if len(slices) < 2:
        raise InputError(path, f"fewer than 2 slices ({len(slices)} found): a 3D volume needs a stack of slices")
    normal = np.cross(slices[0].row_cosine, slices[0].column_cosine)
    distances = np.array([s.position @ normal for s in slices])
    order = np.argsort(distances, kind="stable")
    return [slices[o] for o in order], distances[order]


def _slice_step(path: Path, ordered: list[_Slice], distances: np.ndarray) -> np.ndarray:
    """The mean step between slices (LPS mm), once the positions are known to form an even stack."""
    steps = np.diff(distances)
    duplicate = np.flatnonzero(steps < _DUPLICATE_TOLERANCE_MM)
    if duplicate.size:
        k = int(duplicate[0])
        raise InputError(
            path, f"duplicate slice position: {ordered[k].member.name} and {ordered[k + 1].member.name} "
            f"are both at {distances[k]:.6g} mm along the slice normal"
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * median)
    if gaps.size:
        k = int(gaps[0])
        raise InputError(
            path, f"incomplete series: gap of {steps[k]:.4g} mm between slices at positions "
            f"{distances[k]:.6g} and {distances[k + 1]:.6g} (expected ~{median:.4g} mm)"
        )
    positions = np.stack([s.position for s in ordered])
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    # The affine puts slice k at IPP_0 + k * step; smaller unevenness than a gap, or a tilt that
    # changes along the stack, would still put slices in the wrong place.
    deviation = np.linalg.norm(positions - (positions[0] + np.arange(len(ordered))[:, None] * step), axis=1)
    worst = int(np.argmax(deviation))
    if deviation[worst] > _GRID_TOLERANCE * np.linalg.norm(step):
        raise InputError(
            path, f"non-uniform slice spacing: {ordered[worst].member.name} is {deviation[worst]:.4g} mm away "
            f"from an even stack with steps of {np.linalg.norm(step):.4g} mm"
        )
    return step


def _affine(first: _Slice, step: np.ndarray) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0] = first.row_cosine * first.pixel_spacing[1]
    lps[:3, 1] = first.column_cosine * first.pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return _LPS_TO_RAS @ lps


def _rescale(path: Path, member: _Member, ds: Dataset) -> tuple[float, float]:
    try:
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"malformed RescaleSlope/RescaleIntercept in {member.name} ({_describe(exc)})") from None
    return slope, intercept


def _slice_values(path: Path, s: _Slice) -> np.ndarray:
    """One slice's rescaled values, indexed [row j, column i] like ``pixel_array``."""
    try:
        with s.member.open() as fp:
            ds = pydicom.dcmread(fp)
            stored = ds.pixel_array
    except Exception as exc:  # truncated data, undecodable transfer syntax, damaged zip member, ...
        raise InputError(
            path, f"corrupt DICOM file {s.member.name}: cannot read pixel data ({_describe(exc)})"
        ) from None
    slope, intercept = _rescale(path, s.member, ds)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def read_dicom_series(path: str | Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series from a folder (recursively) or a .zip of one.

    Args:
        path: a folder holding the files of one series (in any sub-folders), or a .zip of such files.
        max_voxels: refuse a series whose headers claim more voxels (rows * columns * slices) than
            this, before any pixel data is read.

    Returns:
        ``(volume, affine)``: the volume is float32 of shape ``(columns, rows, slices)``, i.e. voxel
        index ``(i, j, k)`` with ``i`` along the row direction cosine, ``j`` along the column direction
        cosine and ``k`` along the slice normal; the affine is 4x4 float64 and maps voxel indices to
        RAS+ world millimetres (the nibabel convention).

    Raises:
        InputError: no DICOM image, several series, broken or uneven geometry, too many voxels, or a
            corrupt file; the reason names the file where there is one.
    """
    path = Path(path)
    with _open_members(path) as members:
        slices = []
        for member in members:
            ds = _read_header(path, member)
            if ds is not None:
                slices.append(_parse_header(path, member, ds))
        slices = _one_series(path, slices, len(members))
        _check_size(path, slices, max_voxels)
        _check_consistent(path, slices)
        ordered, distances = _sort_by_position(path, slices)
        step = _slice_step(path, ordered, distances)
        first = ordered[0]
        volume = np.empty((first.columns, first.rows, len(ordered)), dtype=np.float32)
        for k, s in enumerate(ordered):
            volume[:, :, k] = _slice_values(path, s).T
    return volume, _affine(first, step)
