"""Prepare a dataset on Ray Data: scan → validate + preprocess in parallel → Parquet shards + report.

Every input ends up either prepared or quarantined with its path and reason — never dropped — so
``inputs == prepared + quarantined`` always holds. One bad volume never stops the others: the
per-case function turns an :class:`InputError` (or an unexpected failure while preprocessing)
into a quarantine record, and only good rows reach the shards. The run is a single streaming pass
(read → prepare → write), so memory stays bounded whatever the number of cases; ``data.output``
must be a path every Ray node can write (a shared filesystem on a cluster).
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
import pyarrow.parquet as pq
import ray.data

from jointray.config import Config
from jointray.data.spec import PreprocessSpec
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

#: At most this many cases per Ray Data block (about 0.75 MB each once prepared): bounds a task's memory.
MAX_CASES_PER_BLOCK = 32
#: Blocks per CPU: enough to balance uneven cases across workers, few enough to amortise the
#: per-task overhead (a case takes only ~10 ms).
BLOCKS_PER_CPU = 4


def _cases_per_block(n_cases: int) -> int:
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return int(np.clip(-(-n_cases // (BLOCKS_PER_CPU * cpus)), 1, MAX_CASES_PER_BLOCK))


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
                   kinds: dict[str, str], notes_dir: str) -> pa.Table:
    """Prepare the cases of one block: good rows go on to the Parquet writer; quarantine records and
    crop warnings go to a small JSON-lines file in ``notes_dir`` (on the output's filesystem), so the
    whole run is one streaming pass that never holds the dataset in memory."""
    spec = PreprocessSpec.model_validate_json(spec_json)
    rows, notes = [], []
    for text in batch["record"]:
        record = CaseRecord.from_json(text)
        result = prepare_one(record, spec, set(label_values), max_voxels, kinds)
        if isinstance(result, Quarantined):
            notes.append({"kind": "quarantined", **asdict(result)})
            continue
        rows.append(result)
        if result["label_voxels_cropped"]:
            notes.append({"kind": "warning", "subject_id": record.subject_id,
                          "message": f"{result['label_voxels_cropped']} label voxels fell outside the "
                          f"{tuple(spec.target_shape)} crop (enlarge preprocess.target_shape)"})
    if notes:
        Path(notes_dir, f"{uuid.uuid4().hex}.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes))
    if rows:
        return rows_to_table(rows)
    # An all-quarantined block still yields the shard schema, so every block has the same one.
    return rows_to_table([case_row(CaseRecord.from_json(batch["record"][0]), empty_prepared(spec), kinds)]).slice(0, 0)


def _read_notes(notes_dir: Path) -> tuple[list[Quarantined], list[dict[str, Any]]]:
    quarantined, warnings, seen = [], [], set()
    for path in sorted(notes_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line in seen:  # a retried task writes its notes again
                continue
            seen.add(line)
            note = json.loads(line)
            if note.pop("kind") == "quarantined":
                quarantined.append(Quarantined(**note))
            else:
                warnings.append(note)
    return quarantined, warnings


def prepare_dataset(cfg: Config) -> PrepareReport:
    """Run the whole prepare step for ``cfg``; needs a Ray instance (``ray.init`` done by the caller)."""
    started = time.perf_counter()
    spec = cfg.preprocess
    scan = scan_source(cfg.data)
    kinds = clinical_kinds(scan.records, scan.clinical_columns)
    output = Path(cfg.data.output)
    output.mkdir(parents=True, exist_ok=True)
    # Shards are written to a fresh folder and swapped in at the end, so a crash never leaves a
    # mix of old and new shards behind.
    staging = output / f".{SHARDS_DIR}-{uuid.uuid4().hex[:8]}"
    notes_dir = output / f".notes-{uuid.uuid4().hex[:8]}"
    notes_dir.mkdir()
    prepared = 0
    if scan.records:
        items = [{"record": r.to_json()} for r in scan.records]
        ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // _cases_per_block(len(items))))
        ds.map_batches(
            _prepare_batch,
            batch_size=None,
            fn_kwargs={
                "spec_json": spec.model_dump_json(),
                "label_values": sorted(cfg.data.label_names),
                "max_voxels": cfg.data.max_voxels,
                "kinds": kinds,
                "notes_dir": str(notes_dir.resolve()),
            },
        ).write_parquet(str(staging), min_rows_per_file=cfg.data.rows_per_shard)
        prepared = sum(pq.read_metadata(f).num_rows for f in staging.glob("*.parquet"))
    quarantined, warnings = _read_notes(notes_dir)
    shutil.rmtree(notes_dir)
    quarantined = list(scan.rejected) + quarantined
    shards = output / SHARDS_DIR
    if shards.exists():
        shutil.rmtree(shards)
    if prepared:
        staging.rename(shards)
    elif staging.exists():
        shutil.rmtree(staging)
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
