"""Inference stage 2 (the accelerator): one batched, vectorised call over prepared cases.

The models: one, or the members of an ensemble (:func:`jointray.artifacts.load_models`, e.g. the
cross-validation folds), which answer as one by averaging probabilities; PyTorch models or exported graphs
(:class:`~jointray.export.runtime.GraphModel`, which sample mode ``full`` only); each reads the clinical record
as its own schema encodes it (folds normalise with their own training cases' statistics). For a batch
of B cases of the training window's shape, :func:`window_forward` runs

1. the **deterministic pass** (dropout off), averaged over the members and test-time mirror images: the
   class probabilities whose argmax is the mask — exactly what ``evaluate`` scores — and the point
   outcomes (MMSE and risk averaged; CDR from the members' mean ``P(y > k)``);
2. T **Monte Carlo samples** (:class:`~jointray.models.mc.MCSampler`, mode ``full``, ``decoder`` or
   ``heads``), drawn in chunks of at most ``chunk_cases`` (sample × case) items so memory stays
   bounded, sample t from view ``t mod V`` of the V (member, mirror image) pairs: mirroring and the
   ensemble compose with MC at no extra cost, and the samples spread over members as a deep ensemble's
   do (Lakshminarayanan et al. 2017) once T ≥ V. Only running sums leave a chunk: the mean
   probabilities, the mean per-sample entropy, per-sample structure volumes and per-sample outcomes.

Per voxel, predictive entropy ``H[E_t p_t]`` (total uncertainty) and mutual information
``H[E_t p_t] − E_t H[p_t]`` (the part due to the model's uncertainty, Gal 2016 §3.3; 0 without
segmentation samples). With T = 1 there are no samples: the deterministic pass is the only one.

Inputs larger than the window (:func:`sliding_forward`), e.g. a whole-head scan for a model trained on
hippocampus crops, in two steps:

1. *Locate*: MONAI's Gaussian-weighted :func:`~monai.inferers.sliding_window_inference` over the whole
   volume; the structure is the connected foreground component holding the most probability, counting
   only voxels with image content (a window of empty space is nothing the model was trained on).
2. *Segment*: one window centred on that structure's bounding box — the way training crops centre
   on the case — re-centred on its own prediction until it stops moving (at most ``FOCUS_STEPS``),
   then predicted exactly as a window-sized input, MC samples included.

The mask is that window's, background outside it; so are the uncertainty maps. One structure per
input, as the training crops hold one; blending every window's prediction instead would ask a model
trained on centred crops to segment off-centre ones, which it does badly (a model trained without
``train.augment.shift_prob`` loses most of its Dice that way).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from jointray.data.clinical import ClinicalInput
from jointray.export.runtime import GraphModel, GraphSampler
from jointray.losses.ordinal import coral_probabilities
from jointray.models import MCSampler
from jointray.models.joint import JointModel
from jointray.models.layout import image_in_layout
from jointray.tasks import JointOutput


@dataclass
class ForwardResult:
    """The forward stage's answer for one case, on the prepared grid.

    ``probabilities`` (K, X, Y, Z), ``entropy`` and ``mutual_information`` (X, Y, Z), float32, None for a
    model without segmentation; ``sample_volumes`` (T, K-1) mm³ of each structure in each sample;
    ``outcome_samples``: ``mmse``/``risk`` (T,), ``cdr`` (T, K) class probabilities; ``outcome_point``:
    the deterministic ``mmse``, ``risk``, ``cdr_class`` and ``cdr_probabilities`` (K,); ``sample_dice``
    (K-1,): the mean Dice between each segmentation sample's mask and the deterministic mask, per structure
    (None without segmentation samples).
    """

    probabilities: np.ndarray | None
    entropy: np.ndarray | None
    mutual_information: np.ndarray | None
    sample_volumes: np.ndarray | None
    outcome_samples: dict[str, np.ndarray] = field(default_factory=dict)
    outcome_point: dict[str, object] = field(default_factory=dict)
    path: str = "window"
    focus_start: tuple[int, int, int] | None = None
    sample_dice: np.ndarray | None = None


def mirror_sets(flip_axes: list[int]) -> list[tuple[int, ...]]:
    """Tensor dims (of a (B, C, X, Y, Z) batch) to flip for test-time mirroring: every non-empty subset of
    the RAS axes training mirrored."""
    dims = [2 + axis for axis in sorted(set(flip_axes))]
    return [combo for k in range(1, len(dims) + 1) for combo in itertools.combinations(dims, k)]


def entropy(probabilities: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``, with 0·log 0 = 0."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim)


@dataclass
class ForwardSettings:
    cross: float
    mirrors: list[tuple[int, ...]]
    chunk_cases: int
    autocast: Callable
    channels_last: bool


def deterministic_probabilities(models: list[JointModel], image: torch.Tensor, clinical: list[ClinicalInput],
                                vv: torch.Tensor, s: ForwardSettings,
                                first: list[JointOutput] | None = None) -> torch.Tensor:
    """Class probabilities (B, K, X, Y, Z), float32, averaged over the models (``clinical``: each one's
    encoding of the records) and over the image and its mirror images, each mapped back; ``first``: each
    model's unmirrored pass when the caller already ran it."""
    probabilities = None
    with s.autocast():
        for i, (model, record) in enumerate(zip(models, clinical)):
            encoded = first[i] if first is not None else model.encode(image, record, s.cross, vv)
            p = encoded.seg[0].float().softmax(1)
            for dims in s.mirrors:
                p = p + model.encode(image.flip(dims), record, s.cross, vv).seg[0].float().softmax(1).flip(dims)
            probabilities = p if probabilities is None else probabilities + p
    return probabilities / (len(models) * (1 + len(s.mirrors)))


def _structure_counts(probabilities: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(..., B, K, X, Y, Z) → (..., B, K-1) voxels inside the input (``inside`` (B, X, Y, Z)) whose argmax is
    each foreground class."""
    winner = probabilities.argmax(-4)
    classes = torch.arange(1, probabilities.shape[-4], device=winner.device)
    hits = (winner.unsqueeze(-4) == classes.view(-1, 1, 1, 1)) & inside.unsqueeze(-4)
    return hits.flatten(-3).sum(-1)


def _sample_dice(samples: torch.Tensor, point: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Dice of each sample's argmax against the point argmax, per structure: samples (n, B, K, X, Y, Z), point
    (B, X, Y, Z) classes, ``inside`` (B, X, Y, Z) → (n, B, K-1); two empty masks agree (1)."""
    classes = torch.arange(1, samples.shape[2], device=samples.device).view(-1, 1, 1, 1)
    drawn = (samples.argmax(2).unsqueeze(2) == classes) & inside.unsqueeze(1)
    reference = (point.unsqueeze(1) == classes) & inside.unsqueeze(1)
    overlap = (drawn & reference).flatten(-3).sum(-1).float()
    total = (drawn.flatten(-3).sum(-1) + reference.flatten(-3).sum(-1)).float()
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))


def _outcomes(outcomes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head outputs (B,) / (B, K-1) CORAL logits → mmse, risk (B,) and cdr class probabilities (B, K), float32."""
    result = {name: outcomes[name].float() for name in ("mmse", "risk") if name in outcomes}
    if "cdr" in outcomes:
        result["cdr"] = coral_probabilities(outcomes["cdr"].float())
    return result


def _point_outcomes(points: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The members' deterministic head outputs → their mean :func:`_outcomes` and the CDR class (B,): the
    number of thresholds whose mean ``P(y > k)`` over the members exceeds 0.5 (for one model, CORAL's
    rule), None without a CDR head."""
    outcomes = [_outcomes(point) for point in points]
    mean = {name: torch.stack([o[name] for o in outcomes]).mean(0) for name in outcomes[0]}
    if "cdr" not in points[0]:
        return mean, None
    exceed = torch.stack([torch.sigmoid(point["cdr"].float()) for point in points]).mean(0)
    return mean, (exceed > 0.5).sum(dim=1)


def _sampler(model: JointModel | GraphModel, image: torch.Tensor, clinical: ClinicalInput, mode: str, cross: float,
             vv: torch.Tensor, encoded: JointOutput | None) -> MCSampler | GraphSampler:
    if isinstance(model, GraphModel):
        return GraphSampler(model, image, clinical, mode, vv)
    return MCSampler(model, image, clinical, mode, cross, vv, encoded=encoded)


@torch.no_grad()
def window_forward(models: list[JointModel], image: torch.Tensor, clinical: list[ClinicalInput], vv: torch.Tensor,
                   inside: torch.Tensor, samples: int, mode: str, s: ForwardSettings) -> list[ForwardResult]:
    """B cases of the window's shape: image (B, C, X, Y, Z), ``clinical`` each model's encoding of their
    records, ``vv`` (B,) prepared voxel volumes in mm³, ``inside`` (B, X, Y, Z) the voxels that lie inside
    the input (not padding), where volumes are counted."""
    batch = image.shape[0]
    with s.autocast():
        first = [model.encode(image, record, s.cross, vv) for model, record in zip(models, clinical)]
        points = [model.heads(f.hidden) if model.heads is not None else {} for model, f in zip(models, first)]
    probabilities = (deterministic_probabilities(models, image, clinical, vv, s, first)
                     if first[0].seg is not None else None)
    point_outcomes, cdr_class = _point_outcomes(points)
    point = points[0]

    sum_probs = sum_entropy = sum_dice = None
    volumes: list[torch.Tensor] = []  # (n, B, K-1) per chunk
    outcome_samples: dict[str, list[torch.Tensor]] = {name: [] for name in point_outcomes}
    segmentation_sampled = probabilities is not None and mode != "heads" and samples > 1
    if samples == 1:
        if probabilities is not None:
            volumes.append(_structure_counts(probabilities, inside).unsqueeze(0))
        for name, value in point_outcomes.items():
            outcome_samples[name].append(value.unsqueeze(0))
    else:
        views = [(m, dims) for m in range(len(models)) for dims in ([()] + s.mirrors if segmentation_sampled else [()])]
        samplers = [_sampler(models[m], image.flip(dims) if dims else image, clinical[m], mode, s.cross, vv,
                             first[m] if (mode == "heads" and not dims) else None) for m, dims in views]
        per_chunk = max(1, s.chunk_cases // batch)
        for start in range(0, samples, per_chunk):
            indices = range(start, min(samples, start + per_chunk))
            for v, (_, dims) in enumerate(views):
                n = sum(1 for t in indices if t % len(views) == v)
                if n == 0:
                    continue
                with s.autocast():
                    drawn = samplers[v].draw(n)
                for name, value in _outcomes({k: drawn[k].flatten(0, 1) for k in point}).items():
                    outcome_samples[name].append(value.view(n, batch, *value.shape[1:]))
                if segmentation_sampled:
                    p = drawn["seg_probs"].flip([d + 1 for d in dims]) if dims else drawn["seg_probs"]
                    sum_probs = p.sum(0) if sum_probs is None else sum_probs + p.sum(0)
                    h = entropy(p, 2).sum(0)
                    sum_entropy = h if sum_entropy is None else sum_entropy + h
                    volumes.append(_structure_counts(p, inside))
                    agreement = _sample_dice(p, probabilities.argmax(1), inside).sum(0)
                    sum_dice = agreement if sum_dice is None else sum_dice + agreement
        if probabilities is not None and not segmentation_sampled:
            volumes.append(_structure_counts(probabilities, inside).unsqueeze(0).expand(samples, -1, -1))

    total_entropy = mutual_information = None
    if probabilities is not None:
        mean_probs = sum_probs / samples if segmentation_sampled else probabilities
        total_entropy = entropy(mean_probs, 1)
        mutual_information = (total_entropy - sum_entropy / samples).clamp_min(0) if segmentation_sampled \
            else torch.zeros_like(total_entropy)
    sample_volumes = torch.cat(volumes).float() * vv.view(1, -1, 1) if volumes else None
    stacked = {name: torch.cat(parts) for name, parts in outcome_samples.items()}
    results = []
    for b in range(batch):
        point_b: dict[str, object] = {name: float(value[b]) for name, value in point_outcomes.items() if name != "cdr"}
        if cdr_class is not None:
            point_b["cdr_class"] = int(cdr_class[b])
            point_b["cdr_probabilities"] = point_outcomes["cdr"][b].cpu().numpy()
        results.append(ForwardResult(
            probabilities=None if probabilities is None else probabilities[b].cpu().numpy(),
            entropy=None if total_entropy is None else total_entropy[b].cpu().numpy(),
            mutual_information=None if mutual_information is None else mutual_information[b].cpu().numpy(),
            sample_volumes=None if sample_volumes is None else sample_volumes[:, b].cpu().numpy(),
            outcome_samples={name: value[:, b].cpu().numpy() for name, value in stacked.items()},
            outcome_point=point_b,
            sample_dice=None if sum_dice is None else (sum_dice[b] / samples).cpu().numpy(),
        ))
    return results


def _focus_centre(probabilities: torch.Tensor, content: torch.Tensor) -> np.ndarray | None:
    """Centre (voxel coordinates) of the bounding box of the most probable predicted structure: the connected
    foreground component holding the most foreground probability, counting only voxels with image content.
    None when nothing is found."""
    foreground = (probabilities.argmax(0) > 0) & content
    if not bool(foreground.any()):
        return None
    components, count = ndimage.label(foreground.cpu().numpy())
    mass = ndimage.sum((1.0 - probabilities[0]).cpu().numpy(), components, index=np.arange(1, count + 1))
    box = ndimage.find_objects((components == int(np.argmax(mass)) + 1).astype(np.int32))[0]
    return np.array([(b.start + b.stop) / 2.0 for b in box])


def _window_start(centre: np.ndarray | None, shape: tuple[int, ...], window: tuple[int, ...]) -> tuple[int, ...]:
    """Start of the window centred on ``centre`` (the volume's centre when None), kept inside the volume."""
    centre = np.array(shape, dtype=np.float64) / 2.0 if centre is None else centre
    return tuple(int(np.clip(round(c - t / 2.0), 0, n - t)) for n, t, c in zip(shape, window, centre))


#: Re-centring steps of the focus window before its answer is taken (each one deterministic pass).
FOCUS_STEPS = 3


@torch.no_grad()
def sliding_forward(models: list[JointModel], image: torch.Tensor, clinical: list[ClinicalInput], vv: torch.Tensor,
                    inside: torch.Tensor, window: tuple[int, int, int], samples: int, mode: str, overlap: float,
                    sigma_scale: float, pad_value: float, s: ForwardSettings) -> ForwardResult:
    """One case larger than ``window`` along some axis (image (1, C, X, Y, Z), ``inside`` (1, X, Y, Z));
    see the module docstring."""
    shape = tuple(image.shape[2:])
    content = (image[0] != pad_value).any(0)  # voxels with image data: no structure is placed in empty space
    centre = None
    segments = models[0].decoder is not None
    if segments:
        def predictor(windows: torch.Tensor) -> torch.Tensor:
            n = windows.shape[0]
            return deterministic_probabilities(models, windows, [c.repeat(n) for c in clinical], vv.repeat(n), s)

        located = sliding_window_inference(
            image, roi_size=window, sw_batch_size=max(1, s.chunk_cases // (len(models) * (1 + len(s.mirrors)))),
            predictor=predictor, overlap=overlap, mode="gaussian", sigma_scale=sigma_scale)[0].float()
        centre = _focus_centre(located, content)
        del located

    def crop_at(start: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(a, a + t) for a, t in zip(start, window))

    start = _window_start(centre, shape, window)
    for _ in range(FOCUS_STEPS if segments else 0):
        crop = crop_at(start)
        probe = window_forward(models, image_in_layout(image[(Ellipsis, *crop)], s.channels_last), clinical, vv,
                               inside[(Ellipsis, *crop)], 1, "heads", s)[0]
        local = _focus_centre(torch.from_numpy(probe.probabilities), content[crop])
        if local is None:
            break
        moved = _window_start(local + np.array(start), shape, window)
        if moved == start:
            break
        start = moved
    crop = crop_at(start)
    focus = window_forward(models, image_in_layout(image[(Ellipsis, *crop)], s.channels_last), clinical, vv,
                           inside[(Ellipsis, *crop)], samples, mode, s)[0]
    focus.path, focus.focus_start = "sliding_window", start
    if focus.probabilities is not None:
        probabilities = np.zeros((focus.probabilities.shape[0], *shape), np.float32)
        probabilities[0] = 1.0  # background outside the focus window
        probabilities[(slice(None), *crop)] = focus.probabilities
        entropy, information = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        entropy[crop], information[crop] = focus.entropy, focus.mutual_information
        focus.probabilities, focus.entropy, focus.mutual_information = probabilities, entropy, information
    return focus
