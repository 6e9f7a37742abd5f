"""Prepare a dataset on Ray Data: scan → validate + preprocess in parallel → Parquet shards + report.

Every input ends up either prepared or quarantined with its path and reason — never dropped — so
``inputs == prepared + quarantined`` always holds. One bad volume never stops the others: the
per-case function turns an :class:`InputError` (or an unexpected failure while preprocessing)
into a quarantine row, and only good rows reach the shards.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from jointray.config import Config, PreprocessSpec
from jointray.data.errors import InputError
from jointray.data.preprocess import preprocess_case
from jointray.data.records import CaseRecord, Quarantined
from jointray.data.shards import (
    REPORT_FILE,
    SHARDS_DIR,
    case_row,
    clinical_kinds,
    empty_prepared,
    rows_to_table,
    write_spec,
)
from jointray.data.sources import scan_source
from jointray.data.validate import load_case

#: Cases per Ray Data block: small enough to spread 200 cases over many tasks, big enough to
#: amortise task overhead (one case takes tens of milliseconds).
CASES_PER_BLOCK = 4


@dataclass
class PrepareReport:
    inputs: int
    prepared: int
    quarantined: list[Quarantined]
    warnings: list[dict[str, Any]] = field(default_factory=list)
    output: str = ""
    spec_digest: str = ""
    clinical_columns: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def prepare_one(record: CaseRecord, spec: PreprocessSpec, label_values: set[int], max_voxels: int,
                kinds: dict[str, str]) -> dict[str, Any] | Quarantined:
    """Validate and preprocess one case: a shard row, or why it was quarantined."""
    try:
        case = load_case(record, label_values, max_voxels, spec.channels)
    except InputError as exc:
        return Quarantined(record.subject_id, exc.path, exc.reason, "validate")
    try:
        prepared = preprocess_case(case.image, case.label, case.affine, spec)
    except Exception as exc:  # a case that breaks preprocessing is quarantined, not fatal to the run
        return Quarantined(record.subject_id, record.images[0], f"preprocessing failed ({type(exc).__name__}: {exc})",
                           "preprocess")
    return case_row(record, prepared, kinds)


def _prepare_batch(batch: dict[str, np.ndarray], spec_json: str, label_values: list[int], max_voxels: int,
                   kinds: dict[str, str]) -> pa.Table:
    spec = PreprocessSpec.model_validate_json(spec_json)
    rows = []
    for text in batch["record"]:
        record = CaseRecord.from_json(text)
        result = prepare_one(record, spec, set(label_values), max_voxels, kinds)
        if isinstance(result, Quarantined):
            row = case_row(record, empty_prepared(spec), kinds)
            row |= {"q_path": result.path, "q_reason": result.reason, "q_stage": result.stage}
        else:
            row = result | {"q_path": "", "q_reason": "", "q_stage": ""}
        rows.append(row)
    return rows_to_table(rows)


def _keep_prepared(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["q_reason"], ""))


def prepare_dataset(cfg: Config) -> PrepareReport:
    """Run the whole prepare step for ``cfg``; needs a Ray instance (``ray.init`` done by the caller)."""
    started = time.perf_counter()
    spec = cfg.preprocess
    scan = scan_source(cfg.data)
    kinds = clinical_kinds(scan.records, scan.clinical_columns)
    output = Path(cfg.data.output)
    output.mkdir(parents=True, exist_ok=True)
    quarantined = list(scan.rejected)
    warnings: list[dict[str, Any]] = []
    prepared = 0
    # Shards are written to a fresh folder and swapped in at the end, so a crash never leaves a
    # mix of old and new shards behind.
    staging = output / f".{SHARDS_DIR}-{uuid.uuid4().hex[:8]}"
    if scan.records:
        items = [{"record": r.to_json()} for r in scan.records]
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // CASES_PER_BLOCK)))
        ds = ds.map_batches(
            _prepare_batch,
            batch_size=None,
            fn_kwargs={
                "spec_json": spec.model_dump_json(),
                "label_values": sorted(cfg.data.label_names),
                "max_voxels": cfg.data.max_voxels,
                "kinds": kinds,
            },
        ).materialize()
        # One pass over the small columns tells what was quarantined and what was cropped.
        for row in ds.select_columns(["subject_id", "q_path", "q_reason", "q_stage", "label_voxels_cropped"]).take_all():
            if row["q_reason"]:
                quarantined.append(Quarantined(row["subject_id"], row["q_path"], row["q_reason"], row["q_stage"]))
                continue
            prepared += 1
            if row["label_voxels_cropped"]:
                warnings.append({
                    "subject_id": row["subject_id"],
                    "message": f"{row['label_voxels_cropped']} label voxels fell outside the "
                    f"{tuple(spec.target_shape)} crop (enlarge preprocess.target_shape)",
                })
        if prepared:
            good = ds.map_batches(_keep_prepared, batch_size=None, batch_format="pyarrow")
            good.drop_columns(["q_path", "q_reason", "q_stage"]).write_parquet(
                str(staging), min_rows_per_file=cfg.data.rows_per_shard
            )
    shards = output / SHARDS_DIR
    if shards.exists():
        shutil.rmtree(shards)
    if staging.exists():
        staging.rename(shards)
    write_spec(output, spec)
    quarantined.sort(key=lambda q: (q.stage, q.path))
    report = PrepareReport(
        inputs=len(scan.records) + len(scan.rejected),
        prepared=prepared,
        quarantined=quarantined,
        warnings=warnings,
        output=str(output),
        spec_digest=spec.digest(),
        clinical_columns=kinds,
        elapsed_s=round(time.perf_counter() - started, 2),
    )
    (output / REPORT_FILE).write_text(report.to_json())
    return report
