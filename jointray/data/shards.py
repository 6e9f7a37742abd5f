"""The row schema of prepared Parquet shards, and the files written beside them.

One row per case. Tensor columns (Ray's Arrow tensor type):
``image`` (C, X, Y, Z) float32, ``label`` (X, Y, Z) uint8 (zeros where ``has_label`` is false),
``affine`` and ``original_affine`` (4, 4) float64; ``original_shape``, ``resampled_shape`` and
``crop_start`` (3,) int64. Scalars: ``subject_id``, ``has_label``, ``label_voxels_cropped``,
targets ``mmse``/``cdr``/``time``/``event`` (float64, NaN = missing), ``split`` ("" = none),
``fold`` (-1 = none), ``source_images`` (JSON list of paths), ``source_label`` ("" = none), and one
``clin_<name>`` column per clinical input declared in ``data.clinical_columns`` (numeric: float64 with
NaN; categorical: string with nulls).

Beside the shards: ``spec.json`` (the :class:`~jointray.data.spec.PreprocessSpec` and its digest),
``source.json`` (what they were prepared from, see :mod:`jointray.data.provenance`) and ``report.json``
(what was prepared and what was quarantined, and why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray

from jointray.data.preprocess import Geometry, Prepared
from jointray.data.records import TARGETS, CaseRecord
from jointray.data.spec import PreprocessSpec

SHARDS_DIR = "shards"
SPEC_FILE = "spec.json"
SOURCE_FILE = "source.json"
REPORT_FILE = "report.json"
CLINICAL_PREFIX = "clin_"


def case_row(record: CaseRecord, prepared: Prepared, kinds: dict[str, str]) -> dict[str, Any]:
    """One shard row; ``kinds`` maps each clinical input to "numeric" or "categorical" (``data.clinical_columns``)."""
    g = prepared.geometry
    row: dict[str, Any] = {
        "subject_id": record.subject_id,
        "image": prepared.image,
        "label": prepared.label if prepared.label is not None else np.zeros(prepared.image.shape[1:], np.uint8),
        "has_label": prepared.label is not None,
        "affine": g.affine,
        "original_affine": g.original_affine,
        "original_shape": np.array(g.original_shape, np.int64),
        "resampled_shape": np.array(g.resampled_shape, np.int64),
        "crop_start": np.array(g.crop_start, np.int64),
        "label_voxels_cropped": prepared.label_voxels_cropped,
        "split": record.split or "",
        "fold": -1 if record.fold is None else record.fold,
        "source_images": json.dumps(record.images),
        "source_label": record.label or "",
    }
    for name in TARGETS:
        value = record.targets.get(name)
        row[name] = np.nan if value is None else float(value)
    for column, kind in kinds.items():
        value = record.clinical.get(column)
        if kind == "numeric":
            row[CLINICAL_PREFIX + column] = np.nan if value is None else float(value)
        else:
            row[CLINICAL_PREFIX + column] = None if value is None else str(value)
    return row


def empty_prepared(spec: PreprocessSpec) -> Prepared:
    """A :class:`Prepared` of the right shapes holding no data (the stand-in for a quarantined case)."""
    zeros3 = (0, 0, 0)
    geometry = Geometry(zeros3, np.zeros((4, 4)), zeros3, zeros3, np.zeros((4, 4)))
    return Prepared(np.zeros((spec.channels, *spec.target_shape), np.float32), None, geometry, 0)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows from :func:`case_row` → an Arrow table with tensor columns and explicit scalar types.

    Types are explicit so that a block whose categorical values happen to be all missing still has
    a string column, and every block of a dataset shares one schema.
    """
    columns = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            columns[key] = ArrowTensorArray.from_numpy(np.stack(values))
        else:
            present = next((v for v in values if v is not None), "")
            kind = {bool: pa.bool_(), int: pa.int64(), float: pa.float64()}.get(type(present), pa.string())
            columns[key] = pa.array(values, type=kind)
    return pa.table(columns)


def geometry_from_row(row: dict[str, Any]) -> Geometry:
    """The :class:`Geometry` stored in a shard row (as read back by Ray Data or pyarrow)."""
    return Geometry(
        original_shape=tuple(int(n) for n in row["original_shape"]),
        original_affine=np.asarray(row["original_affine"], np.float64).reshape(4, 4),
        resampled_shape=tuple(int(n) for n in row["resampled_shape"]),
        crop_start=tuple(int(n) for n in row["crop_start"]),
        affine=np.asarray(row["affine"], np.float64).reshape(4, 4),
    )


def write_spec(folder: Path, spec: PreprocessSpec) -> None:
    payload = {"digest": spec.digest(), "spec": spec.model_dump(mode="json")}
    (folder / SPEC_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def read_spec(folder: str | Path) -> PreprocessSpec:
    """Load ``spec.json`` and check that its digest still matches its parameters."""
    path = Path(folder) / SPEC_FILE
    payload = json.loads(path.read_text())
    spec = PreprocessSpec.model_validate(payload["spec"])
    if spec.digest() != payload["digest"]:
        raise ValueError(f"{path}: digest {payload['digest']} does not match its parameters ({spec.digest()})")
    return spec
