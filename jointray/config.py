"""The typed configuration: one pydantic model, loaded from YAML once, overridden from the command line.

The same :class:`Config` object flows CLI → job → trainer → tuner → server; the prepared shards and
(later) every checkpoint carry its ``preprocess`` section, so inference reproduces training exactly.

Overrides use dotted keys with YAML values: ``train.epochs=5``, ``data.root=../data``,
``preprocess.target_shape=[48,64,48]``. Unknown keys and bad values fail with a :class:`ConfigError`
that names the key, the value given and what was expected.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from jointray import builtin_configs
from jointray.data.records import RESERVED_COLUMNS
from jointray.data.spec import PreprocessSpec


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and what is expected."""


class _Section(BaseModel):
    # Typos must fail loudly: a misspelt key silently falling back to a default is a wasted GPU-day.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """The built-in synthetic cohort (see :mod:`jointray.data.synthetic`)."""

    n_subjects: int = Field(64, ge=2)
    seed: int = 0
    shape: tuple[int, int, int] = (40, 48, 40)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.2)


class DataConfig(_Section):
    """Where the cases come from and where the prepared shards go."""

    format: Literal["msd", "manifest", "dicom", "synthetic"] = "msd"
    root: Path = Field(
        Path("data"),
        description="MSD folder, manifest CSV/Parquet file, DICOM folder/zip, or the folder the "
        "synthetic cohort is written to",
    )
    clinical: Path | None = Field(None, description="clinical table (CSV/Parquet) joined by subject_id")
    output: Path = Field(Path("runs/prepared"), description="folder for shards, spec and report")
    label_names: dict[int, str] = Field(
        default_factory=lambda: {0: "background", 1: "anterior", 2: "posterior"},
        description="the declared label set; other values in a label file are an error",
    )
    max_voxels: int = Field(
        64 * 1024**2, gt=0, description="files whose header claims more voxels are refused unread"
    )
    image_columns: list[str] = Field(
        default_factory=lambda: ["image"],
        description="manifest columns holding image paths, one per modality/view (channel order)",
    )
    clinical_columns: dict[str, Literal["numeric", "categorical"]] = Field(
        default_factory=dict,
        description="the model's clinical inputs: manifest or clinical-table column → numeric | categorical. "
        "No other column is an input (a diagnosis column would leak the target, a path column identify the "
        "subject); empty: images only",
    )
    rows_per_shard: int = Field(64, gt=0)
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("label_names")
    @classmethod
    def _background_first(cls, v: dict[int, str]) -> dict[int, str]:
        if 0 not in v:
            raise ValueError("label 0 (background) must be declared")
        return dict(sorted(v.items()))

    @field_validator("clinical_columns")
    @classmethod
    def _inputs_only(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        reserved = sorted(RESERVED_COLUMNS & set(v))
        if reserved:
            raise ValueError(f"no reserved column {sorted(RESERVED_COLUMNS)} (targets and identifiers); "
                             f"{reserved} would hand the model what it predicts or who the subject is")
        images = sorted(set(info.data.get("image_columns", [])) & set(v))
        if images:
            raise ValueError(f"no image column (data.image_columns); {images} hold paths, not clinical values")
        return v


Range = tuple[float, float]


def _ordered(name: str, value: Range) -> Range:
    if value[0] > value[1]:
        raise ValueError(f"{name}: [low, high] with low <= high, not {list(value)}")
    return value


class AugmentConfig(_Section):
    """Training-time augmentation (MONAI random transforms), applied to training data only.

    Every transform has its own probability per case. The defaults are a light set (mirroring, small
    rotations and scaling, intensity jitter); ``configs/msd_nnunet_augment.yaml`` switches on nnU-Net's set
    (Isensee et al., Nature Methods 2021; nnUNetTrainer's training transforms): rotation, scaling,
    Gaussian noise and blur, brightness, contrast, simulated low resolution, gamma (also on the inverted
    image) and mirroring, each with nnU-Net's probability and range. Elastic deformation, off by default
    in nnU-Net v2, is available.
    """

    enabled: bool = True
    flip_axes: list[int] = Field(
        default_factory=lambda: [0],
        description="RAS axes to mirror; 0 = left-right. Mirroring anterior-posterior would swap "
        "the meaning of anterior/posterior labels, so it is off by default",
    )
    flip_prob: float = Field(0.5, ge=0, le=1, description="probability of mirroring, per case and axis")
    affine_prob: float = Field(0.3, ge=0, le=1, description="probability of a rotation + scaling")
    rotate_deg: float | tuple[float, float, float] = Field(
        10.0, description="largest rotation in degrees about each array axis (X, Y, Z): one number for all "
        "three, or one per axis (e.g. less out of plane than in plane)")
    scale: float | Range = Field(
        0.1, description="zoom factor: s draws from [1 - s, 1 + s]; [low, high] draws from that range "
        "(nnU-Net: [0.7, 1.4])")
    elastic_prob: float = Field(0.0, ge=0, le=1, description="probability of an elastic deformation")
    elastic_sigma: Range = Field((9.0, 13.0), description="smoothing of the displacement field, voxels")
    elastic_magnitude: Range = Field((0.0, 900.0), description="scale of the smoothed displacement field "
                                     "(batchgenerators' alpha)")
    shift_prob: float = Field(
        0.0, ge=0, le=1, description="probability of a random shift of the case within the training window: "
        "teaches the model that a structure can sit anywhere in it, which sliding-window inference over "
        "inputs larger than the window relies on"
    )
    shift_voxels: int = Field(0, ge=0, description="largest shift per axis, in whole voxels")
    noise_prob: float = Field(0.3, ge=0, le=1, description="probability of additive Gaussian noise")
    noise_std: float = Field(0.05, ge=0, description="largest noise SD (each case draws one from [0, noise_std])")
    blur_prob: float = Field(0.0, ge=0, le=1, description="probability of a Gaussian blur")
    blur_sigma: Range = Field((0.5, 1.0), description="blur SD in voxels, drawn per axis")
    brightness_prob: float = Field(0.3, ge=0, le=1, description="probability of multiplying the intensities")
    brightness: float = Field(0.1, ge=0, lt=1, description="the factor draws from [1 - b, 1 + b]")
    offset_prob: float = Field(0.3, ge=0, le=1, description="probability of adding an intensity offset")
    offset: float = Field(0.1, ge=0, description="the offset draws from [-o, o] (intensities are z-scored)")
    contrast_prob: float = Field(0.0, ge=0, le=1, description="probability of a contrast change about the mean, "
                                 "clipped to the case's intensity range")
    contrast: float = Field(0.25, ge=0, lt=1, description="the factor draws from [1 - c, 1 + c]")
    lowres_prob: float = Field(0.0, ge=0, le=1, description="probability of simulated low resolution: "
                               "downsampled (nearest) and upsampled back (trilinear)")
    lowres_zoom: Range = Field((0.5, 1.0), description="the downsampling factor's range")
    gamma_prob: float = Field(0.0, ge=0, le=1, description="probability of a gamma transform (mean and SD kept)")
    gamma_inverted_prob: float = Field(0.0, ge=0, le=1, description="probability of a gamma transform of the "
                                       "inverted image")
    gamma: Range = Field((0.7, 1.5), description="the gamma draws from this range")

    @field_validator("rotate_deg")
    @classmethod
    def _rotation(cls, v: float | tuple[float, float, float]) -> float | tuple[float, float, float]:
        if min(v if isinstance(v, tuple) else (v,)) < 0:
            raise ValueError(f"rotations >= 0 degrees, not {v}")
        return v

    @field_validator("scale")
    @classmethod
    def _zoom(cls, v: float | Range) -> float | Range:
        low = 1 - v if isinstance(v, float | int) else _ordered("scale", v)[0]
        if low <= 0:
            raise ValueError(f"zoom factors > 0: scale {v} allows {low:g}")
        return v

    @field_validator("elastic_sigma", "elastic_magnitude", "blur_sigma", "lowres_zoom", "gamma")
    @classmethod
    def _range(cls, v: Range, info: ValidationInfo) -> Range:
        if v[0] < 0 or (info.field_name in ("lowres_zoom", "gamma") and v[0] <= 0):
            raise ValueError(f"{info.field_name}: positive bounds, not {list(v)}")
        if info.field_name == "lowres_zoom" and v[1] > 1:
            raise ValueError(f"lowres_zoom: factors up to 1 (a downsampling), not {list(v)}")
        return _ordered(info.field_name, v)

    def zoom_range(self) -> Range:
        """The zoom factor's [low, high]."""
        return (1 - self.scale, 1 + self.scale) if isinstance(self.scale, float | int) else tuple(self.scale)


class ModelConfig(_Section):
    """The joint model (see :mod:`jointray.models`)."""

    variant: Literal["v2", "dv", "dv1", "seg_only", "outcome_only"] = "v2"
    channels: tuple[int, ...] = Field(
        (16, 32, 64, 128), description="encoder channels per level; each level after the first halves the grid"
    )
    num_classes: int = Field(3, ge=2, description="segmentation classes, background included")
    full_res_channels: int = Field(4, ge=1, description="decoder channels at full resolution")
    full_res_unit: bool = Field(
        False, description="a residual unit at full resolution before a 1x1x1 classifier (else one 3x3x3 classifier)"
    )
    activation: Literal["prelu", "leakyrelu"] = Field(
        "prelu", description="of the encoder's and decoder's convolution blocks: prelu (MONAI's default) or "
        "leakyrelu (slope 0.01, nnU-Net's)")
    dropout: float = Field(0.1, ge=0, lt=1, description="spatial (channel) dropout in the encoder: MC samples")
    head_dropout: float = Field(0.2, ge=0, lt=1, description="dropout in the outcome heads: MC samples")
    clinical_dim: int = Field(32, ge=4, description="width of the clinical embedding and tokens")
    heads: list[Literal["mmse", "cdr", "risk"]] = Field(default_factory=lambda: ["mmse", "cdr", "risk"])
    cdr_classes: int = Field(4, ge=2, description="ordinal CDR classes (stages 0, 0.5, 1, 2+)")
    use_image: bool = Field(True, description="outcome_only: false predicts from the clinical record alone")
    # Component switches: null keeps the variant's own choice (jointray.models.joint.VARIANTS); true or false
    # overrides it, so that an ablation can switch off one part of v2 at a time.
    squeeze_excite: bool | None = Field(None, description="squeeze-and-excitation in the encoder; null: the variant's")
    attention_gates: bool | None = Field(None, description="attention-gated decoder skips; null: the variant's")
    clinical_fusion: bool | None = Field(
        None, description="FiLM + cross-attention of the clinical record on the bottleneck; null: the variant's"
    )
    cross_task: bool | None = Field(
        None, description="the segmentation <-> outcome paths (gates from h, predicted structure volumes into h); null: the "
        "variant's. Needs a variant with both segmentation and outcomes"
    )

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 3 or min(v) < 4:
            raise ValueError("need at least 3 levels of >= 4 channels (deep supervision uses 1/2 and 1/4)")
        return v


class BalancerConfig(_Section):
    """Multi-task loss balancing (see :mod:`jointray.train.balancing`)."""

    kind: Literal["fixed", "inverse_rate", "uncertainty", "dwa", "gradnorm"] = "inverse_rate"
    weights: dict[Literal["seg", "mmse", "cdr", "risk"], float] = Field(
        default_factory=dict, description="fixed: weight per task, used as given; a task not listed gets 1.0"
    )
    temperature: float | None = Field(
        None,
        gt=0,
        description="inverse_rate and dwa: softmax temperature; null takes the method's own default "
        "(1.0 for inverse_rate, 2.0 for dwa as in Liu et al. 2019)",
    )
    warmup_epochs: int = Field(
        5, ge=1, description="inverse_rate: epochs of uniform weights; their mean loss is the rate's baseline"
    )
    window: int = Field(5, ge=1, description="inverse_rate: recent epochs averaged for the current loss")
    alpha: float = Field(1.5, ge=0, description="gradnorm: strength of the pull towards equal training rates")
    lr: float = Field(0.025, gt=0, description="gradnorm: Adam learning rate of the task weights")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        negative = sorted(task for task, w in v.items() if w < 0)
        if negative:
            raise ValueError(f"task weights >= 0 (negative: {negative})")
        return v


class PhaseConfig(_Section):
    """One curriculum phase, in force while training progress (epoch / epochs) is below ``until``."""

    until: float = Field(gt=0, le=1, description="progress bound of the phase, exclusive")
    seg: float = Field(ge=0, description="scale of the segmentation loss")
    outcome: float = Field(ge=0, description="scale of every outcome loss (mmse, cdr, risk)")
    cross: float = Field(ge=0, le=1, description="strength of the outcome → segmentation gates, read by the model")
    lr_scale: float = Field(gt=0, description="the phase's peak learning rate as a multiple of train.lr")

    @model_validator(mode="after")
    def _trains_something(self) -> PhaseConfig:
        if self.seg == 0 and self.outcome == 0:
            raise ValueError("seg or outcome > 0: with both 0 the phase would train nothing")
        return self


def _default_phases() -> list[PhaseConfig]:
    # DESIGN.md: segmentation first, outcomes and cross-task interaction phased in as it stabilises.
    return [
        PhaseConfig(until=0.3, seg=0.8, outcome=0.2, cross=0.0, lr_scale=1.0),
        PhaseConfig(until=0.6, seg=0.6, outcome=0.4, cross=0.3, lr_scale=0.5),
        PhaseConfig(until=1.0, seg=0.5, outcome=0.5, cross=0.5, lr_scale=0.2),
    ]


class CurriculumConfig(_Section):
    """Training phases by progress (see :mod:`jointray.train.curriculum`).

    Enabled, each phase's peak learning rate is ``lr_scale × train.lr``; disabled, training runs as one
    phase with every task scale 1.0, cross 1.0 and ``train.lr``.

    Off by default: with the default phases, v2 ended with a worse Dice and a worse MMSE error than with
    no curriculum, on the synthetic cohort (the ablation) and on real MRI (the joint-learning benchmark;
    figures in benchmarks/README.md). Late in training the phases halve the segmentation loss's share of
    the shared encoder's gradient and step the learning rate down, and a short budget never recovers.
    """

    enabled: bool = False
    phases: list[PhaseConfig] = Field(default_factory=_default_phases)

    @field_validator("phases")
    @classmethod
    def _cover_progress(cls, v: list[PhaseConfig]) -> list[PhaseConfig]:
        bounds = [phase.until for phase in v]
        if not bounds:
            raise ValueError("at least one phase")
        if any(later <= earlier for earlier, later in zip(bounds, bounds[1:])):
            raise ValueError(f"strictly increasing phase 'until' bounds, not {bounds}")
        if bounds[-1] != 1.0:
            raise ValueError(f"the last phase to end at until=1.0, not {bounds[-1]}")
        return v


class RefitConfig(_Section):
    """Refitting the outcome heads on the finished network's features (see :mod:`jointray.train.refit`)."""

    enabled: bool = Field(
        True, description="after training, refit the outcome heads of the best checkpoint on its own features"
    )
    epochs: int = Field(200, ge=1, description="passes over the training cases' cached features")
    batch_size: int = Field(32, ge=2, description="cases per step (the Cox loss needs at least two)")
    lr: float = Field(
        1e-2, gt=0, description="peak AdamW learning rate of the refit, cosine-decayed to 0 (train.weight_decay "
        "applies): a rate for small heads on fixed inputs, which the whole network could not take"
    )


class LossConfig(_Section):
    """Per-task objectives (see :mod:`jointray.losses`)."""

    deep_supervision: tuple[float, float, float] = Field(
        (0.6, 0.3, 0.1), description="weights of the full, 1/2 and 1/4 resolution segmentation losses"
    )
    huber_delta: float = Field(2.0, gt=0, description="MMSE points where the Huber loss turns linear")
    cox_ties: Literal["efron", "breslow"] = "efron"
    correlation_weight: float = Field(0.0, ge=0, description="weight of the task-correlation penalty")


class TrainConfig(_Section):
    """Training on Ray Train (see :mod:`jointray.train.trainer`)."""

    name: str = Field("jointray", pattern=r"^[A-Za-z0-9_.-]+$", description="run folder name under storage_path")
    storage_path: str = Field("runs", description="local folder or cloud URI (s3://, gs://) for runs and checkpoints")
    prepared: Path | None = Field(None, description="prepared shards folder; null uses data.output")
    resume: bool = Field(False, description="continue <storage_path>/<name> from its last checkpoint instead of starting over")
    seed: int = Field(0, ge=0)
    n_folds: int = Field(5, ge=2)
    fold: int | Literal["all"] = Field(
        0, description="the validation fold of a single run; all: nnU-Net's 'all' fold, every case trains and the "
        "last checkpoint is kept (validation then scores training cases: a monitor, never a choice)")
    folds: list[int] | None = Field(
        None, description="cross-validation: train these folds as separate runs, <name>/fold_<k>, and make their "
        "ensemble <name>/ensemble.json (`jointray train --all-folds`: all of them); null: one run of `fold`")
    concurrent_folds: int | None = Field(
        None, ge=1, description="folds trained at once; null: as many as the cluster's CPUs (GPUs) fit")
    batch_size: int = Field(4, ge=1, description="per worker")
    epochs: int = Field(50, ge=1, description="passes over the training cases; ignored when max_minutes is set")
    max_minutes: float | None = Field(
        None, gt=0, description="wall-clock budget of the training loop: when set, it alone ends the run (after "
        "a final validation and checkpoint) and the learning-rate schedule and curriculum span it")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0, description="linear learning-rate warm-up before the cosine decay")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    ema: float | None = Field(
        None, gt=0, lt=1, description="decay of an exponential moving average of the weights, updated every "
        "step (e.g. 0.999); the average is what validation scores, checkpoints export and inference loads")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp16 + GradScaler on older GPUs, "
        "fp32 on CPU, where bf16 is opt-in (it pays only on CPUs with native bf16: benchmarks/README.md)"
    )
    channels_last: bool = Field(
        True, description="channels-last memory layout for the 3D convolutions (its speed: benchmarks/README.md)"
    )
    workers: int = Field(1, ge=1)
    placement: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="PACK: workers on as few nodes as possible (fast DDP); SPREAD: one per node where possible"
    )
    use_gpu: bool | None = Field(None, description="null: use GPUs when the cluster has them")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="null: 1, or less when that would leave no CPU for the Ray Data pipeline"
    )
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per worker; null: from its CPUs")
    resident_mb: float = Field(
        2048, ge=0, description="a worker whose share of the training cases fits in this many MiB streams it from "
        "Ray Data once and keeps it in memory, re-shuffled every epoch (jointray/data/resident.py); a larger share "
        "streams every epoch. 0: always stream")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from (restart from the last checkpoint)")
    keep_checkpoints: int = Field(2, ge=1, description="best-k checkpoints kept by validation score")
    patience: int | None = Field(10, ge=1, description="epochs without a better validation score before stopping")
    score: dict[str, float] = Field(
        default_factory=lambda: {"val/dice": 1.0, "val/mmse_mae": -0.02, "val/cdr_qwk": 0.2, "val/c_index": 0.2},
        description="combined validation score = Σ weight · metric over the metrics a run has (higher is better)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Ray Train's own log lines on the console; the epoch lines are printed at any level"
    )
    mlflow: bool = Field(False, description="log parameters and per-epoch metrics to MLflow as well as TensorBoard")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null: a local SQLite file, <storage_path>/<name>/mlflow.db"
    )
    fault_at_step: int | None = Field(
        None, ge=1, description="testing fault tolerance: the rank-0 worker process exits at this global step, once"
    )
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    balancer: BalancerConfig = BalancerConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    refit: RefitConfig = RefitConfig()

    @property
    def planned_epochs(self) -> int | None:
        """The epochs the run will train, or None when a time budget ends it (the count is not known ahead)."""
        return self.epochs if self.max_minutes is None else None

    @model_validator(mode="after")
    def _fold_in_range(self) -> TrainConfig:
        if self.fold == "all":
            if self.patience is not None:
                raise ValueError("fold=all validates on training cases, which must not stop the run: set patience=null")
        elif not 0 <= self.fold < self.n_folds:
            raise ValueError(f"fold={self.fold} must be 'all' or from 0 to n_folds-1={self.n_folds - 1}")
        if self.folds is not None and (not self.folds or len(set(self.folds)) != len(self.folds)
                                       or not all(0 <= k < self.n_folds for k in self.folds)):
            raise ValueError(f"folds={self.folds} must list distinct folds from 0 to n_folds-1={self.n_folds - 1}")
        return self


class InferenceConfig(_Section):
    """How a trained model predicts (see :mod:`jointray.inference`): ``evaluate``, ``predict`` and the server."""

    mirror: bool = Field(True, description="test-time mirroring along the axes training mirrored")
    mc_samples: int = Field(
        20, ge=1, description="Monte Carlo dropout samples per case by default; 1 = one deterministic pass"
    )
    mc_mode: Literal["full", "decoder", "heads"] = Field(
        "decoder", description="what Monte Carlo dropout re-samples: the whole network, everything after the "
        "image encoder, or the outcome heads only"
    )
    max_mc_samples: int = Field(100, ge=1, description="the most samples a request may ask for")
    chunk_cases: int = Field(
        8, ge=1, description="at most this many (sample x case) items per forward call: bounds memory"
    )
    overlap: float = Field(0.5, ge=0, lt=1, description="sliding window: overlap of neighbouring windows")
    sigma_scale: float = Field(
        0.125, gt=0, description="sliding window: Gaussian weight sigma as a fraction of the window size"
    )
    review_volume_cv: float = Field(
        0.1, gt=0, description="needs_review when a structure's MC volume SD exceeds this fraction of its mean "
        "(needs segmentation samples: mode full or decoder, mc_samples >= 2)"
    )
    review_entropy: float = Field(
        0.75, gt=0, description="needs_review when the mean predictive entropy (nats) inside a structure exceeds "
        "this (ln 3 = 1.10 is a uniform guess between three classes)"
    )
    interval: float = Field(0.9, gt=0, lt=1, description="central probability of the reported intervals")
    runtime: Literal["auto", "torch", "onnxruntime", "torchscript"] = Field(
        "auto", description="what runs the model: auto, as it was saved (a checkpoint on torch, an export by its "
        "format: `jointray export`); otherwise the model must be of this runtime, or loading it fails"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; "
        "never inherited from training"
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> InferenceConfig:
        if self.mc_samples > self.max_mc_samples:
            raise ValueError(f"mc_samples={self.mc_samples} must be <= max_mc_samples={self.max_mc_samples}")
        return self


class ServeConfig(_Section):
    """The Ray Serve application (see :mod:`jointray.serve`)."""

    host: str = Field("127.0.0.1", description="address the HTTP proxy binds to; 0.0.0.0 exposes it")
    port: int = Field(8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Serve runs HTTP proxies: every node with a replica (Serve's default), or the "
                                 "head only (one entry point; also where several nodes share one address)")
    replicas: int = Field(1, ge=1, description="model replicas when autoscaling is off")
    autoscale: bool = Field(False, description="autoscale the model replicas between min_replicas and max_replicas")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0, description="autoscaling target per replica")
    max_batch_size: int = Field(8, ge=1, description="cases per batched forward pass")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(16, ge=1, description="per model replica; at least max_batch_size")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per model replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions share one)")
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress (decode, validate, resample)")
    ingress_cpus: float = Field(0.5, gt=0, description="CPUs reserved per ingress replica")
    ingress_max_ongoing_requests: int = Field(
        64, ge=1, description="concurrent requests per ingress replica (decoding overlaps the model's batches)"
    )
    max_upload_mb: float = Field(256.0, gt=0, description="largest upload accepted (and largest unzipped series)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="replica logs of `jointray serve` and the demo (INFO adds one access line per request)"
    )
    api_key_env: str | None = Field(
        None, description="environment variable holding the API key; null: no key is asked for"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} must be >= max_batch_size="
                             f"{self.max_batch_size}, or batches never fill")
        if self.autoscale and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} must be <= max_replicas={self.max_replicas}")
        return self


class SearchDimension(_Section):
    """One searched config key: exactly one of the distributions below.

    ``uniform``/``loguniform``: ``[low, high]`` floats; ``integer``: ``[low, high]``, both included;
    ``choice``: the values to choose from (any YAML value, lists included); ``grid``: every value, in
    every trial combination (the ``grid`` searcher only).
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDimension:
        given = [k for k in SearchDimension.model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one distribution of {list(SearchDimension.model_fields)}, not {given or 'none'}")
        bounds = self.uniform or self.loguniform or self.integer
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"[low, high] with low < high, not {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform bounds > 0, not {list(self.loguniform)}")
        if (self.choice is not None and not self.choice) or (self.grid is not None and not self.grid):
            raise ValueError("at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SearchDimension.model_fields if getattr(self, k) is not None)

    def examples(self) -> list[Any]:
        """Values a trial can receive, for checking the key before any trial runs: the bounds, or every value."""
        if self.uniform or self.loguniform:
            low, high = self.uniform or self.loguniform
            return [low, high]
        if self.integer:
            return list(self.integer)
        return list(self.choice if self.choice is not None else self.grid)


class TuneConfig(_Section):
    """A hyperparameter search over this config with Ray Tune (see :mod:`jointray.tune`)."""

    name: str = Field("tune", pattern=r"^[A-Za-z0-9_.-]+$", description="search folder name under storage_path")
    storage_path: str = Field("runs", description="local folder or storage URI (s3://, gs://) for the search "
                              "(trials, study, results)")
    searcher: Literal["optuna", "grid"] = Field(
        "optuna", description="optuna: TPE (multi-objective TPE with several objectives); grid: every combination "
        "of the grid dimensions, num_samples times"
    )
    num_samples: int = Field(8, ge=1, description="optuna: trials; grid: repeats of the whole grid")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once; null: as many as the CPUs (or GPUs) hold, at train.workers each"
    )
    objectives: dict[str, Literal["max", "min"]] = Field(
        default_factory=lambda: {"val/score": "max"},
        description="metric -> max | min; one objective: TPE, with ASHA if scheduler=asha; several: a Pareto front",
    )
    scheduler: Literal["asha", "none"] = Field(
        "none", description="asha: stop poor trials early (one objective only: a stopped trial would enter a "
        "Pareto front with partly trained values)"
    )
    grace_epochs: int = Field(2, ge=1, description="asha: epochs every trial runs before it can be stopped")
    reduction_factor: int = Field(3, ge=2, description="asha: keep the best 1/reduction_factor at each rung")
    seed: int = Field(0, ge=0, description="the sampler's seed")
    trial_cpus: float | None = Field(
        None, gt=0, description="CPUs per trial for its trainer's workers and data; null: the cluster's CPUs "
        "shared equally by the concurrent trials"
    )
    driver_cpus: float = Field(0.01, gt=0, description="CPUs held by each trial's driver (it only waits on Ray Train)")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="optuna: configurations tried first (e.g. the hand-set one), keyed "
        "like space"
    )
    space: dict[str, SearchDimension] = Field(
        default_factory=dict, description="config key (dotted, as an override) -> distribution"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if self.scheduler == "asha" and len(self.objectives) != 1:
            raise ValueError(f"scheduler=asha takes one objective, not {list(self.objectives)}: set scheduler: none "
                             f"for a multi-objective search")
        grid = sorted(k for k, d in self.space.items() if d.kind == "grid")
        if self.searcher == "optuna" and grid:
            raise ValueError(f"grid dimensions {grid} need searcher: grid (Optuna samples; use choice)")
        if self.searcher == "grid" and len(grid) != len(self.space):
            raise ValueError(f"searcher: grid takes grid dimensions only, not {sorted(set(self.space) - set(grid))}")
        for point in self.points_to_evaluate:
            if set(point) != set(self.space):
                raise ValueError(f"each of points_to_evaluate gives every space key: {sorted(self.space)}; "
                                 f"{sorted(point)} differs")
        return self


class RayConfig(_Section):
    address: str | None = Field(None, description="None starts a local instance unless RAY_ADDRESS is set")
    num_cpus: int | None = Field(None, ge=1, description="for a local instance only")


class Config(_Section):
    """The whole configuration of a jointray run."""

    data: DataConfig = DataConfig()
    preprocess: PreprocessSpec = PreprocessSpec()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    serve: ServeConfig = ServeConfig()
    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _grid_fits_the_encoder(self) -> Config:
        factor = 2 ** len(self.model.channels)
        if any(n % factor for n in self.preprocess.target_shape):
            raise ValueError(
                f"preprocess.target_shape {tuple(self.preprocess.target_shape)} must be divisible by {factor} "
                f"(2 ** len(model.channels)={len(self.model.channels)}): the encoder halves the grid at every level"
            )
        return self


def check_search_space(cfg: Config) -> None:
    """Every key of ``tune.space`` (and of ``tune.points_to_evaluate``) must be a config key that takes each
    value the search can give it, so that a misspelt key fails before any trial starts, naming the key.

    Raises:
        ConfigError: the first dimension and value the config refuses, with the config's own message.
    """
    base = cfg.model_dump(mode="json", exclude={"tune"})
    trials = [(key, value) for key, dim in cfg.tune.space.items() for value in dim.examples()]
    trials += [(key, value) for point in cfg.tune.points_to_evaluate for key, value in point.items()]
    for key, value in trials:
        try:
            config_from_tree(copy.deepcopy(base), [override_text(key, value)])
        except ConfigError as exc:
            raise ConfigError(f"tune.space.{key} = {value!r} makes an invalid trial: {exc}") from None


def override_text(key: str, value: Any) -> str:
    """``key=value`` for :func:`config_from_tree`: the value as JSON, which YAML reads back unchanged."""
    return f"{key}={json.dumps(value)}"


def variant_check(cfg: Config) -> None:
    """The model's component switches must suit its variant (``model.cross_task`` needs both branches)."""
    from jointray.models.joint import variant_spec  # the model imports this module

    try:
        variant_spec(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _defaults_at(path: list[str]) -> Any:
    """The default value at a dotted path as plain data: what an override indexes into when the YAML left
    that list out (``train.curriculum.phases.1.seg=0.5`` on a config without phases)."""
    node: Any = Config().model_dump(mode="json")
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (dotted; a number indexes a list, e.g. ``train.curriculum.phases.1.seg``) in ``tree``."""
    node: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])} is a list of {len(node)}; "
                                  f"index it with 0..{len(node) - 1}, not {part!r}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])!r} is a value, not a section")
        if depth == len(parts) - 1:
            node[part] = value
        elif isinstance(node, dict) and part not in node:
            node[part] = {}  # a section the YAML left out
            if parts[depth + 1].isdigit():  # ... or a list, which keeps its defaults so one element can change
                try:
                    node[part] = _defaults_at(parts[:depth + 1])
                except (KeyError, IndexError, ValueError):
                    pass  # an unknown key: left for validation to name
            node = node[part]
        else:
            node = node[part]


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip(), value


def _describe(errors: ValidationError) -> str:
    lines = []
    for err in errors.errors():
        key = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not key:  # a rule across sections: its message names the keys itself
            lines.append(message)
        elif err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {err['input']!r})")
        else:
            lines.append(f"{key}: got {err['input']!r}; expected {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key; any other value (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(path: str | Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's sections, with its ``extends`` (a file beside it, or a built-in config by name)
    read first and this file merged on top."""
    found = builtin_configs.find(path)
    if found is None:
        raise ConfigError(f"config {path} does not exist: not a file, nor a built-in config "
                          f"(built-in: {', '.join(builtin_configs.names())})")
    if found.resolve() in chain:
        raise ConfigError(f"config {found} extends itself: {' -> '.join(str(p) for p in (*chain, found.resolve()))}")
    try:
        tree = yaml.safe_load(found.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {found} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {found}: expected a mapping of sections at the top level")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    beside = found.parent / str(parent)
    base = _read_tree(beside if beside.is_file() else parent, (*chain, found.resolve()))
    return _merged(base, tree)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file, or a built-in config by name (``synthetic``, ``msd_hippocampus``: see
    :mod:`jointray.builtin_configs`), or the defaults when ``path`` is None, and apply dotted overrides.

    A file at ``path`` wins over a built-in of the same name. A file may start from another with
    ``extends: <file or built-in name>``: its sections are merged over that one's (``tune_synthetic.yaml``
    adds a search to ``synthetic.yaml``). Relative paths in the ``data`` section stay relative to the
    working directory, the way a user types them on the command line.
    """
    tree = _read_tree(path) if path is not None else {}
    return config_from_tree(tree, overrides)


def config_from_tree(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A :class:`Config` from a mapping of sections (e.g. a checkpoint's) with dotted overrides applied."""
    for text in overrides:
        _set_dotted(tree, *_parse_override(text))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    variant_check(cfg)
    if cfg.tune.space:
        check_search_space(cfg)
    return cfg
