"""Reading the rows of given subjects from prepared shard files: the read task of the streamed datasets
(:func:`jointray.data.streaming.subjects_dataset`) and in-process reads.

A module of its own, importing pyarrow alone: a Ray worker imports the module of a task's function
before it runs the task, and every run's first epoch starts fresh worker processes, which would otherwise
import MONAI and torch (through :mod:`jointray.data.streaming`) before their first read.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def shard_rows(paths: Sequence[str], keep: list[str]) -> pa.Table:
    """The rows of the subjects in ``keep`` from the shard files ``paths``, in file order."""
    return pa.concat_tables([pq.read_table(path, filters=pc.field("subject_id").isin(keep)) for path in paths])


def read_task(batch: pa.Table, keep: list[str]) -> pa.Table:
    """``map_batches`` form of :func:`shard_rows`: the files named in ``batch["path"]``."""
    return shard_rows(batch["path"].to_pylist(), keep)
