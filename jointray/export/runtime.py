"""Exported graphs (ONNX on onnxruntime, TorchScript) behind the interface the inference core calls on a model.

:class:`GraphModel` answers :meth:`~jointray.models.joint.JointModel.encode` and ``heads`` as the PyTorch
model does, so :mod:`jointray.inference.forward` (mirroring, ensembles, sliding windows) runs it
unchanged: ``encode`` runs the deterministic graph, whose outcome heads are part of it, and ``heads``
hands their outputs on. Monte Carlo samples come from the graph with dropout always on
(:func:`jointray.export.graph.stochastic_copy`) through :class:`GraphSampler`: mode ``full`` only, since
the graph cannot run its encoder once and its decoder many times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointray.artifacts import CheckpointError, ModelArtifact
from jointray.config import ModelConfig
from jointray.data.clinical import ClinicalInput
from jointray.export.graph import INPUT_NAMES
from jointray.models.joint import variant_spec
from jointray.tasks import JointOutput

RUNTIMES = ("onnxruntime", "torchscript")


class GraphRunner:
    """One graph file, run on plain tensors: ``run(*inputs) → list of output tensors`` on the inputs' device."""

    def __init__(self, path: Path, runtime: str, device: torch.device):
        self.path, self.runtime, self.device = path, runtime, device
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            # As many threads as torch was given (a Ray replica's CPUs), not every core of the node.
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            self.session = ort.InferenceSession(str(path), options, providers=providers)
            self.inputs = [i.name for i in self.session.get_inputs()]  # ONNX drops unused (empty) inputs
        elif runtime == "torchscript":
            self.module = torch.jit.load(str(path), map_location=device).eval()
        else:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if self.runtime == "torchscript":
            with torch.no_grad():
                return [o.float() for o in self.module(*inputs)]
        feed = {name: value.detach().contiguous().cpu().numpy() for name, value in zip(INPUT_NAMES, inputs)
                if name in self.inputs}
        return [torch.from_numpy(np.ascontiguousarray(o)).to(inputs[0].device) for o in self.session.run(None, feed)]


def _inputs(image: torch.Tensor, clinical: ClinicalInput,
            voxel_volume: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    if voxel_volume is None:
        voxel_volume = torch.ones(image.shape[0], device=image.device)
    return (image.float(), clinical.numeric.float(), clinical.missing.bool(), clinical.categorical.long(),
            voxel_volume.float())


@dataclass
class GraphModel:
    """An exported model answering as a :class:`~jointray.models.joint.JointModel` does for inference.

    ``names``: the graph's outputs (``seg``, then the heads); ``decoder``/``heads`` are truthy where the
    model has them, as the PyTorch model's modules are. ``cross`` is baked into the graph.
    """

    deterministic: GraphRunner
    stochastic: GraphRunner | None
    names: list[str]

    def __post_init__(self):
        self.decoder = True if "seg" in self.names else None
        self.heads = self._heads if any(n != "seg" for n in self.names) else None

    @staticmethod
    def _heads(hidden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return hidden  # the graph computed the heads with the rest: ``hidden`` holds their outputs

    def _answer(self, outputs: list[torch.Tensor]) -> JointOutput:
        named = dict(zip(self.names, outputs))
        seg = [named.pop("seg")] if "seg" in named else None
        return JointOutput(seg=seg, hidden=named)

    def encode(self, image: torch.Tensor, clinical: ClinicalInput, cross: float = 1.0,
               voxel_volume: torch.Tensor | None = None) -> JointOutput:
        return self._answer(self.deterministic.run(*_inputs(image, clinical, voxel_volume)))

    def sample(self, image: torch.Tensor, clinical: ClinicalInput, voxel_volume: torch.Tensor | None) -> JointOutput:
        """One stochastic pass (dropout on) of the whole network per case of the batch."""
        if self.stochastic is None:
            raise ValueError(f"{self.deterministic.path.parent}: this export has no Monte Carlo graph (the model "
                             "has no dropout); ask for one sample")
        return self._answer(self.stochastic.run(*_inputs(image, clinical, voxel_volume)))


class GraphSampler:
    """:class:`~jointray.models.mc.MCSampler`'s ``draw`` for a :class:`GraphModel`: T stochastic passes of the
    whole network as one batch of T·B tiled cases (mode ``full``)."""

    def __init__(self, model: GraphModel, image: torch.Tensor, clinical: ClinicalInput, mode: str,
                 voxel_volume: torch.Tensor | None):
        if mode != "full":
            raise ValueError(f"an exported model samples Monte Carlo dropout over the whole network only: "
                             f"mode 'full', not {mode!r}")
        self.model, self.image, self.clinical, self.voxel_volume = model, image, clinical, voxel_volume
        self.batch = image.shape[0]

    def draw(self, samples: int) -> dict[str, Any]:
        image = self.image.repeat(samples, *([1] * (self.image.ndim - 1)))
        volume = self.voxel_volume.repeat(samples) if self.voxel_volume is not None else None
        out = self.model.sample(image, self.clinical.repeat(samples), volume)
        result = {name: value.view(samples, self.batch, *value.shape[1:]) for name, value in out.hidden.items()}
        if out.seg is not None:
            probs = torch.softmax(out.seg[0].float(), 1)
            result["seg_probs"] = probs.view(samples, self.batch, *probs.shape[1:])
        return result


def expected_outputs(cfg: ModelConfig) -> list[str]:
    """The outputs an exported graph of a model of ``cfg`` has (:func:`jointray.export.graph.output_names`)."""
    spec = variant_spec(cfg)
    return (["seg"] if spec.segmentation else []) + (list(cfg.heads) if spec.outcomes else [])


def load_graph_model(member: ModelArtifact, device: torch.device) -> GraphModel:
    """The :class:`GraphModel` of an exported artifact, refused when its graph does not take the input its
    PreprocessSpec makes or give the outputs its config names."""
    names = expected_outputs(member.config.model)
    deterministic = GraphRunner(member.graphs["deterministic"], member.runtime, device)
    stochastic = GraphRunner(member.graphs["mc"], member.runtime, device) if "mc" in member.graphs else None
    for runner in filter(None, (deterministic, stochastic)):
        if runner.runtime != "onnxruntime":
            continue  # a TorchScript module names no inputs or outputs: its export.json and hashes vouch for it
        outputs = [o.name for o in runner.session.get_outputs()]
        image = next(i for i in runner.session.get_inputs() if i.name == "image").shape
        want = [member.spec.channels, *member.spec.target_shape]
        if outputs != names or list(image[1:]) != want:
            raise CheckpointError(f"{runner.path}: the graph takes image {image} and gives {outputs}; its config and "
                                  f"PreprocessSpec say (batch, {', '.join(map(str, want))}) and {names}")
    return GraphModel(deterministic, stochastic, names)
