"""``jointray export``: a checkpoint → a serving artifact for PyTorch, onnxruntime or TorchScript, optionally
pruned (:mod:`jointray.export.prune`) and, for ONNX, quantised to INT8 (:mod:`jointray.export.quantize`).

A graph export writes two graphs (:mod:`jointray.export.graph`): the deterministic one, and its Monte Carlo
twin with dropout always on (absent for a model without dropout). Before the artifact replaces anything,
the deterministic graph runs on prepared validation cases of the checkpoint's own fold beside the PyTorch
model it came from (after pruning, when pruned); ``export.json`` records how far its probabilities, masks
and outcomes are from PyTorch's. A float graph further than :data:`FP32_TOLERANCE` from PyTorch is a
broken export and fails; a quantised one is recorded as it is (judge it by ``jointray evaluate``).
INT8 calibration reads prepared training cases of that fold, never its validation cases.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jointray.artifacts import CheckpointError, ModelArtifact, load_model, write_artifact
from jointray.data.streaming import read_subjects, split_subjects
from jointray.export.graph import INPUT_NAMES, JointGraph, example_inputs, output_names, stochastic_copy
from jointray.export.prune import prune_and_finetune
from jointray.export.quantize import quantize_int8
from jointray.export.runtime import GraphRunner
from jointray.models import build_model
from jointray.models.joint import JointModel
from jointray.train.batches import to_model_batch

FORMATS = ("torch", "onnx", "torchscript")
RUNTIME = {"torch": "torch", "onnx": "onnxruntime", "torchscript": "torchscript"}
GRAPH_FILES = {"onnx": ("model.onnx", "model_mc.onnx"), "torchscript": ("model.ts", "model_mc.ts")}
#: Largest difference of any class probability between a float graph and PyTorch on a check case: float32
#: kernels that sum in another order differ by ~1e-6; a graph that lost an op differs by far more.
FP32_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot be made as asked (wrong source, format, or cases to calibrate on)."""


@dataclass
class ExportSettings:
    """``format``: one of :data:`FORMATS`; ``quantize``: ``"int8"`` (ONNX only) or None; ``prune``: fraction of
    weights to zero, or None; ``prepared``: the prepared shards to calibrate, fine-tune and check on
    (default the checkpoint's ``data.output``)."""

    format: str = "onnx"
    quantize: str | None = None
    prune: float | None = None
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    calibration_cases: int = 16
    check_cases: int = 4
    prepared: Path | None = None


def _torch_model(member: ModelArtifact) -> JointModel:
    model = build_model(member.config.model, member.spec.channels, member.schema)
    model.load_state_dict(member.state_dict)
    return model.eval()


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)) and m.p > 0
               for m in model.modules())


def _inputs(rows: dict[str, np.ndarray], member: ModelArtifact) -> tuple[torch.Tensor, ...]:
    batch = to_model_batch(rows, member.schema, "cpu")
    c = batch.clinical
    return batch.image, c.numeric, c.missing, c.categorical, batch.voxel_volume


def _take(rows: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in rows.items()}


def write_graph(graph: JointGraph, path: Path, fmt: str, example: tuple[torch.Tensor, ...]) -> None:
    """``graph`` as ONNX (checked with ``onnx.checker``) or TorchScript, with a dynamic batch axis."""
    if fmt == "onnx":
        import onnx

        batch = torch.export.Dim("batch")
        # The exporter narrates every pass on stdout, and warns of its own internals.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("onnxscript").setLevel(logging.ERROR)
            torch.onnx.export(graph, example, str(path), input_names=list(INPUT_NAMES), output_names=graph.names,
                              dynamo=True, external_data=False, dynamic_shapes=tuple({0: batch} for _ in example))
        onnx.checker.check_model(str(path), full_check=True)
    else:
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(path))


def fidelity(path: Path, runtime: str, model: JointModel, cross: float,
             inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """How far the graph at ``path`` answers from ``model`` on ``inputs``: the largest and mean difference of
    a class probability, the share of voxels whose argmax agrees, the mean Dice of the graph's mask against
    PyTorch's over the foreground classes, and the largest difference of an outcome head's output."""
    runner = GraphRunner(path, runtime, torch.device("cpu"))
    graph = JointGraph(model, cross).eval()
    with torch.no_grad():
        reference = graph(*inputs)
    answer = runner.run(*inputs)
    result: dict[str, float] = {"cases": float(inputs[0].shape[0])}
    names = graph.names
    if "seg" in names:
        p, q = reference[0].float().softmax(1), answer[0].float().softmax(1)
        result["max_abs_probability_difference"] = float((p - q).abs().max())
        result["mean_abs_probability_difference"] = float((p - q).abs().mean())
        a, b = p.argmax(1), q.argmax(1)
        result["argmax_agreement"] = float((a == b).float().mean())
        dice = []
        for k in range(1, p.shape[1]):
            x, y = a == k, b == k
            total = int(x.sum() + y.sum())
            dice.append(1.0 if total == 0 else 2.0 * int((x & y).sum()) / total)
        result["mask_dice_vs_torch"] = float(np.mean(dice))
    heads = [i for i, n in enumerate(names) if n != "seg"]
    if heads:
        result["max_abs_outcome_difference"] = max(float((reference[i].float() - answer[i]).abs().max()) for i in heads)
    return result


def export_model(checkpoint: str | Path, out: str | Path, settings: ExportSettings) -> Path:
    """Export ``checkpoint`` (a training checkpoint or a PyTorch artifact) into ``out`` (replaced whole)."""
    member = load_model(checkpoint)
    fmt = settings.format
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if member.runtime != "torch":
        raise ExportError(f"{checkpoint}: already an exported {member.runtime} graph; export from the checkpoint")
    if settings.quantize not in (None, "int8"):
        raise ExportError(f"--quantize {settings.quantize}: only int8 is supported")
    if settings.quantize and fmt != "onnx":
        raise ExportError(f"--quantize int8 runs on onnxruntime: use --format onnx, not {fmt}")
    if settings.prune is not None and not 0.0 < settings.prune < 1.0:
        raise ExportError(f"--prune {settings.prune}: the fraction of weights to zero lies strictly between 0 and 1")
    cfg, cross = member.config, member.cross
    model = _torch_model(member)
    info: dict[str, Any] = {"format": fmt, "runtime": RUNTIME[fmt], "quantize": settings.quantize,
                            "source": member.source, "source_version": member.version, "torch": torch.__version__,
                            "machine": platform.machine(), "outputs": output_names(model)}
    train_ids = val_ids = []
    prepared = Path(settings.prepared or cfg.data.output)
    if settings.prune or fmt != "torch":
        try:
            train_ids, val_ids = split_subjects(prepared, cfg.train.n_folds, cfg.train.fold, cfg.train.seed)
        except (OSError, ValueError) as exc:
            raise ExportError(f"{prepared}: the prepared cases of this model are needed to check the export "
                              f"(and to calibrate or fine-tune it): {exc}; pass --prepared") from exc
    if settings.prune:
        info["prune"] = prune_and_finetune(
            model, settings.prune, read_subjects(prepared, train_ids), cfg, member.schema,
            ["seg", *member.trained_heads], cross, settings.finetune_steps, settings.finetune_lr, cfg.train.seed)
        member = replace(member, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    if fmt == "torch":
        return write_artifact(out, member, export=info)

    check = _inputs(read_subjects(prepared, val_ids[:settings.check_cases]), member)
    example = example_inputs(model, member.spec.channels, tuple(member.spec.target_shape),
                             num_numeric=member.schema.num_numeric, num_categorical=len(member.schema.categorical))

    def write_graphs(folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
        files = dict(zip(("deterministic", "mc"), GRAPH_FILES[fmt]))
        graphs = {"deterministic": JointGraph(model, cross).eval()}
        if _has_dropout(model):
            graphs["mc"] = JointGraph(stochastic_copy(model), cross).eval()
        for kind, graph in graphs.items():
            write_graph(graph, folder / files[kind], fmt, example)
        if settings.quantize:
            pick = np.linspace(0, len(train_ids) - 1, min(settings.calibration_cases, len(train_ids))).round()
            calibration = _inputs(read_subjects(prepared, [train_ids[int(i)] for i in np.unique(pick)]), member)
            info["calibration_cases"] = int(calibration[0].shape[0])
            for kind in graphs:
                with tempfile.TemporaryDirectory() as tmp:
                    float_graph = Path(tmp) / files[kind]
                    (folder / files[kind]).replace(float_graph)
                    feeds = ({n: t[i:i + 4].numpy() for n, t in zip(INPUT_NAMES, calibration)}
                             for i in range(0, calibration[0].shape[0], 4))
                    info[f"quantization_{kind}"] = quantize_int8(float_graph, folder / files[kind], feeds)
        info["fidelity"] = fidelity(folder / files["deterministic"], RUNTIME[fmt], model, cross, check)
        difference = info["fidelity"].get("max_abs_probability_difference", 0.0)
        if not settings.quantize and difference > FP32_TOLERANCE:
            raise ExportError(f"the exported {fmt} graph's probabilities differ from PyTorch's by up to "
                              f"{difference:.2e} on {len(check[0])} validation cases (tolerance {FP32_TOLERANCE:g})")
        info["files_mb"] = {files[k]: (folder / files[k]).stat().st_size / 1e6 for k in graphs}
        return {k: files[k] for k in graphs}, info

    try:
        return write_artifact(out, member, RUNTIME[fmt], write_graphs)
    except CheckpointError as exc:
        raise ExportError(f"the export did not load back: {exc}") from exc
