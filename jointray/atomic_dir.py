"""Replace a whole folder at once: a reader finds the old version or the new one, never a mix.

Used for everything jointray writes as a unit that another step reads: the prepared output (shards,
``spec.json``, ``source.json``, ``report.json``), the exported best checkpoint and the serving artifact.

How :func:`staged_dir` switches ``<target>``:

1. the new version is built in a sibling ``.<name>.tmp-<id>`` (same filesystem, so renames are atomic),
   then every file and folder in it is fsync'd;
2. ``<target>`` is renamed to ``.<name>.old-<id>``;
3. ``.<name>.tmp-<id>`` is renamed to ``<target>`` and the parent folder fsync'd;
4. ``.<name>.old-<id>`` is removed.

POSIX cannot rename a folder over a non-empty one, hence two renames. A crash before step 3 leaves the
old version whole (under ``<target>`` before step 2, under its ``.old-`` name between 2 and 3); a crash
after it leaves the new version whole. The one state without ``<target>`` is repaired by :func:`recover`,
which renames the ``.old-`` folder back; :func:`staged_dir` and the readers that check what they load
(:func:`jointray.data.provenance.check_shards_match`, :func:`jointray.artifacts.load_model`) call it first.
An error raised while building, or by a rename, puts the old version back before it propagates.

One writer per target at a time: a new write removes the ``.tmp-`` and ``.old-`` siblings that
interrupted writes left behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _siblings(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{kind}-*"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Data first, then the folders that name it: a rename must never publish files still in the page cache.
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder, name))
        _fsync(Path(folder))


def recover(target: Path) -> None:
    """Put back the previous version of ``target`` if a crash between the two renames left it missing."""
    target = Path(target)
    if target.exists():
        return
    previous = _siblings(target, "old")
    if not previous:
        return
    try:
        os.replace(max(previous, key=lambda p: p.stat().st_mtime_ns), target)
    except OSError:
        if not target.exists():  # else another process restored or switched it in meanwhile
            raise


def _switch(staged: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old.exists():
            os.replace(old, target)
        raise
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Build the next version of the folder ``target`` in the yielded empty folder; on a clean exit it
    replaces ``target`` whole (created with its parents if new). On an exception ``target`` is untouched.

    Example::

        with staged_dir(out) as staging:
            (staging / "spec.json").write_text(...)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    for leftover in _siblings(target, "tmp") + _siblings(target, "old"):
        shutil.rmtree(leftover, ignore_errors=True)
    staged = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staged.mkdir()
    try:
        yield staged
        _fsync_tree(staged)
        _switch(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
