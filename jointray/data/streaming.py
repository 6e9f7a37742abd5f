"""Training and validation datasets streamed from prepared shards.

The split is by subject and deterministic: a manifest's own ``fold`` column wins; other subjects
are assigned to ``n_folds`` folds by a seeded permutation of their sorted IDs, so the same seed
always gives the same folds whatever the order of the shards. Subjects whose ``split`` is "test"
are held out of both. Augmentation (MONAI random transforms) runs in ``map_batches`` on the
training dataset only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from ray.data.extensions import ArrowTensorArray

from jointray.config import AugmentConfig, TrainConfig
from jointray.data.shards import SHARDS_DIR

#: CPUs each read/augment task asks for. Less than one, so that the data tasks fit beside fractional
#: train workers: two 1-CPU nodes running a 0.5-CPU worker each have 0.5 CPU free per node, where a
#: 1-CPU task would wait forever and training with it.
DATA_TASK_CPUS = 0.5


def assign_folds(subject_ids: list[str], n_folds: int, seed: int, given: dict[str, int] | None = None) -> dict[str, int]:
    """Subject → fold in ``0..n_folds-1``; ``given`` folds (from a manifest) are kept as they are."""
    given = given or {}
    free = sorted(s for s in set(subject_ids) if s not in given)
    order = np.random.default_rng(seed).permutation(len(free))
    folds = {free[i]: int(rank % n_folds) for rank, i in enumerate(order)}
    return folds | {s: int(f) for s, f in given.items()}


def split_subjects(shards: str | Path, n_folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) subject IDs of the prepared shards in ``shards``."""
    table = pq.read_table(Path(shards) / SHARDS_DIR, columns=["subject_id", "split", "fold"])
    rows = table.to_pylist()
    bad = sorted({r["fold"] for r in rows if r["fold"] >= n_folds})
    if bad:
        raise ValueError(f"manifest folds {bad} are out of range for train.n_folds={n_folds}")
    pool = [r for r in rows if r["split"] != "test"]
    folds = assign_folds([r["subject_id"] for r in pool], n_folds, seed,
                         {r["subject_id"]: r["fold"] for r in pool if r["fold"] >= 0})
    train = sorted(s for s, f in folds.items() if f != fold)
    val = sorted(s for s, f in folds.items() if f == fold)
    return train, val


def _augmentation(cfg: AugmentConfig) -> Compose:
    keys = ["image", "label"]
    rotate = np.deg2rad(cfg.rotate_deg)
    return Compose([
        *[RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in cfg.flip_axes],
        RandAffined(keys, prob=cfg.affine_prob, rotate_range=(rotate,) * 3, scale_range=(cfg.scale,) * 3,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAffined(keys, prob=cfg.shift_prob, translate_range=(cfg.shift_voxels,) * 3, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=cfg.intensity_prob),
        RandShiftIntensityd("image", offsets=0.1, prob=cfg.intensity_prob),
        RandGaussianNoised("image", std=cfg.noise_std, prob=cfg.intensity_prob),
    ])


def augment_batch(batch: pa.Table, cfg_json: str) -> pa.Table:
    """Apply one independent random augmentation per case; image (B, C, X, Y, Z), label (B, X, Y, Z).

    Works on Arrow batches so that the other columns pass through with their types untouched.
    """
    cfg = AugmentConfig.model_validate_json(cfg_json)
    transform = _augmentation(cfg)
    # Fresh entropy per batch: re-seeding identically in every task would repeat the same
    # "random" transform each epoch.
    transform.set_random_state(seed=int(np.random.SeedSequence().generate_state(1)[0]))
    images, labels = [], []
    for image, label in zip(batch["image"].combine_chunks().to_numpy(), batch["label"].combine_chunks().to_numpy()):
        out = transform({"image": torch.from_numpy(np.array(image)), "label": torch.from_numpy(np.array(label))[None]})
        images.append(np.asarray(out["image"], dtype=np.float32))
        labels.append(np.asarray(out["label"])[0].astype(np.uint8))
    for name, values in (("image", images), ("label", labels)):
        batch = batch.set_column(batch.schema.get_field_index(name), name, ArrowTensorArray.from_numpy(np.stack(values)))
    return batch


def _read_subjects(batch: pa.Table, keep: list[str]) -> pa.Table:
    """The rows of the subjects in ``keep`` from the shard files named in ``batch["path"]``."""
    return pa.concat_tables([pq.read_table(path, filters=pc.field("subject_id").isin(keep))
                             for path in batch["path"].to_pylist()])


def subjects_dataset(prepared: str | Path, subject_ids: list[str]) -> ray.data.Dataset:
    """A Ray Dataset of the given subjects' shard rows, one read task per shard file.

    Not ``ray.data.read_parquet``: its file-listing task always asks for a whole CPU, which a
    cluster of small nodes running fractional train workers never has free (the run hangs); these
    tasks ask for :data:`DATA_TASK_CPUS`.
    """
    files = sorted(str(f) for f in (Path(prepared) / SHARDS_DIR).glob("*.parquet"))
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        _read_subjects, fn_kwargs={"keep": subject_ids}, batch_format="pyarrow", batch_size=1, num_cpus=DATA_TASK_CPUS)


def train_val_datasets(prepared: str | Path, cfg: TrainConfig) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Ray Datasets over the shards of ``prepared``: (augmented training fold(s), validation fold)."""
    train_ids, val_ids = split_subjects(prepared, cfg.n_folds, cfg.fold, cfg.seed)
    train, val = subjects_dataset(prepared, train_ids), subjects_dataset(prepared, val_ids)
    if cfg.augment.enabled:
        train = train.map_batches(augment_batch, fn_kwargs={"cfg_json": cfg.augment.model_dump_json()},
                                  batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=DATA_TASK_CPUS)
    return train, val
