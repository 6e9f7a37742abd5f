"""Checkpoints: written atomically, verified on load, loadable with ``weights_only=True``.

A checkpoint folder holds ``checkpoint.pt`` (model, optimiser, scaler, balancer, counters, RNG state:
tensors and plain containers only, so ``torch.load(weights_only=True)`` can read it without running
pickled code) and ``meta.json`` (the whole config, the PreprocessSpec, the clinical schema, the
metrics, and the SHA-256 of ``checkpoint.pt``). ``meta.json`` is written last, so a folder without it
— or whose hash does not match — is half-written or corrupt and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jointray.config import Config, PreprocessSpec
from jointray.data.clinical import ClinicalSchema

STATE_FILE = "checkpoint.pt"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, half-written, corrupt or from an incompatible run."""


@dataclass
class LoadedCheckpoint:
    state: dict[str, Any]
    config: Config
    spec: PreprocessSpec
    schema: ClinicalSchema
    metrics: dict[str, float]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(folder: Path, state: dict[str, Any], cfg: Config, spec: PreprocessSpec, schema: ClinicalSchema,
                     metrics: dict[str, float]) -> None:
    """Write ``state`` and its metadata into ``folder`` (created; must not exist yet)."""
    folder.mkdir(parents=True)
    torch.save(state, folder / STATE_FILE)
    meta = {
        "sha256": _sha256(folder / STATE_FILE),
        "config": cfg.model_dump(mode="json"),
        "spec": spec.model_dump(mode="json"),
        "spec_digest": spec.digest(),
        "schema": schema.model_dump(mode="json"),
        "metrics": metrics,
    }
    tmp = folder / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META_FILE)


def read_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint folder, refusing it when it is incomplete or its contents changed."""
    folder = Path(folder)
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"{folder}: not a complete jointray checkpoint ({META_FILE} and {STATE_FILE} needed)")
    meta = json.loads(meta_path.read_text())
    if _sha256(state_path) != meta["sha256"]:
        raise CheckpointError(f"{state_path}: contents do not match the hash in {META_FILE} (corrupt or half-written)")
    state = torch.load(state_path, map_location=map_location, weights_only=True)
    spec = PreprocessSpec.model_validate(meta["spec"])
    if spec.digest() != meta["spec_digest"]:
        raise CheckpointError(f"{meta_path}: PreprocessSpec digest mismatch")
    return LoadedCheckpoint(state=state, config=Config.model_validate(meta["config"]), spec=spec,
                            schema=ClinicalSchema.model_validate(meta["schema"]), metrics=meta["metrics"])


def export_checkpoint(source: Path, target: Path) -> None:
    """Copy a verified checkpoint to ``target``, replacing what was there only once the copy is complete."""
    read_checkpoint(source)
    staging = target.with_name(f".{target.name}-{uuid.uuid4().hex[:8]}")
    shutil.copytree(source, staging)
    read_checkpoint(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
