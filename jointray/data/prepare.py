"""Prepare a dataset on Ray Data: scan → validate + preprocess in parallel → Parquet shards + report.

Every input ends up either prepared or quarantined with its path and reason — never dropped — so
``inputs == prepared + quarantined`` always holds (an entry listed twice exactly is one input, and the
repeat is among the report's warnings). One bad volume never stops the others: the per-case function
turns an :class:`InputError` (or an unexpected failure while preprocessing) into a quarantine record,
and only good rows reach the shards. The run is a single streaming pass (read → prepare → write), so
memory stays bounded whatever the number of cases; ``data.output`` must be a path every Ray node can
write (a shared filesystem on a cluster).

The output (shards, ``spec.json``, ``source.json``, ``report.json``) is written into a staging folder
beside ``data.output`` and switched in whole at the end (:mod:`jointray.atomic_dir`): a run that fails or
is killed leaves the previous output as it was, never new shards beside an old spec. Since the folder is
replaced whole, ``data.output`` must be new, empty or a previous prepare's output.
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

from jointray.atomic_dir import staged_dir
from jointray.config import Config, ConfigError
from jointray.data.errors import InputError
from jointray.data.preprocess import preprocess_case
from jointray.data.provenance import describe_source, write_source
from jointray.data.records import CaseRecord, Quarantined
from jointray.data.shards import (
    REPORT_FILE,
    SHARDS_DIR,
    SPEC_FILE,
    case_row,
    empty_prepared,
    rows_to_table,
    write_spec,
)
from jointray.data.sources import Scan, scan_source
from jointray.data.spec import PreprocessSpec
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
    """What prepare did; also written as ``report.json``. ``clinical_columns``: the clinical inputs and their
    kinds; ``clinical_features``: the same in a line for people, with the columns left out of the model."""

    inputs: int
    prepared: int
    quarantined: list[Quarantined]
    warnings: list[dict[str, Any]] = field(default_factory=list)
    output: str = ""
    spec_digest: str = ""
    source_digest: str = ""
    clinical_columns: dict[str, str] = field(default_factory=dict)
    clinical_features: str = ""
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


def _clinical_features(declared: dict[str, str], scan: Scan) -> str:
    used = ", ".join(f"{name} ({kind})" for name, kind in declared.items()) or "none (data.clinical_columns is empty)"
    unused = [c for c in scan.clinical_columns if c not in declared]
    return used + (f"; not used: {', '.join(unused)}" if unused else "")


def _check_output(output: Path) -> None:
    """The whole folder is replaced: refuse one that holds anything but a previous prepare's output."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"data.output={output} is a file; prepare writes a folder there")
    if not output.is_dir() or (output / SPEC_FILE).is_file() or (output / REPORT_FILE).is_file():
        return
    held = sorted(p.name for p in output.iterdir())
    if held:
        raise ConfigError(f"data.output={output} holds {held[:5]}{' and more' if len(held) > 5 else ''}, not a "
                          f"prepared dataset; prepare replaces the whole folder, so point data.output at a new, "
                          f"empty or previously prepared folder")


def prepare_dataset(cfg: Config) -> PrepareReport:
    """Run the whole prepare step for ``cfg``; needs a Ray instance (``ray.init`` done by the caller)."""
    started = time.perf_counter()
    spec = cfg.preprocess
    output = Path(cfg.data.output)
    _check_output(output)
    scan = scan_source(cfg.data)
    # Recorded before any volume is read, so a case file that changes during the run shows as changed.
    source = describe_source(cfg.data, scan)
    kinds = dict(cfg.data.clinical_columns)
    with staged_dir(output) as staging:
        shards, notes_dir = staging / SHARDS_DIR, staging / ".notes"
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
            ).write_parquet(str(shards.resolve()), min_rows_per_file=cfg.data.rows_per_shard)
            prepared = sum(pq.read_metadata(f).num_rows for f in shards.glob("*.parquet"))
        quarantined, warnings = _read_notes(notes_dir)
        shutil.rmtree(notes_dir)
        if not prepared and shards.exists():
            shutil.rmtree(shards)
        quarantined = sorted([*scan.rejected, *quarantined], key=lambda q: (q.stage, q.path))
        report = PrepareReport(
            inputs=len(scan.records) + len(scan.rejected),
            prepared=prepared,
            quarantined=quarantined,
            warnings=scan.warnings + warnings,
            output=str(output),
            spec_digest=spec.digest(),
            source_digest=source["digest"],
            clinical_columns=kinds,
            clinical_features=_clinical_features(kinds, scan),
            elapsed_s=round(time.perf_counter() - started, 2),
        )
        write_spec(staging, spec)
        write_source(staging, source)
        (staging / REPORT_FILE).write_text(report.to_json())
    return report
