"""Exported models — ONNX, TorchScript, INT8, pruned — on real MSD cases, loaded as a checkpoint is."""

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import MSD_TRAIN_CASES, msd_held_out, msd_subset, shared_data
from typer.testing import CliRunner

from jointray.artifacts import ARTIFACT_FILE, CheckpointError, _sha256, load_model
from jointray.cli import app as cli
from jointray.config import InferenceConfig
from jointray.data.records import CaseRecord
from jointray.data.spec import PreprocessSpec
from jointray.export.exporter import FP32_TOLERANCE, ExportError, ExportSettings, export_model
from jointray.export.prune import prunable_weights
from jointray.inference.predictor import Predictor
from jointray.models import build_model

CASES = 5


def _record(i: int) -> CaseRecord:
    image, label = msd_held_out(30 + i)
    return CaseRecord(subject_id=f"case{i}", images=[str(image)], label=str(label))


def _probabilities(predictor: Predictor, count: int) -> list[np.ndarray]:
    """The deterministic pass's class probabilities (mirroring included) on the prepared grid."""
    return [predictor.forward([predictor.prepare(_record(i))], 1)[0].probabilities for i in range(count)]


def _dice(source, count: int = CASES) -> float:
    predictions = Predictor(source, device="cpu").predict_batch([_record(i) for i in range(count)])
    return float(np.mean([[p.metrics[f"dice/{name}"] for name in ("anterior", "posterior")] for p in predictions]))


@pytest.fixture(scope="module")
def torch_answers(msd_checkpoint):
    return _probabilities(Predictor(msd_checkpoint, device="cpu"), 3)


def test_onnx_export_answers_as_pytorch_does_on_real_msd_cases(msd_checkpoint, msd_onnx, torch_answers):
    artifact = load_model(msd_onnx)
    assert artifact.runtime == "onnxruntime" and artifact.state_dict is None
    assert sorted(p.name for p in artifact.graphs.values()) == ["model.onnx", "model_mc.onnx"]
    for path in artifact.graphs.values():
        onnx.checker.check_model(str(path), full_check=True)
    assert artifact.export["outputs"] == ["seg", "mmse", "cdr", "risk"]
    assert artifact.export["fidelity"]["cases"] == 4
    assert artifact.export["fidelity"]["max_abs_probability_difference"] <= FP32_TOLERANCE
    # The source's validation figures travel (as JSON: NaN, a figure without data, equals itself there).
    source = load_model(msd_checkpoint)
    assert json.dumps(artifact.metrics, sort_keys=True) == json.dumps(source.metrics, sort_keys=True)

    exported = Predictor(msd_onnx, device="cpu")
    for p, q in zip(torch_answers, _probabilities(exported, 3)):
        assert np.abs(p - q).max() <= FP32_TOLERANCE
        assert (p.argmax(0) == q.argmax(0)).mean() >= 0.9999  # only near-ties may flip

    # Monte Carlo dropout from the graph with dropout on: samples differ, the model's own uncertainty shows.
    assert exported.check_mc(None, None) == (20, "full")
    sampled = exported.forward([exported.prepare(_record(0))], 8)[0]
    assert sampled.sample_volumes.std(0).min() > 0 and sampled.mutual_information.max() > 0
    with pytest.raises(ValueError, match="whole network"):
        exported.check_mc(8, "decoder")


def test_torchscript_export_answers_as_pytorch_does(msd_checkpoint, torch_answers, tmp_path):
    out = export_model(msd_checkpoint, tmp_path / "ts", ExportSettings(format="torchscript"))
    artifact = load_model(out)
    assert artifact.runtime == "torchscript" and sorted(artifact.graphs) == ["deterministic", "mc"]
    for p, q in zip(torch_answers[:2], _probabilities(Predictor(out, device="cpu"), 2)):
        assert np.abs(p - q).max() <= FP32_TOLERANCE


def test_int8_export_runs_its_convolutions_in_int8_and_keeps_the_dice(msd_checkpoint, msd_onnx, tmp_path):
    out = tmp_path / "int8"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(msd_checkpoint), "--out", str(out),
                                      "--format", "onnx", "--quantize", "int8", "--calibration-cases", "8"])
    assert result.exit_code == 0, result.output
    artifact = load_model(out)
    # The float graph's convolutions (the deep-supervision outputs are not in a graph: it answers full resolution).
    float_ops = [n.op_type for n in onnx.load(str(msd_onnx / "model.onnx")).graph.node]
    convs, transposed = float_ops.count("Conv"), float_ops.count("ConvTranspose")
    assert convs > 20 and transposed == 4
    for kind in ("deterministic", "mc"):
        quantized = artifact.export[f"quantization_{kind}"]
        assert quantized["int8_layers"] == {"Conv": convs}
        assert quantized["float_layers"]["ConvTranspose"] == transposed  # onnxruntime cannot: said, not hidden
    assert artifact.export["calibration_cases"] == 8
    graph = onnx.load(str(out / "model.onnx")).graph
    stored = {t.name: t.data_type for t in graph.initializer}
    weights = [stored[n.input[3]] for n in graph.node if n.op_type == "QLinearConv"]
    assert weights == [onnx.TensorProto.INT8] * convs  # the weights are stored in 8 bits, not only run in them
    assert "INT8 (deterministic graph)" in result.output

    float_dice, int8_dice = _dice(msd_onnx), _dice(out)
    assert float_dice > 0.6  # the shared model finds the hippocampus: the comparison means something
    assert abs(int8_dice - float_dice) <= 0.02


def test_pruning_zeroes_the_smallest_half_and_survives_a_fine_tune(msd_checkpoint, tmp_path):
    out = export_model(msd_checkpoint, tmp_path / "pruned",
                       ExportSettings(format="torch", prune=0.5, finetune_steps=10))
    artifact = load_model(out)
    model = build_model(artifact.config.model, 1, artifact.schema)
    model.load_state_dict(artifact.state_dict)
    weights = [getattr(m, name) for m, name in prunable_weights(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.5 * sum(w.numel() for w in weights))  # exactly the asked share, after the fine-tune
    source = build_model(artifact.config.model, 1, artifact.schema)
    source.load_state_dict(load_model(msd_checkpoint).state_dict)
    kept = [(w != 0) for w in weights]
    originals = [getattr(m, name).detach() for m, name in prunable_weights(source)]
    # The zeros are where the smallest weights were (global magnitude): every kept weight was at least as large.
    threshold = max(float(o[~k].abs().max()) for o, k in zip(originals, kept) if (~k).any())
    assert min(float(o[k].abs().min()) for o, k in zip(originals, kept) if k.any()) >= threshold
    figures = artifact.export["prune"]
    assert figures["sparsity"] == zeros / sum(w.numel() for w in weights) and figures["finetune_steps"] == 10
    assert _dice(out, 2) > 0.3  # the pruned artifact loads and still finds the structure (its cost: the benchmark)


def test_corrupt_mismatched_and_impossible_exports_are_refused(msd_checkpoint, msd_onnx, tmp_path):
    corrupt = shutil.copytree(msd_onnx, tmp_path / "corrupt")
    data = bytearray((corrupt / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.onnx: missing, or its contents do not match"):
        Predictor(corrupt, device="cpu")

    # A graph whose spec no longer matches it (hashes made consistent, so only the mismatch is left).
    mismatched = shutil.copytree(msd_onnx, tmp_path / "mismatched")
    spec = PreprocessSpec.model_validate_json((mismatched / "spec.json").read_text())
    spec = spec.model_copy(update={"target_shape": [40, 64, 48]})
    (mismatched / "spec.json").write_text(spec.model_dump_json(indent=2))
    manifest = json.loads((mismatched / ARTIFACT_FILE).read_text())
    manifest["spec_digest"] = spec.digest()
    manifest["sha256"]["spec.json"] = _sha256(mismatched / "spec.json")
    (mismatched / ARTIFACT_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model.onnx: the graph takes .* PreprocessSpec say \(batch, 1, 40, 64"):
        Predictor(mismatched, device="cpu")

    with pytest.raises(ExportError, match="use --format onnx"):
        export_model(msd_checkpoint, tmp_path / "x", ExportSettings(format="torchscript", quantize="int8"))
    with pytest.raises(ExportError, match="already an exported onnxruntime graph"):
        export_model(msd_onnx, tmp_path / "x", ExportSettings(format="onnx"))
    with pytest.raises(ExportError, match="strictly between 0 and 1"):
        export_model(msd_checkpoint, tmp_path / "x", ExportSettings(format="torch", prune=1.5))
    with pytest.raises(CheckpointError, match="inference.runtime=onnxruntime but the model runs on torch"):
        Predictor(msd_checkpoint, device="cpu", inference=InferenceConfig(runtime="onnxruntime"))
    assert not (tmp_path / "x").exists()


def test_evaluate_scores_an_exported_model_as_the_predictor_does(msd_onnx, tmp_path):
    from jointray.inference.evaluate import evaluate

    cases, _ = msd_subset(shared_data("msd_hippocampus"), tmp_path / "cases", MSD_TRAIN_CASES + 30, 2)
    report = evaluate(msd_onnx, cases, tmp_path / "out", batch_size=1)
    assert report.predicted == 2 and report.mc_mode == "full"
    # The same model and cases in this process: equal up to onnxruntime's threading (the actors run with
    # another thread count), which may flip a near-tie voxel, not a structure.
    assert report.metrics["dice"] == pytest.approx(_dice(msd_onnx, 2), abs=1e-3)
