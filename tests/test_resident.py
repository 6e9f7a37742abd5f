"""A worker's training shard held in memory: every row once an epoch, in an order set by the seed and the rows
alone, and a size estimate that matches what the worker holds."""

import numpy as np
import pytest

from jointray.data.resident import ResidentShard, shard_row_bytes
from jointray.data.streaming import read_subjects, split_subjects


@pytest.fixture(scope="module")
def rows(train_cohort):
    """(prepared folder, NumPy columns of all 20 prepared subjects of the training cohort)."""
    _, overrides = train_cohort
    prepared = next(o.split("=", 1)[1] for o in overrides if o.startswith("data.output="))
    subjects, _ = split_subjects(prepared, 5, "all", 0)
    return prepared, read_subjects(prepared, subjects)


def _as_batches(columns, order, size):
    return [{k: v[order[i:i + size]] for k, v in columns.items()} for i in range(0, len(order), size)]


def test_a_resident_shard_deals_every_row_once_an_epoch_in_an_order_of_its_seed_and_rows_alone(rows):
    _, columns = rows
    n = len(columns["subject_id"])
    # The same rows arriving in two orders and batchings (a restarted worker streams its shard again).
    first = ResidentShard.gather(_as_batches(columns, np.arange(n), 4))
    second = ResidentShard.gather(_as_batches(columns, np.random.default_rng(3).permutation(n), 7))
    epoch = list(first.batches(6, seed=11))
    assert [len(b["subject_id"]) for b in epoch] == [6, 6, 6, 2]
    dealt = np.concatenate([b["subject_id"] for b in epoch])
    assert sorted(dealt) == sorted(columns["subject_id"])  # every row, once
    for a, b in zip(epoch, second.batches(6, seed=11), strict=True):
        assert set(a) == set(columns)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    # Each row's columns stay together: a subject's image is that subject's.
    index = {s: i for i, s in enumerate(columns["subject_id"])}
    for batch in epoch:
        for j, subject in enumerate(batch["subject_id"]):
            np.testing.assert_array_equal(batch["image"][j], columns["image"][index[subject]])
            np.testing.assert_array_equal(batch["label"][j], columns["label"][index[subject]])
    other = np.concatenate([b["subject_id"] for b in first.batches(6, seed=12)])
    assert sorted(other) == sorted(dealt) and list(other) != list(dealt)  # another epoch, another order


def test_an_empty_shard_is_refused():
    with pytest.raises(ValueError, match="empty"):
        ResidentShard.gather([])


def test_the_size_estimate_is_what_a_worker_holds_in_memory(rows):
    # The estimate decides whether a worker keeps its shard: it must be the decoded size, within a few per cent
    # of the NumPy columns' bytes (the Parquet footers' sizes undercount: a run-length-encoded label is tiny).
    prepared, columns = rows
    held = sum(v.nbytes for v in columns.values() if v.dtype != object) / len(columns["subject_id"])
    assert shard_row_bytes(prepared) == pytest.approx(held, rel=0.05)
