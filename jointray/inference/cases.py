"""Inference stage 1 (CPU): any input → a validated, preprocessed :class:`PreparedCase`.

Inputs: a :class:`~jointray.data.records.CaseRecord` (paths, as ``evaluate`` reads them), a path, the
bytes of an upload (``.nii``, ``.nii.gz`` or a zip of one DICOM series, told apart by their content,
not their name), or an array with its affine. Every input goes through the checks that ``prepare``
applies to training data (:func:`~jointray.data.validate.check_case`) and the checkpoint's own
PreprocessSpec, with one difference: an input larger than the training window along an axis is kept
whole there (:func:`~jointray.data.preprocess.preprocess_case` with ``keep_whole=True``) instead of
being cropped around its centre, and the forward stage slides the window over it.

Bad input raises :class:`~jointray.data.errors.InputError` naming the input and the problem; limits
(voxels from the header, bytes of an upload and of an unzipped series) are checked before data is
read or inflated.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from jointray.data.clinical import ClinicalSchema
from jointray.data.errors import InputError
from jointray.data.preprocess import Geometry, preprocess_case
from jointray.data.records import CaseRecord
from jointray.data.spec import PreprocessSpec
from jointray.data.validate import LoadedCase, check_case, load_case
from jointray.data.volumes import Volume

#: Standardised distance from the training mean beyond which a numeric clinical value is refused.
MAX_CLINICAL_Z = 10.0
_NIFTI_HEADER_SIZES = (348, 540)  # NIfTI-1 and NIfTI-2 ``sizeof_hdr``


@dataclass
class PreparedCase:
    """One case ready for the forward stage.

    ``image`` (C, X, Y, Z) float32 on the prepared grid: exactly the training window's shape
    (``path == "window"``) or larger along some axis (``"sliding_window"``). ``label`` is a reference
    label on the input's own grid, when one came with the case (for scoring only).
    """

    name: str
    image: np.ndarray
    geometry: Geometry
    clinical: dict[str, Any]
    label: np.ndarray | None = None
    record: CaseRecord | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    window: tuple[int, int, int] = (0, 0, 0)  # the training window, PreprocessSpec.target_shape
    original: np.ndarray | None = None  # (C, X, Y, Z) the validated input, for display; not needed to predict

    @property
    def path(self) -> str:
        return "window" if tuple(self.image.shape[1:]) == tuple(self.window) else "sliding_window"


def sniff_suffix(data: bytes, name: str) -> str:
    """The file suffix that ``data`` really is: ``.nii``, ``.nii.gz`` or ``.zip``; anything else is an InputError."""
    if not data:
        raise InputError(name, "empty upload")
    if data[:2] == b"\x1f\x8b":
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(4)
        except (OSError, EOFError) as exc:
            raise InputError(name, f"corrupt gzip data ({type(exc).__name__}: {exc})") from None
        if len(head) == 4 and _is_nifti_header(head):
            return ".nii.gz"
        raise InputError(name, "gzip data that is not a NIfTI image")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return ".zip"
    if len(data) >= 4 and _is_nifti_header(data[:4]):
        return ".nii"
    if data[128:132] == b"DICM":
        raise InputError(name, "a single DICOM file: send a zip of the whole series")
    raise InputError(name, "neither a NIfTI image (.nii, .nii.gz) nor a zip of one DICOM series")


def _is_nifti_header(first4: bytes) -> bool:
    return any(struct.unpack(order + "i", first4)[0] in _NIFTI_HEADER_SIZES for order in "<>")


def check_zip(data: bytes, name: str, max_bytes: int | None) -> None:
    """Refuse a zip before anything is inflated: unreadable, an unsafe member name, or more than ``max_bytes``
    uncompressed in all (the sizes come from the central directory; :mod:`zipfile` never yields more). Without
    ``max_bytes`` the DICOM reader's per-file limit and ``data.max_voxels`` still bound what is read."""
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(name, f"unreadable zip file ({type(exc).__name__}: {exc})") from None
    for info in members:
        member = PurePosixPath(info.filename.replace("\\", "/"))
        if member.is_absolute() or ".." in member.parts or (member.parts and ":" in member.parts[0]):
            raise InputError(name, f"zip member name {info.filename!r} points outside the archive")
    total = sum(info.file_size for info in members)
    if max_bytes is not None and total > max_bytes:
        raise InputError(name, f"zip holds {total:,} bytes uncompressed, over the limit of {max_bytes:,}")


def check_clinical(values: dict[str, Any], schema: ClinicalSchema, name: str) -> dict[str, Any]:
    """A request's clinical record, checked against the features the model was trained with.

    Unknown keys, non-numbers for numeric features, non-finite numbers and values more than
    ``MAX_CLINICAL_Z`` training standard deviations from the training mean are InputErrors; None means
    missing (normal). Categories are compared as text; one never seen in training counts as missing.
    """
    if not isinstance(values, dict):
        raise InputError(name, f"clinical must be a JSON object, got {type(values).__name__}")
    known = {f.name: f for f in schema.numeric} | {f.name: f for f in schema.categorical}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(name, f"unknown clinical key(s) {unknown}; this model reads {sorted(known) or 'none'}")
    clean: dict[str, Any] = {}
    for feature in schema.numeric:
        raw = values.get(feature.name)
        if raw is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise InputError(name, f"clinical {feature.name}={raw!r} is not a number")
        if not math.isfinite(raw):
            raise InputError(name, f"clinical {feature.name}={raw!r} is not finite")
        low, high = feature.mean - MAX_CLINICAL_Z * feature.std, feature.mean + MAX_CLINICAL_Z * feature.std
        if not low <= raw <= high:
            raise InputError(name, f"clinical {feature.name}={raw!r} is outside [{low:.4g}, {high:.4g}] (training "
                                   f"mean ± {MAX_CLINICAL_Z:g} SD)")
        clean[feature.name] = float(raw)
    for feature in schema.categorical:
        raw = values.get(feature.name)
        if raw is None:
            continue
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise InputError(name, f"clinical {feature.name}={raw!r} is not a category (text or number)")
        clean[feature.name] = str(raw)
    return clean


class CasePreparer:
    """Validates and preprocesses inputs with one checkpoint's spec (see the module docstring)."""

    def __init__(self, spec: PreprocessSpec, schema: ClinicalSchema, label_values: set[int], max_voxels: int):
        self.spec, self.schema, self.label_values, self.max_voxels = spec, schema, label_values, max_voxels

    def record(self, record: CaseRecord) -> PreparedCase:
        """A case as a source found it (paths, raw clinical values, optional label)."""
        started = time.perf_counter()
        case = load_case(record, self.label_values, self.max_voxels, self.spec.channels)
        clinical = {k: v for k, v in record.clinical.items() if v is not None}
        for feature in self.schema.numeric:  # a manifest's text in a numeric column fails this case only
            raw = clinical.get(feature.name)
            if raw is not None:
                try:
                    clinical[feature.name] = float(raw)
                except (TypeError, ValueError):
                    raise InputError(record.images[0], f"clinical {feature.name}={raw!r} is not a number") from None
        return self._preprocess(case, record.subject_id, clinical, started, record.images[0])

    def path(self, path: str | Path, clinical: dict[str, Any] | None = None) -> PreparedCase:
        """A NIfTI file, a DICOM folder or a zip of one series, with an optional clinical record."""
        path = Path(path)
        name = path.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".zip")
        clean = check_clinical(clinical or {}, self.schema, str(path))
        prepared = self.record(CaseRecord(subject_id=name, images=[str(path)]))
        prepared.clinical = clean
        return prepared

    def upload(self, data: bytes, name: str, clinical: dict[str, Any] | None = None,
               max_bytes: int | None = None) -> PreparedCase:
        """The bytes of an upload; errors name ``name`` (the client's file name), never a temporary path."""
        started = time.perf_counter()
        suffix = sniff_suffix(data, name)
        if suffix == ".zip":
            check_zip(data, name, max_bytes)
        clean = check_clinical(clinical or {}, self.schema, name)
        with tempfile.TemporaryDirectory(prefix="jointray-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                case = load_case(CaseRecord(subject_id=name, images=[str(path)]), self.label_values,
                                 self.max_voxels, self.spec.channels)
            except InputError as exc:
                raise InputError(name, exc.reason.replace(str(path), name)) from None
        return self._preprocess(case, name, clean, started)

    def array(self, array: np.ndarray, affine: np.ndarray, name: str = "array",
              clinical: dict[str, Any] | None = None) -> PreparedCase:
        """An image array (X, Y, Z) or (X, Y, Z, C) with its voxel-to-RAS affine (4, 4)."""
        started = time.perf_counter()
        array, affine = np.asarray(array), np.asarray(affine, dtype=np.float64)
        if math.prod(array.shape) > self.max_voxels:
            raise InputError(name, f"{math.prod(array.shape):,} voxels, over the limit of {self.max_voxels:,}")
        if not (np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating)):
            raise InputError(name, f"image dtype {array.dtype} is not real-valued")
        clean = check_clinical(clinical or {}, self.schema, name)
        record = CaseRecord(subject_id=name, images=[name])
        case = check_case(record, [Volume(array=array, affine=affine, path=name)], None, self.label_values,
                          self.spec.channels)
        return self._preprocess(case, name, clean, started)

    def _preprocess(self, case: LoadedCase, name: str, clinical: dict[str, Any], started: float,
                    where: str | None = None) -> PreparedCase:
        read = time.perf_counter()
        try:
            prepared = preprocess_case(case.image, None, case.affine, self.spec, keep_whole=True)
        except Exception as exc:  # numerically hopeless input: the case's problem, not the server's
            raise InputError(where or name, f"preprocessing failed ({type(exc).__name__}: {exc})") from None
        return PreparedCase(name=name, image=prepared.image, geometry=prepared.geometry, clinical=clinical,
                            label=case.label, record=case.record, window=tuple(self.spec.target_shape),
                            original=case.image,
                            seconds={"read_validate": read - started, "preprocess": time.perf_counter() - read})
