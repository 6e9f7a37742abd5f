"""Post-training static INT8 quantisation of an exported ONNX graph (onnxruntime's quantisation tools).

Why onnxruntime: the served graph is already ONNX, so the quantised model is the same artifact type on
the same runtime, and its CPU kernels include 3D ``QLinearConv`` (MLAS, u8 activations × s8 weights).
Format QOperator, not QDQ: in QDQ form onnxruntime fuses a convolution into ``QLinearConv`` only where its
output is quantised too; this model's convolutions feed InstanceNorm, which its quantiser fails on here,
so most of them would run as float convolutions on dequantised weights — a float model in INT8 clothes.
QOperator rewrites each convolution into ``QLinearConv`` itself.

The convolutions (``Conv``) are quantised: per output channel for the weights (symmetric s8), per tensor
for activations (u8), ranges from MinMax calibration on prepared training cases. onnxruntime cannot
quantise ``ConvTranspose`` (the decoder's upsampling) in this format: those stay float, and the export
says so (``float_layers``). After quantisation, the graph onnxruntime actually runs (its optimised form)
is checked: every convolution must run as ``QLinearConv``, or the export fails, naming those that do not.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: What INT8 quantisation covers; every other op stays float by design.
QUANTIZED_OPS = ("Conv",)


class QuantizationError(RuntimeError):
    """A layer asked to run in INT8 does not (e.g. the runtime cannot fuse it)."""


def quantize_int8(source: Path, target: Path, calibration: Iterator[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Quantise the ONNX graph ``source`` into ``target`` with ranges calibrated on the ``calibration``
    feeds (graph input name → array). Returns what ran in INT8 and what stayed float (op type → count)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(calibration, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference and folding, as the tools advise
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS))
    before = collections.Counter(n.op_type for n in onnx.load(str(source)).graph.node)
    running = _optimised_ops(target)
    float_convs = running.get("Conv", 0)
    if float_convs:
        raise QuantizationError(f"{target}: {float_convs} of {before['Conv']} convolutions would run in float, not "
                                f"INT8 (onnxruntime ops after optimisation: {dict(running)})")
    return {"int8_layers": {"Conv": running.get("QLinearConv", 0)},
            "float_layers": {op: running[op] for op in ("ConvTranspose", "Gemm", "MatMul", "FusedGemm", "FusedMatMul",
                                                        "InstanceNormalization") if running.get(op)}}


def _optimised_ops(path: Path) -> collections.Counter:
    """Op types of the graph onnxruntime runs for ``path`` (after its graph optimisations and fusions)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        # EXTENDED: every fusion that decides which kernels run, but not the CPU layout transforms,
        # whose graph cannot be saved.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
