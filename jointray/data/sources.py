"""Sources: find the cases of a dataset without reading any image.

Each source returns a :class:`Scan`: the case records it found and the inputs it refused (files that
cannot be paired, entries that give one subject different files or values, impossible target values).
An entry listed twice exactly is kept once and reported, not refused. Reading and checking the images
happens later, in parallel, in :mod:`jointray.data.validate`.

Supported:
- an MSD folder (``dataset.json`` + ``imagesTr/`` + ``labelsTr/``; files the JSON does not pair are reported);
- a manifest table (CSV or Parquet) with ``subject_id``, one or more image columns, optional ``label``,
  targets ``mmse``/``cdr``/``time``/``event``, optional ``split``/``fold`` and any other columns;
- a DICOM folder: one case per sub-folder or zip (or the folder itself when it holds the slices);
- the built-in synthetic cohort, generated as NIfTI + manifest and then read as a manifest.
A clinical table joined by ``subject_id`` can be added to any of them. Of the other columns of the
manifest and the clinical table, only those named in ``data.clinical_columns`` become clinical inputs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from jointray.config import ConfigError, DataConfig
from jointray.data.records import RESERVED_COLUMNS, TARGETS, CaseRecord, Quarantined, clean_value
from jointray.data.synthetic import cohort_matches, generate_cohort

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Allowed target values; anything else is a data-entry error worth a person's look.
_CDR_STAGES = {0.0, 0.5, 1.0, 2.0, 3.0}


@dataclass
class Scan:
    """What a source holds. ``clinical_columns``: every non-reserved, non-image column its tables offer
    (the records carry only the declared ones once :func:`scan_source` is done); ``warnings``: notes for
    the report, ``{"subject_id", "message"}`` each."""

    records: list[CaseRecord] = field(default_factory=list)
    rejected: list[Quarantined] = field(default_factory=list)
    clinical_columns: list[str] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(_NIFTI_SUFFIXES) and not path.name.startswith(".")


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI_SUFFIXES[::-1]:
        name = name.removesuffix(suffix)
    return name


def scan_msd(root: Path, label_names: dict[int, str]) -> Scan:
    """Cases listed in ``dataset.json`` 'training', plus a report of every unpaired file in the folders."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise ConfigError(f"{root} is not an MSD folder: {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{meta_path}: not valid JSON ({exc})") from None
    declared = {int(k) for k in meta.get("labels", {})}
    if declared and declared != set(label_names):
        raise ConfigError(
            f"{meta_path} declares labels {sorted(declared)} but data.label_names has "
            f"{sorted(label_names)}; set data.label_names to match"
        )
    scan = Scan()
    paired: set[Path] = set()
    for entry in meta.get("training", []):
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        paired |= {image, label}
        scan.records.append(CaseRecord(subject_id=_case_id(image), images=[str(image)], label=str(label)))
    for folder, other in (("imagesTr", "label"), ("labelsTr", "image")):
        for path in sorted((root / folder).glob("*")):
            if _is_nifti(path) and path.resolve() not in paired:
                scan.rejected.append(
                    Quarantined(_case_id(path), str(path), f"unpaired: has no {other} in dataset.json", "scan")
                )
    return scan


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"table {path} does not exist")
    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype={"subject_id": str})
    else:
        raise ConfigError(f"table {path}: expected .csv, .tsv or .parquet")
    if "subject_id" not in table.columns:
        raise ConfigError(f"table {path} has no subject_id column (columns: {list(table.columns)})")
    table["subject_id"] = table["subject_id"].map(lambda v: None if clean_value(v) is None else str(v).strip())
    return table


def _target_problem(name: str, value: float) -> str | None:
    if name == "mmse" and not 0 <= value <= 30:
        return f"mmse={value:g} is outside 0..30"
    if name == "cdr" and value not in _CDR_STAGES:
        return f"cdr={value:g} is not a CDR stage {sorted(_CDR_STAGES)}"
    if name == "time" and value < 0:
        return f"time={value:g} is negative"
    if name == "event" and value not in (0.0, 1.0):
        return f"event={value:g} is not 0 or 1"
    return None


def _row_targets(row: dict[str, Any]) -> tuple[dict[str, float | None], str | None]:
    targets: dict[str, float | None] = {}
    for name in TARGETS:
        raw = clean_value(row.get(name))
        if raw is None:
            targets[name] = None
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return targets, f"{name}={raw!r} is not a number"
        problem = _target_problem(name, value)
        if problem:
            return targets, problem
        targets[name] = value
    return targets, None


def scan_manifest(path: Path, image_columns: list[str]) -> Scan:
    """One case per row; paths are relative to the manifest's folder."""
    table = _read_table(path)
    missing = [c for c in image_columns if c not in table.columns]
    if missing:
        raise ConfigError(
            f"manifest {path} lacks image column(s) {missing} (data.image_columns); it has {list(table.columns)}"
        )
    base = path.parent
    clinical_cols = [c for c in table.columns if c not in RESERVED_COLUMNS and c not in image_columns]
    scan = Scan(clinical_columns=clinical_cols)
    for index, row in enumerate(table.to_dict("records")):
        where = f"{path} row {index + 2}"  # +2: header line and 1-based rows, as a spreadsheet shows them
        subject = row["subject_id"]
        if subject is None:
            scan.rejected.append(Quarantined(None, where, "subject_id is empty", "scan"))
            continue
        images = [clean_value(row[c]) for c in image_columns]
        if any(p is None for p in images):
            empty = [c for c, p in zip(image_columns, images) if p is None]
            scan.rejected.append(Quarantined(subject, where, f"image path is empty in column(s) {empty}", "scan"))
            continue
        targets, problem = _row_targets(row)
        if problem:
            scan.rejected.append(Quarantined(subject, where, problem, "scan"))
            continue
        label = clean_value(row.get("label"))
        fold = clean_value(row.get("fold"))
        split = clean_value(row.get("split"))
        scan.records.append(
            CaseRecord(
                subject_id=subject,
                images=[str((base / str(p)).resolve()) for p in images],
                label=None if label is None else str((base / str(label)).resolve()),
                clinical={c: clean_value(row[c]) for c in clinical_cols},
                targets=targets,
                split=None if split is None else str(split),
                fold=None if fold is None else int(fold),
            )
        )
    return scan


def scan_dicom(root: Path) -> Scan:
    """One case per DICOM series: sub-folders and zips of ``root``, or ``root`` itself."""
    if not root.exists():
        raise ConfigError(f"DICOM input {root} does not exist")
    if root.is_file() or any(p.is_file() and p.suffix.lower() == ".dcm" for p in root.iterdir()):
        series = [root]
    else:
        series = sorted(p for p in root.iterdir() if p.is_dir() or p.suffix.lower() == ".zip")
    records = [CaseRecord(subject_id=p.stem if p.is_file() else p.name, images=[str(p.resolve())]) for p in series]
    return Scan(records=records)


def _join_clinical(scan: Scan, path: Path) -> None:
    """Left-join a clinical table onto the records: missing subjects and values are normal."""
    table = _read_table(path)
    counts = Counter(table["subject_id"])
    targets_in_table = [t for t in TARGETS if t in table.columns]
    extra = [c for c in table.columns if c not in RESERVED_COLUMNS]
    rows = {r["subject_id"]: r for r in table.to_dict("records")}
    kept = []
    for record in scan.records:
        if counts.get(record.subject_id, 0) > 1:
            scan.rejected.append(
                Quarantined(record.subject_id, str(path),
                            f"clinical table has {counts[record.subject_id]} rows for this subject", "scan")
            )
            continue
        row = rows.get(record.subject_id, {})
        record.clinical.update({c: clean_value(row.get(c)) for c in extra})
        if targets_in_table and row:
            targets, problem = _row_targets(row)
            if problem:
                scan.rejected.append(Quarantined(record.subject_id, str(path), problem, "scan"))
                continue
            record.targets.update({k: v for k, v in targets.items() if v is not None})
        kept.append(record)
    scan.records = kept
    scan.clinical_columns += [c for c in extra if c not in scan.clinical_columns]
    # Every record carries every clinical column, so shards have one schema.
    for record in scan.records:
        for column in scan.clinical_columns:
            record.clinical.setdefault(column, None)


def _select_clinical(scan: Scan, declared: dict[str, str], tables: list[Path]) -> None:
    """Keep only the declared clinical columns on every record, numeric ones as floats. A declared column
    that ``tables`` lack, or a numeric one holding text, is a ConfigError naming it: both mean the
    declaration and the data disagree, and a guess either way would change what the model sees."""
    where = " and ".join(str(t) for t in tables)
    missing = [c for c in declared if c not in scan.clinical_columns]
    if missing and not tables:
        raise ConfigError(f"data.clinical_columns lists {missing}, but this source has no table of clinical "
                          f"values: name one joined by subject_id in data.clinical")
    if missing:
        raise ConfigError(f"data.clinical_columns lists {missing}, but {where} has no such column "
                          f"(its other columns: {scan.clinical_columns or 'none'})")
    for column in (c for c, kind in declared.items() if kind == "numeric"):
        bad = []
        for record in scan.records:
            value = record.clinical.get(column)
            if value is None:
                continue
            try:
                record.clinical[column] = float(value)
            except (TypeError, ValueError):
                bad.append(f"{value!r} (subject {record.subject_id})")
        if bad:
            raise ConfigError(f"data.clinical_columns: {column!r} is declared numeric, but {where} holds "
                              f"{', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}: fix the values or "
                              f"declare it categorical")
    for record in scan.records:
        record.clinical = {c: record.clinical.get(c) for c in declared}


def _entry_files(record: CaseRecord) -> str:
    return " ".join(f"image {p}" for p in record.images) + (f" label {record.label}" if record.label else "")


def _differing_values(entries: list[CaseRecord]) -> list[str]:
    fields = []
    for name in ("targets", "clinical"):
        keys = sorted({k for e in entries for k in getattr(e, name)})
        fields += [k for k in keys if len({repr(getattr(e, name).get(k)) for e in entries}) > 1]
    return fields + [name for name in ("split", "fold") if len({getattr(e, name) for e in entries}) > 1]


def _resolve_repeats(scan: Scan, listing: Path) -> None:
    """One case per subject. An entry repeated exactly (same files and values) is kept once and noted in
    ``scan.warnings``; entries that give one subject different files or values are all quarantined, since
    nothing says which of them is right."""
    groups: dict[str, list[CaseRecord]] = {}
    for record in scan.records:
        groups.setdefault(record.subject_id, []).append(record)
    kept = []
    for subject, entries in groups.items():
        if all(e == entries[0] for e in entries[1:]):
            kept.append(entries[0])
            if len(entries) > 1:
                scan.warnings.append({"subject_id": subject, "message": f"listed {len(entries)} times in {listing} "
                                                                      "with the same files and values; kept once"})
            continue
        files = {_entry_files(e) for e in entries}
        if len(files) > 1:
            reason = f"different files: {' | '.join(sorted(files))}"
        else:
            reason = f"the same files but different values ({', '.join(_differing_values(entries))})"
        scan.rejected += [Quarantined(subject, e.images[0], f"subject_id {subject!r} is listed {len(entries)} times "
                                      f"with {reason}", "scan") for e in entries]
    scan.records = kept


def find_cases(cfg: DataConfig) -> Scan:
    """The cases ``cfg`` points at, found by listing folders and reading tables only: no image is read and
    nothing is generated. What :func:`scan_source` prepares, and what train's source check recomputes."""
    root = Path(cfg.root)
    if cfg.format == "msd":
        listing, scan = root / "dataset.json", scan_msd(root, cfg.label_names)
    elif cfg.format == "manifest":
        listing, scan = root, scan_manifest(root, cfg.image_columns)
    elif cfg.format == "dicom":
        listing, scan = root, scan_dicom(root)
    else:
        listing = root / "manifest.csv"
        scan = scan_manifest(listing, ["image"])
    tables = [listing] if cfg.format in ("manifest", "synthetic") else []
    if cfg.clinical is not None:
        _join_clinical(scan, Path(cfg.clinical))
        tables.append(Path(cfg.clinical))
    _select_clinical(scan, cfg.clinical_columns, tables)
    _resolve_repeats(scan, listing)
    return scan


def scan_source(cfg: DataConfig) -> Scan:
    """Find the cases that ``cfg`` points at (generating the synthetic cohort first if asked to)."""
    s = cfg.synthetic
    if cfg.format == "synthetic" and not cohort_matches(cfg.root, s.n_subjects, s.seed, s.shape, s.spacing):
        generate_cohort(cfg.root, s.n_subjects, s.seed, s.shape, s.spacing)
    return find_cases(cfg)


def scan_nifti_folder(root: Path, labels: Path | None) -> Scan:
    """One case per NIfTI file in ``root``; with ``labels``, the file of the same name there is its label."""
    scan = Scan()
    for path in sorted(p for p in root.iterdir() if _is_nifti(p)):
        label = None
        if labels is not None:
            candidate = labels / path.name
            if candidate.is_file():
                label = str(candidate.resolve())
            else:
                scan.rejected.append(Quarantined(_case_id(path), str(path), f"no label {path.name} in {labels}", "scan"))
                continue
        scan.records.append(CaseRecord(subject_id=_case_id(path), images=[str(path.resolve())], label=label))
    return scan


def scan_path(path: Path, cfg: DataConfig, labels: Path | None = None) -> Scan:
    """Find cases at ``path`` for inference, whatever it is: an MSD folder (``dataset.json``), a manifest
    table, a folder of NIfTI images (labels, optional, in ``labels`` under the same file names) or
    DICOM series. ``cfg`` is the data section the model was trained with (label set, image columns)."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if labels is not None and not labels.is_dir():
        raise ConfigError(f"labels folder {labels} does not exist")
    listing = path
    if path.is_dir() and (path / "dataset.json").is_file():
        listing, scan = path / "dataset.json", scan_msd(path, cfg.label_names)
    elif path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".parquet"):
        scan = scan_manifest(path, cfg.image_columns)
    elif path.is_dir() and any(_is_nifti(p) for p in path.iterdir()):
        scan = scan_nifti_folder(path, labels)
    else:
        scan = scan_dicom(path)
    _resolve_repeats(scan, listing)
    return scan
