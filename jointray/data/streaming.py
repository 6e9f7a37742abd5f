"""Training and validation datasets streamed from prepared shards.

The split is by subject and deterministic: a manifest's own ``fold`` column wins; other subjects
are assigned to ``n_folds`` folds by a seeded permutation of their sorted IDs, so the same seed
always gives the same folds whatever the order of the shards. Subjects whose ``split`` is "test"
are held out of both. The datasets stream the shards' rows unchanged, in shard order;
augmentation happens where each batch's seed is known (:mod:`jointray.data.augment`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray.data

from jointray.config import TrainConfig
from jointray.data.shard_reads import read_task, shard_rows
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


def split_subjects(shards: str | Path, n_folds: int, fold: int | str, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) subject IDs of the prepared shards in ``shards``; fold ``"all"``: every subject in both."""
    table = pq.read_table(Path(shards) / SHARDS_DIR, columns=["subject_id", "split", "fold"])
    rows = table.to_pylist()
    bad = sorted({r["fold"] for r in rows if r["fold"] >= n_folds})
    if bad:
        raise ValueError(f"manifest folds {bad} are out of range for train.n_folds={n_folds}")
    pool = [r for r in rows if r["split"] != "test"]
    folds = assign_folds([r["subject_id"] for r in pool], n_folds, seed,
                         {r["subject_id"]: r["fold"] for r in pool if r["fold"] >= 0})
    if fold == "all":
        return sorted(folds), sorted(folds)
    train = sorted(s for s, f in folds.items() if f != fold)
    val = sorted(s for s, f in folds.items() if f == fold)
    return train, val


def subjects_dataset(prepared: str | Path, subject_ids: list[str]) -> ray.data.Dataset:
    """A Ray Dataset of the given subjects' shard rows, one read task per shard file.

    Not ``ray.data.read_parquet``: its file-listing task always asks for a whole CPU, which a
    cluster of small nodes running fractional train workers never has free (the run hangs); these
    tasks ask for :data:`DATA_TASK_CPUS`.
    """
    files = sorted(str(f) for f in (Path(prepared) / SHARDS_DIR).glob("*.parquet"))
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        read_task, fn_kwargs={"keep": subject_ids}, batch_format="pyarrow", batch_size=1, num_cpus=DATA_TASK_CPUS)


def train_val_datasets(prepared: str | Path, cfg: TrainConfig) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Ray Datasets over the shards of ``prepared``: (training fold(s), validation fold)."""
    train_ids, val_ids = split_subjects(prepared, cfg.n_folds, cfg.fold, cfg.seed)
    return subjects_dataset(prepared, train_ids), subjects_dataset(prepared, val_ids)


def read_subjects(prepared: str | Path, subject_ids: list[str]) -> dict[str, np.ndarray]:
    """The shard rows of ``subject_ids`` as NumPy columns (the ``iter_batches(batch_format="numpy")`` form),
    read in this process: for work on a handful of cases (export calibration, fine-tuning) without a Ray job."""
    keep = sorted(set(subject_ids))
    table = shard_rows(sorted(str(f) for f in (Path(prepared) / SHARDS_DIR).glob("*.parquet")), keep)
    missing = set(keep) - set(table.column("subject_id").to_pylist())
    if missing:
        raise ValueError(f"{prepared}: no prepared rows for subjects {sorted(missing)[:5]}")
    # Ray's tensor extension columns convert to N-d arrays (ray.data, imported above, registers the type).
    return {name: table.column(name).combine_chunks().to_numpy(zero_copy_only=False) for name in table.column_names}
