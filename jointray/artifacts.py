"""Model files on disk: training checkpoints and exported serving artifacts, read by one loader.

A **training checkpoint** folder (written by the training loop, ``runs/<name>/best`` and the per-epoch
folders) holds ``checkpoint.pt`` (model, optimiser, scaler, balancer, counters, RNG state: tensors and
plain containers only, so ``torch.load(weights_only=True)`` reads it without running pickled code) and
``meta.json`` (the whole config, the PreprocessSpec, the clinical schema, the metrics, the heads that
saw targets, and the SHA-256 of ``checkpoint.pt``). ``meta.json`` is written last, so a folder without
it — or whose hash does not match — is half-written or corrupt and is never loaded.

An **exported artifact** (:func:`write_artifact`) is what a server needs and nothing else: the model —
``model.pt`` (its state dict, runtime ``torch``) or its graphs (``model.onnx`` for onnxruntime,
``model.ts`` for TorchScript, each with a Monte Carlo twin; :mod:`jointray.export`) — ``config.yaml``,
``spec.json``, ``schema.json``, ``metrics.json`` (the source checkpoint's validation figures), for a
graph ``export.json`` (how it was made and how far it is from the PyTorch model) and, last,
``artifact.json`` with the runtime and the SHA-256 of every other file. No optimiser state travels to a
server.

An **ensemble** folder (:func:`write_ensemble`; ``jointray train --all-folds`` writes one beside its
folds) holds ``ensemble.json``: its members (checkpoints or exported models, as paths relative to the
folder), the post-processing chosen on their out-of-fold predictions and, when ``jointray calibrate``
wrote it, the :class:`~jointray.trust.Calibration` fitted on held-back cases (a calibrated single model
is an ensemble of one). The members answer as one,
their class probabilities averaged (nnU-Net's cross-validation ensemble, Isensee et al. 2021).

:func:`load_model` reads a checkpoint or an exported artifact into a :class:`ModelArtifact`,
:func:`load_models` any of the three (or a list of models) into an :class:`Ensemble`; training and
inference both use this module, so inference never imports ``jointray.train``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from jointray.atomic_dir import recover, staged_dir
from jointray.config import Config
from jointray.data.clinical import ClinicalSchema
from jointray.data.spec import PreprocessSpec
from jointray.storage import Storage, cache_root, is_uri
from jointray.trust.calibration import Calibration

STATE_FILE = "checkpoint.pt"
META_FILE = "meta.json"
MODEL_FILE = "model.pt"
ARTIFACT_FILE = "artifact.json"
EXPORT_FILE = "export.json"
#: How an artifact's model runs: its PyTorch state dict, or an exported graph (:mod:`jointray.export`).
RUNTIMES = ("torch", "onnxruntime", "torchscript")
ARTIFACT_FORMAT = "jointray-model"
ARTIFACT_VERSION = 1
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "jointray-ensemble"
#: Validation metrics that show a head saw targets, for checkpoints written before heads were recorded.
_HEAD_EVIDENCE = {"mmse": "val/mmse_mae", "cdr": "val/cdr_qwk", "risk": "val/c_index"}


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, half-written, corrupt or from an incompatible run."""


@dataclass
class LoadedCheckpoint:
    state: dict[str, Any]
    config: Config
    spec: PreprocessSpec
    schema: ClinicalSchema
    metrics: dict[str, float]
    trained_heads: list[str] = field(default_factory=list)


@dataclass
class ModelArtifact:
    """Everything inference needs: the model's weights and the config, spec and schema it was trained with.

    ``trained_heads``: the outcome heads that saw at least one target in training; the others are never
    reported. ``version``: the first 12 hex digits of the weights' SHA-256, a stable model id.
    ``runtime``: ``torch`` (``state_dict`` holds the weights) or an exported graph's runtime
    (``onnxruntime``, ``torchscript``; ``graphs`` holds its ``deterministic`` and ``mc`` files, and
    ``export`` the figures :mod:`jointray.export` recorded).
    """

    state_dict: dict[str, torch.Tensor] | None
    config: Config
    spec: PreprocessSpec
    schema: ClinicalSchema
    metrics: dict[str, float]
    trained_heads: list[str]
    version: str
    source: str
    runtime: str = "torch"
    graphs: dict[str, Path] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)

    @property
    def cross(self) -> float:
        """The cross-task strength λ the model was validated with (the training loop reports it)."""
        curriculum = self.config.train.curriculum
        return float(self.metrics.get("cross", curriculum.phases[-1].cross if curriculum.enabled else 1.0))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint(folder: Path, state: dict[str, Any], cfg: Config, spec: PreprocessSpec, schema: ClinicalSchema,
                     metrics: dict[str, float], trained_heads: list[str] | None = None) -> None:
    """Write ``state`` and its metadata into ``folder`` (created if missing; any checkpoint in it is replaced)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_FILE)
    meta = {
        "sha256": _sha256(folder / STATE_FILE),
        "config": cfg.model_dump(mode="json"),
        "spec": spec.model_dump(mode="json"),
        "spec_digest": spec.digest(),
        "schema": schema.model_dump(mode="json"),
        "metrics": metrics,
        "trained_heads": list(trained_heads) if trained_heads is not None else None,
    }
    _write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


def _trained_heads(recorded: list[str] | None, cfg: Config, metrics: dict[str, float]) -> list[str]:
    if recorded is not None:
        return [h for h in cfg.model.heads if h in recorded]
    # Written before the heads were recorded: a head with a validation metric saw targets.
    return [h for h in cfg.model.heads if _HEAD_EVIDENCE[h] in metrics]


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
    config = Config.model_validate(meta["config"])
    return LoadedCheckpoint(state=state, config=config, spec=spec, schema=ClinicalSchema.model_validate(meta["schema"]),
                            metrics=meta["metrics"],
                            trained_heads=_trained_heads(meta.get("trained_heads"), config, meta["metrics"]))


def export_checkpoint(source: Path, target: Path) -> None:
    """Copy a verified checkpoint to ``target``, switched in whole (:mod:`jointray.atomic_dir`): a reader of
    ``target`` finds the previous checkpoint or this one, never a mix or nothing."""
    read_checkpoint(source)
    with staged_dir(target) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        read_checkpoint(staging)


def export_artifact(checkpoint: str | Path, target: str | Path) -> Path:
    """Write the PyTorch serving artifact of a training checkpoint (or re-export an artifact) into ``target``."""
    return write_artifact(target, load_model(checkpoint))


#: What writes an artifact's graphs into a folder: returns {"deterministic": file, "mc": file or absent}
#: and the figures for ``export.json``.
GraphWriter = Callable[[Path], tuple[dict[str, str], dict[str, Any]]]


def write_artifact(target: str | Path, model: ModelArtifact, runtime: str = "torch",
                   write_graphs: GraphWriter | None = None, export: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a serving artifact into ``target``: its state dict for runtime ``torch``, else the
    graphs ``write_graphs`` writes (:mod:`jointray.export`); ``export``: how it was made, for ``export.json``
    (a graph writer returns its own).

    The folder is assembled beside ``target`` and switched in whole (:mod:`jointray.atomic_dir`); an
    existing ``target`` is replaced only then, after the new one loaded. Returns ``target``.
    """
    target = Path(target)
    if (runtime == "torch") != (write_graphs is None):
        raise ValueError("runtime 'torch' writes the state dict; every other runtime needs write_graphs")
    with staged_dir(target) as staging:
        graphs: dict[str, str] = {}
        if write_graphs is None:
            torch.save(model.state_dict, staging / MODEL_FILE)
        else:
            graphs, export = write_graphs(staging)
        if export:
            (staging / EXPORT_FILE).write_text(json.dumps(export, indent=2) + "\n")
        (staging / "config.yaml").write_text(yaml.safe_dump(model.config.model_dump(mode="json"), sort_keys=False))
        (staging / "spec.json").write_text(model.spec.model_dump_json(indent=2) + "\n")
        (staging / "schema.json").write_text(model.schema.model_dump_json(indent=2) + "\n")
        (staging / "metrics.json").write_text(json.dumps(model.metrics, indent=2) + "\n")
        files = sorted(p.name for p in staging.iterdir())
        manifest = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "runtime": runtime,
                    "graphs": graphs, "trained_heads": model.trained_heads, "spec_digest": model.spec.digest(),
                    "source": model.source, "sha256": {name: _sha256(staging / name) for name in files}}
        _write_text_atomic(staging / ARTIFACT_FILE, json.dumps(manifest, indent=2) + "\n")
        load_model(staging)  # verify before it replaces anything
    return target


def _load_exported(folder: Path, map_location) -> ModelArtifact:
    manifest = json.loads((folder / ARTIFACT_FILE).read_text())
    if manifest.get("format") != ARTIFACT_FORMAT or manifest.get("format_version") != ARTIFACT_VERSION:
        raise CheckpointError(f"{folder / ARTIFACT_FILE}: not a {ARTIFACT_FORMAT} v{ARTIFACT_VERSION} artifact")
    for name, digest in manifest["sha256"].items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(f"{path}: missing, or its contents do not match the hash in {ARTIFACT_FILE}")
    runtime = manifest.get("runtime", "torch")
    graphs = {kind: folder / name for kind, name in manifest.get("graphs", {}).items()}
    model_file = graphs.get("deterministic", folder / MODEL_FILE)
    if runtime not in RUNTIMES or (runtime != "torch" and model_file.name not in manifest["sha256"]) or (
            runtime == "torch" and MODEL_FILE not in manifest["sha256"]):
        raise CheckpointError(f"{folder / ARTIFACT_FILE}: runtime {runtime!r} without its model file "
                              f"(runtimes: {', '.join(RUNTIMES)})")
    config = Config.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    spec = PreprocessSpec.model_validate_json((folder / "spec.json").read_text())
    if spec.digest() != manifest["spec_digest"]:
        raise CheckpointError(f"{folder / 'spec.json'}: PreprocessSpec digest mismatch")
    return ModelArtifact(
        state_dict=torch.load(model_file, map_location=map_location, weights_only=True) if runtime == "torch" else None,
        config=config, spec=spec, schema=ClinicalSchema.model_validate_json((folder / "schema.json").read_text()),
        metrics=json.loads((folder / "metrics.json").read_text()),
        trained_heads=[h for h in config.model.heads if h in manifest["trained_heads"]],
        version=manifest["sha256"][model_file.name][:12], source=str(folder), runtime=runtime, graphs=graphs,
        export=json.loads((folder / EXPORT_FILE).read_text()) if (folder / EXPORT_FILE).is_file() else {})


def local_model(location: str | Path) -> Path:
    """A model folder (checkpoint, exported model or ensemble) as a local folder: a local path as it is; a
    folder at a URI copied into the node's cache (:func:`jointray.storage.cache_root`) once per content —
    the key is the location and its manifest's text, an ensemble's members' manifests included, so a model
    (or a member) replaced at the same URI is fetched anew. An ensemble brings the members it lists under
    itself (relative paths; an absolute one cannot be resolved remotely). A copy lands by rename, so
    processes on one node fetching the same model at once do not see half of it.

    Raises:
        CheckpointError: nothing at the URI holds a model, or the store cannot be reached.
    """
    if not is_uri(location):
        return Path(location)
    try:
        return _fetch_model(Storage.of(location))
    except OSError as exc:  # as for a bad local folder
        raise CheckpointError(str(exc)) from exc


def _fetch_model(storage: Storage) -> Path:
    manifest, text = _manifest(storage, storage.base)
    members: list[str] = []
    if manifest == ENSEMBLE_FILE:
        members = json.loads(text).get("members", [])
        absolute = [m for m in members if Path(m).is_absolute()]
        if absolute:
            raise CheckpointError(f"{storage.uri}/{ENSEMBLE_FILE} lists members by absolute path {absolute}: "
                                  "a remote ensemble lists its members relative to itself")
    # A member retrained in place changes its own manifest, not the ensemble's: both are in the key.
    identity = [storage.uri, text, *(_manifest(storage, storage.path(m))[1] for m in members)]
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:20]
    target = cache_root() / "models" / key
    if target.is_dir():
        return target
    staging = target.parent / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        if manifest == ENSEMBLE_FILE:
            staging.mkdir(parents=True)
            (staging / manifest).write_text(text)
            for member in members:
                storage.download(storage.path(member), staging / member)
        else:
            storage.download(storage.base, staging)
        try:
            staging.rename(target)
        except OSError:  # another process on this node fetched the same model first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _manifest(storage: Storage, path: str) -> tuple[str, str]:
    """(name, text) of the file that says what the model folder ``path`` on ``storage`` is."""
    for name in (ENSEMBLE_FILE, ARTIFACT_FILE, META_FILE):
        if storage.exists(f"{path}/{name}"):
            return name, storage.read_text(f"{path}/{name}")
    raise CheckpointError(f"{storage.uri}{path.removeprefix(storage.base)}: no model there "
                          f"({ENSEMBLE_FILE}, {ARTIFACT_FILE}, {META_FILE} missing)")


def read_config(folder: str | Path) -> Config:
    """The config a checkpoint or exported artifact was trained with (an ensemble's first member's), without
    reading its weights. ``folder`` may be a URI (:func:`local_model`)."""
    folder = local_model(folder)
    if (folder / ENSEMBLE_FILE).is_file():
        return read_config(ensemble_manifest(folder)[0][0])
    if (folder / ARTIFACT_FILE).is_file() and (folder / "config.yaml").is_file():
        return Config.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    if (folder / META_FILE).is_file():
        return Config.model_validate(json.loads((folder / META_FILE).read_text())["config"])
    raise CheckpointError(f"{folder}: not a complete jointray checkpoint ({META_FILE} and {STATE_FILE} needed), "
                          f"exported model ({ARTIFACT_FILE} needed) or ensemble ({ENSEMBLE_FILE})")


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> ModelArtifact:
    """Read a training checkpoint or an exported artifact (verified either way) for inference; ``folder`` may
    be a URI (:func:`local_model`)."""
    folder = local_model(folder)
    recover(folder)  # a crash mid-switch of an export leaves the previous version aside: put it back
    if (folder / ARTIFACT_FILE).is_file():
        return _load_exported(folder, map_location)
    if not (folder / META_FILE).is_file():
        raise CheckpointError(f"{folder}: not a complete jointray checkpoint ({META_FILE} and {STATE_FILE} needed) "
                              f"or exported model ({ARTIFACT_FILE} needed)")
    loaded = read_checkpoint(folder, map_location)
    return ModelArtifact(state_dict=loaded.state["model"], config=loaded.config, spec=loaded.spec,
                         schema=loaded.schema, metrics=loaded.metrics, trained_heads=loaded.trained_heads,
                         version=json.loads((folder / META_FILE).read_text())["sha256"][:12], source=str(folder))


@dataclass
class Ensemble:
    """Models that answer as one (one model is an ensemble of one).

    ``largest_component``: the structures (label names) of which only the largest connected component is
    kept after prediction; ``version``: the model's id for clients — the member's own, or a digest of the
    members' for several; ``metrics``: the member's validation metrics, or an ensemble folder's
    out-of-fold figures (``out_of_fold/...``); ``calibration``: what ``jointray calibrate`` fitted, or None.
    """

    members: list[ModelArtifact]
    largest_component: list[str]
    version: str
    metrics: dict[str, float]
    calibration: Calibration | None = None


def write_ensemble(folder: str | Path, members: list[str | Path], largest_component: list[str],
                   cross_validation: dict[str, float] | None = None,
                   calibration: Calibration | None = None) -> Path:
    """Write ``<folder>/ensemble.json`` listing ``members`` (made relative to ``folder`` where they lie under
    it, so the folder can move) after checking they load together; ``cross_validation``: the out-of-fold
    figures behind ``largest_component`` (the ensemble's metrics, ``out_of_fold/<name>``); ``calibration``:
    what ``jointray calibrate`` fitted for these members. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    listed = []
    for member in map(Path, members):
        resolved = member.resolve()
        listed.append(str(resolved.relative_to(folder.resolve())) if resolved.is_relative_to(folder.resolve())
                      else str(resolved))
    manifest = {"format": ENSEMBLE_FORMAT, "format_version": 1, "members": listed,
                "postprocess": {"largest_component": list(largest_component)},
                "cross_validation": cross_validation or {}}
    if calibration is not None:
        manifest["calibration"] = json.loads(calibration.model_dump_json())
    _write_text_atomic(folder / ENSEMBLE_FILE, json.dumps(manifest, indent=2) + "\n")
    load_models(folder)
    return folder


def ensemble_manifest(folder: Path) -> tuple[list[Path], list[str], dict[str, float], Calibration | None]:
    """(member folders, largest-component structures, out-of-fold metrics, calibration) of an ensemble folder."""
    path = folder / ENSEMBLE_FILE
    try:
        manifest = json.loads(path.read_text())
        members = [folder / member for member in manifest["members"]]
        largest = list(manifest["postprocess"]["largest_component"])
        metrics = {f"out_of_fold/{k}": float(v) for k, v in manifest.get("cross_validation", {}).items()}
        calibration = Calibration.model_validate(manifest["calibration"]) if "calibration" in manifest else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a {ENSEMBLE_FORMAT} manifest ({type(exc).__name__}: {exc})") from exc
    if manifest.get("format") != ENSEMBLE_FORMAT or not members:
        raise CheckpointError(f"{path}: not a {ENSEMBLE_FORMAT} manifest, or it lists no members")
    return members, largest, metrics, calibration


def _features(schema: ClinicalSchema) -> tuple[list[str], list[str]]:
    """The clinical features a model reads (numeric, categorical), without the statistics each fold fitted."""
    return [f.name for f in schema.numeric], [f.name for f in schema.categorical]


def load_models(source: str | Path | list[str | Path], map_location: str | torch.device = "cpu") -> Ensemble:
    """A checkpoint, an exported model, an ensemble folder, or a list of any of these (their members pooled,
    post-processing only from a single ensemble folder), verified to take the same input the same way:
    one PreprocessSpec, clinical features (each member keeps its own normalisation), label names, outcome
    heads with targets, and cross-task strength. Any of them may be a URI (:func:`local_model`)."""
    sources = [local_model(p) for p in source] if isinstance(source, (list, tuple)) else [local_model(source)]
    if not sources:
        raise CheckpointError("no model given")
    folders: list[Path] = []
    largest: list[str] = []
    metrics: dict[str, float] = {}
    calibration = None
    for path in sources:
        if (path / ENSEMBLE_FILE).is_file():
            members, largest_here, metrics_here, calibration_here = ensemble_manifest(path)
            folders += members
            if len(sources) == 1:  # a calibration holds for the members it was fitted on, not for a mix
                largest, metrics, calibration = largest_here, metrics_here, calibration_here
        else:
            folders.append(path)
    members = [load_model(folder, map_location) for folder in folders]
    first = members[0]
    if len(members) == 1 and not metrics:
        metrics = first.metrics
    for member in members[1:]:
        for what, a, b in [("PreprocessSpec", first.spec.digest(), member.spec.digest()),
                           ("clinical features", _features(first.schema), _features(member.schema)),
                           ("label names", first.config.data.label_names, member.config.data.label_names),
                           ("outcome heads with targets", first.trained_heads, member.trained_heads),
                           ("cross-task strength", first.metrics.get("cross"), member.metrics.get("cross"))]:
            if a != b:
                raise CheckpointError(f"{member.source} and {first.source} cannot answer as one: their {what} differ")
    unknown = set(largest) - set(first.config.data.label_names.values())
    if unknown:
        raise CheckpointError(f"{sources[0] / ENSEMBLE_FILE}: post-processing names unknown structures "
                              f"{sorted(unknown)}")
    version = first.version if len(members) == 1 else hashlib.sha256(
        " ".join(m.version for m in members).encode()).hexdigest()[:12]
    if calibration is not None:  # the same weights calibrated anew answer differently: a new id
        version = hashlib.sha256(f"{version} {calibration.model_dump_json()}".encode()).hexdigest()[:12]
    return Ensemble(members=members, largest_component=largest, version=version, metrics=metrics,
                    calibration=calibration)
