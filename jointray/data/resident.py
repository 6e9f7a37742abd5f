"""A training worker's shard held in its memory: streamed from Ray Data once, re-shuffled every epoch.

Streaming the shard anew each epoch runs Ray Data's read tasks, the split between workers and a local
shuffle on the cores the training step computes on, a share of every epoch on a small CPU machine
(benchmarks/README.md). A shard that fits in memory is therefore streamed once, kept as NumPy columns,
and every epoch deals it out in a permutation seeded by (seed, epoch, rank), a full shuffle where the
streaming one mixes only a buffer's worth of rows. The rows are kept sorted by subject, so the batches
depend on which rows the worker holds, never on the order they arrived in: a worker restarted from a
checkpoint streams its shard again and deals the very batches the uninterrupted run dealt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jointray.data.shards import SHARDS_DIR


def shard_row_bytes(prepared: str | Path) -> int:
    """The size of a row of the prepared shards in ``prepared`` once decoded (its first row; the shards of one
    preparation share their shapes): what a worker holding it keeps in memory. Not the Parquet footers' sizes,
    which count the encoded pages (a run-length-encoded label takes a hundredth of its array)."""
    path = min((Path(prepared) / SHARDS_DIR).glob("*.parquet"))
    return next(pq.ParquetFile(path).iter_batches(batch_size=1)).nbytes


class ResidentShard:
    """The rows of ``columns`` (NumPy columns of equal length, with a ``subject_id`` column), sorted by subject."""

    def __init__(self, columns: dict[str, np.ndarray]):
        order = np.argsort(columns["subject_id"], kind="stable")
        self.columns = {name: np.ascontiguousarray(column[order]) for name, column in columns.items()}
        self.rows = len(order)

    @classmethod
    def gather(cls, batches: Iterable[dict[str, np.ndarray]]) -> ResidentShard:
        """Every row of ``batches`` (``iter_batches(batch_format="numpy")`` form), held in memory."""
        parts = list(batches)
        if not parts:
            raise ValueError("this worker's training shard is empty")
        return cls({name: np.concatenate([part[name] for part in parts]) for name in parts[0]})

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """One epoch: every row once, in the permutation drawn by ``seed``, ``batch_size`` rows a batch (the last
        one shorter where they do not divide)."""
        order = np.random.default_rng(seed).permutation(self.rows)
        for start in range(0, self.rows, batch_size):
            rows = order[start:start + batch_size]
            yield {name: column[rows] for name, column in self.columns.items()}
