"""Explanations of one prediction: where in the image each output looked, and which clinical features moved it.

**Class activation maps** of a layer, rectified, upsampled to the input and scaled to [0, 1], by one of
two methods. *Grad-CAM* (Selvaraju et al., ICCV 2017; MONAI's ``monai.visualize.GradCAM``) weights each
channel's activation by the spatial mean of the output's gradient; *HiResCAM* (Draelos & Carin 2020,
arXiv:2011.08891; :class:`HiResCAM`, on MONAI's hooks) multiplies activation and gradient voxel by voxel
before summing the channels, so the map shows where the output's gradient actually is. On MSD
hippocampus Grad-CAM's channel-mean weights light the anterior and posterior parts alike (at the
decoder's last level more the other part than the explained one), HiResCAM's maps stay on the explained
structure (``benchmarks/README.md``); HiResCAM is the default. Maps are scaled with their maximum at 1
(MONAI's default scaling maps the maximum to 0). The joint model returns a structure of
outputs, so :class:`TargetScores` turns it into the (B, targets) scores MONAI's CAM classes expect, one
per explained output:

* a structure: the mean logit of its class over the voxels predicted as it (the whole image where
  none is), Seg-Grad-CAM's region score (Vinogradova et al., AAAI 2020), at the decoder's last level;
* ``mmse`` and ``risk``: the head's output; ``cdr``: the sum of its CORAL logits (it rises with every
  stage threshold passed), each at the bottleneck the heads read (after the clinical fusion).

**Integrated Gradients** (Sundararajan et al., ICML 2017; captum) of each outcome over the clinical
features, from the record with every feature *missing* (the model's own representation of "not
known") to the patient's record: numeric features move their value and their missing flag together,
categorical ones their embedding from the "missing" category's (``LayerIntegratedGradients``). Each
feature's attribution is how much knowing it moved the prediction, in the output's units; numeric and
categorical features are attributed in two runs, each with the other group held at the patient's
values, so each group's attributions add up to its own total effect (completeness). The structure
volumes that v2 feeds from its mask into the outcome representation are counts of argmax labels, a step
function of the input with no gradient; they are held at the patient's predicted volumes
(:func:`with_held_volumes`), so the attributions are the features' effect through every other path,
and completeness holds for that model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import nn

from jointray.data.clinical import ClinicalInput, ClinicalSchema
from jointray.models.joint import JointModel

#: Integration steps of Integrated Gradients (captum's Gauss–Legendre rule converges in few).
IG_STEPS = 32
OUTCOMES = ("mmse", "cdr", "risk")


class TargetScores(nn.Module):
    """image (B, C, X, Y, Z) → (B, len(targets)) scores of the joint model, for MONAI's CAM classes.

    ``regions`` (B, K, X, Y, Z) bool: the voxels each class was predicted at (from a first forward pass),
    for the structure targets; ``structures``: class index → name.
    """

    def __init__(self, model: JointModel, targets: list[str], structures: dict[int, str],
                 clinical: ClinicalInput | None, cross: float, voxel_volume: torch.Tensor | None,
                 regions: torch.Tensor | None = None):
        super().__init__()
        self.model, self.targets, self.clinical, self.cross = model, targets, clinical, cross
        self.classes = {name: k for k, name in structures.items()}
        self.voxel_volume, self.regions = voxel_volume, regions

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image, self.clinical, self.cross, self.voxel_volume)
        scores = []
        for target in self.targets:
            if target in self.classes:
                logits = out.seg[0][:, self.classes[target]].float()
                region = self.regions[:, self.classes[target]]
                region = torch.where(region.flatten(1).any(1)[:, None, None, None], region, torch.ones_like(region))
                scores.append((logits * region).flatten(1).sum(1) / region.flatten(1).sum(1))
            elif target == "cdr":
                scores.append(out.outcomes["cdr"].float().sum(dim=1))
            else:
                scores.append(out.outcomes[target].float())
        return torch.stack(scores, dim=1)


class HiResCAM(GradCAM):
    """HiResCAM: ReLU(Σ_c ∂score/∂A_c ⊙ A_c), then upsampled and post-processed as MONAI's GradCAM is."""

    def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        return F.relu((acti[layer_idx] * grad[layer_idx]).sum(1, keepdim=True))


def _to_unit_range(maps: torch.Tensor) -> torch.Tensor:
    """(B, 1, X, Y, Z) → each map's min to 0 and max to 1 (all zeros where a map is constant)."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    shape = (-1,) + (1,) * (maps.ndim - 1)
    return (maps - low.view(shape)) / span.view(shape)


#: The methods :func:`activation_maps` offers, by name, and how a report names them.
CAM_METHODS = {"hirescam": (HiResCAM, "HiResCAM"), "gradcam": (GradCAM, "Grad-CAM")}


@dataclass
class Explanation:
    """``maps``: target → (X, Y, Z) class activation map in [0, 1] on the prepared grid (``method`` names how
    it was made); ``attributions``: outcome → clinical feature → Integrated Gradients attribution (output
    units); ``layers``: target → the layer."""

    maps: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    attributions: dict[str, dict[str, float]] = field(default_factory=dict)
    method: str = "HiResCAM"


def target_layer(model: JointModel, target: str) -> str:
    """The layer the activation map reads for ``target``: the decoder's last level for a structure, the fused
    bottleneck (the encoder's last level without fusion) for an outcome."""
    if target not in OUTCOMES:
        return f"decoder.levels.{len(model.decoder.levels) - 1}"
    if model.cross_attention is not None:
        return "cross_attention"
    return f"encoder.levels.{len(model.encoder.levels) - 1}"


def activation_maps(model: JointModel, image: torch.Tensor, clinical: ClinicalInput | None, targets: list[str],
                    structures: dict[int, str], cross: float = 1.0, voxel_volume: torch.Tensor | None = None,
                    method: str = "hirescam") -> Explanation:
    """The class activation map (``method``: a key of :data:`CAM_METHODS`) of each target for one or more
    images (B, C, X, Y, Z); maps of the first image are kept.

    The model is copied first: MONAI's hooks stay on the modules they were registered on.
    """
    cam_class, label = CAM_METHODS[method]
    model = copy.deepcopy(model).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    regions = None
    if model.decoder is not None:
        with torch.no_grad():
            labels = model(image, clinical, cross, voxel_volume).seg[0].argmax(1)
        regions = torch.stack([labels == k for k in range(model.cfg.num_classes)], dim=1)
    explanation = Explanation(method=label)
    for layer in sorted({target_layer(model, t) for t in targets}):
        chosen = [t for t in targets if target_layer(model, t) == layer]
        scores = TargetScores(model, chosen, structures, clinical, cross, voxel_volume, regions)
        # Layer names inside the TargetScores wrapper; the map scaled max → 1 (MONAI's default scaling flips it).
        cam = cam_class(nn_module=scores, target_layers=f"model.{layer}", postprocessing=_to_unit_range)
        for i, target in enumerate(chosen):
            heat = cam(x=image.detach().clone().requires_grad_(True), class_idx=i)
            explanation.maps[target] = heat[0, 0].detach().float().cpu().numpy()
            explanation.layers[target] = layer
    return explanation


class _HeldVolumes(nn.Module):
    """Stands in for ``StructureVolumes``: the volumes it measured once, whatever the logits now say."""

    def __init__(self, volumes: torch.Tensor):
        super().__init__()
        self.volumes = volumes

    def forward(self, logits: torch.Tensor, voxel_volume: torch.Tensor) -> torch.Tensor:
        return self.volumes.expand(logits.shape[0], -1)


def with_held_volumes(model: JointModel, image: torch.Tensor, clinical: ClinicalInput, cross: float = 1.0,
                      voxel_volume: torch.Tensor | None = None) -> JointModel:
    """A copy of ``model`` (eval mode) whose cross-task structure volumes stay those of ``image`` with
    ``clinical`` (see the module docstring); the model itself where it has no such path."""
    model = copy.deepcopy(model).eval()
    if getattr(model, "structure_volumes", None) is None:
        return model
    measured = {}
    hook = model.structure_volumes.register_forward_hook(lambda _m, _i, out: measured.setdefault("v", out.detach()))
    with torch.no_grad():
        model(image, clinical, cross, voxel_volume)
    hook.remove()
    model.structure_volumes = _HeldVolumes(measured["v"])
    return model


def clinical_attributions(model: JointModel, schema: ClinicalSchema, image: torch.Tensor, clinical: ClinicalInput,
                          heads: list[str], cross: float = 1.0, voxel_volume: torch.Tensor | None = None
                          ) -> dict[str, dict[str, float]]:
    """Integrated Gradients of each outcome in ``heads`` over the clinical features of one subject (B = 1):
    head → feature name → attribution (see the module docstring)."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model = with_held_volumes(model, image, clinical, cross, voxel_volume)
    with torch.no_grad():
        features = model.encoder(image) if model.encoder is not None else None

    def output(head: str, numeric: torch.Tensor, missing: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        batch = numeric.shape[0]
        record = ClinicalInput(numeric, missing, categorical.expand(batch, -1))
        seen = None if features is None else [f.expand(batch, *f.shape[1:]) for f in features]
        out = model.encode(image.expand(batch, *image.shape[1:]) if image is not None else None, record, cross,
                           None if voxel_volume is None else voxel_volume.expand(batch), seen)
        value = model.heads(out.hidden)[head].float()
        return value.sum(dim=1) if head == "cdr" else value

    numeric, missing = clinical.numeric.float(), clinical.missing.float()
    attributions: dict[str, dict[str, float]] = {}
    for head in heads:
        found: dict[str, float] = {}
        if schema.numeric:
            ig = IntegratedGradients(lambda n, m: output(head, n, m, clinical.categorical))
            parts = ig.attribute((numeric, missing), baselines=(torch.zeros_like(numeric), torch.ones_like(missing)),
                                 n_steps=IG_STEPS)
            total = (parts[0] + parts[1])[0]
            found |= {f.name: float(total[j]) for j, f in enumerate(schema.numeric)}
        if schema.categorical:
            layers = list(model.clinical.embeddings)
            lig = LayerIntegratedGradients(lambda c: output(head, numeric.expand(c.shape[0], -1),
                                                             missing.expand(c.shape[0], -1), c), layers)
            parts = lig.attribute(clinical.categorical, baselines=torch.zeros_like(clinical.categorical),
                                  n_steps=IG_STEPS)
            found |= {f.name: float(parts[j][0].sum()) for j, f in enumerate(schema.categorical)}
        attributions[head] = found
    return attributions


def explain_case(predictor, case, maps: bool = True, method: str = "hirescam") -> Explanation:
    """The class activation maps (``method``) of every structure and trained outcome head of ``predictor``'s
    first model for one prepared case, mapped back onto the input's grid, and the clinical attributions of
    each trained head (where the model reads a clinical record). Both explain one forward pass of the
    training window: a case larger than it (predicted by sliding window) is explained in the window centred
    on its predicted structures, and its maps are zero outside that window.

    Args:
        predictor: a :class:`~jointray.inference.predictor.Predictor` (an ensemble is explained by its first
            member).
        case: a :class:`~jointray.inference.cases.PreparedCase`.
        maps: False: the clinical attributions only (no activation maps).
        method: a key of :data:`CAM_METHODS`.
    """
    from jointray.data.preprocess import restore_to_original

    model = predictor.models[0]
    if not isinstance(model, JointModel):
        raise ValueError("explanations need the model's gradients: give the training checkpoint (or a torch export), "
                         "not an exported graph")
    image, clinical, voxel_volume, box = explained_input(predictor, case)
    heads = [h for h in OUTCOMES if h in predictor.trained_heads and model.heads is not None]
    targets = (list(predictor.structures.values()) if model.decoder is not None else []) + heads
    with torch.enable_grad():
        explanation = activation_maps(model, image, clinical[0], targets, predictor.structures, predictor.cross,
                                      voxel_volume, method) if maps else Explanation()
        if heads and model.clinical is not None and predictor.schema.num_numeric + len(predictor.schema.categorical):
            explanation.attributions = clinical_attributions(model, predictor.schema, image, clinical[0], heads,
                                                             predictor.cross, voxel_volume)
    for target, heat in explanation.maps.items():
        whole = np.zeros(case.image.shape[1:], np.float32)
        whole[box] = heat
        explanation.maps[target] = restore_to_original(whole[None], case.geometry, mode="linear")[0]
    return explanation


def explained_input(predictor, case):
    """(image (1, C, window), clinical per member, voxel volume, box): the model's input for one case in the
    training window, and where that window lies in the prepared grid: the whole grid for a window-sized case,
    else the window centred on the predicted structures (on the grid's centre where none is predicted)."""
    image, clinical, voxel_volume, _ = predictor.tensors([case])
    shape, window = np.array(case.image.shape[1:]), np.array(case.window)
    if case.path == "window":
        return image, clinical, voxel_volume, tuple(slice(0, int(n)) for n in shape)
    result = predictor.forward([case], 1, "heads")[0]
    found = None if result.probabilities is None else np.argwhere(result.probabilities.argmax(0) > 0)
    centre = found.mean(axis=0) if found is not None and len(found) else shape / 2
    start = np.clip(np.round(centre - window / 2).astype(int), 0, np.maximum(shape - window, 0))
    box = tuple(slice(int(a), int(a + w)) for a, w in zip(start, np.minimum(window, shape)))
    return image[(slice(None), slice(None), *box)], clinical, voxel_volume, box


def explain_file(checkpoint, source, clinical: dict, out, method: str = "hirescam") -> dict:
    """``jointray explain``: predict ``source`` in-process, explain it, and write beside it (or into ``out``)
    ``<name>_<method>_<target>.nii.gz`` per target (float32 on the input's grid), ``<name>_attributions.json``
    and the per-patient report with the explanations, ``<name>_report.html``. Returns what was written."""
    import json
    from pathlib import Path

    import nibabel as nib

    from jointray.inference.answers import answer
    from jointray.inference.client import mask_path, report_path
    from jointray.inference.predictor import Predictor
    from jointray.report.document import to_html
    from jointray.report.patient import patient_document

    predictor = Predictor(checkpoint)
    source = Path(source)
    case = predictor.prepare(source, clinical)
    samples, mode = predictor.check_mc(None, None)
    prediction = predictor.finish(case, predictor.forward([case], samples, mode)[0], samples, mode, entropy_map=True)
    explanation = explain_case(predictor, case, method=method)
    folder = mask_path(source, out).parent
    stem = mask_path(source, out).name.removesuffix("_mask.nii.gz")
    written: dict = {"maps": {}}
    for target, heat in explanation.maps.items():
        path = folder / f"{stem}_{method}_{target}.nii.gz"
        nib.save(nib.Nifti1Image(heat.astype(np.float32), case.geometry.original_affine), path)
        written["maps"][target] = str(path)
    if explanation.attributions:
        path = folder / f"{stem}_attributions.json"
        path.write_text(json.dumps(explanation.attributions, indent=2) + "\n")
        written["attributions"] = str(path)
    body = answer(predictor, case, prediction, prediction.seconds)
    document = patient_document(body, case.original[0], case.geometry.original_affine, prediction.mask,
                                prediction.entropy, predictor.metrics, predictor.config.model.num_classes, explanation)
    page = report_path(source, out)
    page.write_text(to_html(document))
    written["report"] = str(page)
    written["explanation"] = explanation
    return written
