"""What prepared shards were prepared from, and the check that they are what a config asks for.

``prepare`` writes ``source.json`` beside the shards (:func:`describe_source`):

- ``format``, ``root`` and ``clinical`` (made absolute), and the settings besides the PreprocessSpec that
  change the shards' content: ``image_columns``, ``label_names``, ``clinical_columns``, ``max_voxels``
  and, for the synthetic format, ``synthetic``;
- ``cases``: how many cases the scan found (before validation); ``rejected``: how many inputs it refused;
- ``entries``: per subject, a SHA-256 (16 hex digits) over its case record (files, clinical values,
  targets, split, fold) and the size and modification time (ns) of every file it names (of every file
  inside a DICOM folder); ``refused``: one over what the scan refused and why;
- ``digest``: a SHA-256 over all of the above.

Recomputing it lists folders, stats files and reads the listing tables, but reads no volume and
generates nothing, so ``train`` can afford :func:`check_shards_match` at every start. A case file
rewritten, touched, added or removed since prepare changes it. The preprocessing is checked separately,
against ``spec.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jointray.atomic_dir import recover
from jointray.config import Config, ConfigError, DataConfig
from jointray.data.records import CaseRecord
from jointray.data.shards import SOURCE_FILE
from jointray.data.sources import Scan, find_cases
from jointray.data.synthetic import cohort_matches

#: The data settings, besides where the cases are, that change what the shards hold.
_SETTINGS = ("image_columns", "label_names", "clinical_columns", "max_voxels")
#: Subjects named in a message before "and N more".
_NAMED = 5


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_state(path: Path) -> list[Any]:
    try:
        stat = path.stat()
    except OSError:
        return ["missing"]
    return [stat.st_size, stat.st_mtime_ns]


def _entry(record: CaseRecord) -> str:
    files = []
    for name in [*record.images, *([record.label] if record.label else [])]:
        path = Path(name)
        inside = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        files.append([[str(p.relative_to(path)), *_file_state(p)] for p in inside] or _file_state(path))
    return _sha256([asdict(record), files])[:16]


def _where(cfg: DataConfig) -> dict[str, Any]:
    """Where the cases come from and the settings that shape the shards, as JSON types."""
    where: dict[str, Any] = {
        "format": cfg.format,
        "root": str(Path(cfg.root).resolve()),
        "clinical": None if cfg.clinical is None else str(Path(cfg.clinical).resolve()),
        **cfg.model_dump(mode="json", include=set(_SETTINGS)),
    }
    if cfg.format == "synthetic":
        where["synthetic"] = cfg.synthetic.model_dump(mode="json")
    return json.loads(json.dumps(where))  # e.g. label_names' int keys become strings, as read back


def describe_source(cfg: DataConfig, scan: Scan) -> dict[str, Any]:
    """The source record of ``scan`` (found from ``cfg``) that ``source.json`` holds; see the module docstring."""
    record = _where(cfg) | {
        "cases": len(scan.records),
        "rejected": len(scan.rejected),
        "entries": {r.subject_id: _entry(r) for r in scan.records},
        "refused": _sha256(sorted([q.subject_id or "", q.path, q.reason] for q in scan.rejected))[:16],
    }
    return record | {"digest": _sha256(record)}


def write_source(folder: Path, record: dict[str, Any]) -> None:
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _subjects(names: list[str]) -> str:
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return ", ".join(names[:_NAMED]) + more


def _plural(n: int) -> str:
    return f"{n} case{'' if n == 1 else 's'}"


def _changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the recorded source and the current one, most telling first."""
    settings = [key for key in (*_SETTINGS, "clinical", "synthetic") if then.get(key) != now.get(key)]
    if settings:  # entries change with them; naming the settings says why
        return [f"data.{key}: {then.get(key)!r} then, {now.get(key)!r} now" for key in settings]
    if then["format"] != now["format"] or then["root"] != now["root"]:
        return []  # the headline says it
    if "entries" not in now:
        return [f"the synthetic cohort at {now['root']} is missing or was written with other parameters"]
    old, new = then.get("entries", {}), now["entries"]
    parts = []
    changed = sorted(s for s in old.keys() & new.keys() if old[s] != new[s])
    for subjects, what in ((changed, "changed"), (sorted(new.keys() - old.keys()), "added"),
                           (sorted(old.keys() - new.keys()), "removed")):
        if subjects:
            parts.append(f"{_plural(len(subjects))} {what} ({_subjects(subjects)})")
    if then.get("refused") != now["refused"]:
        parts.append("the inputs the scan refused changed")
    return [f"since then {', '.join(parts)}"] if parts else []


def check_shards_match(prepared: Path, cfg: Config) -> None:
    """Refuse shards that were not prepared from what ``cfg.data`` asks for, as it is now.

    Recomputes the source record of ``cfg.data`` (listing and stat only: no volume is read, no synthetic
    cohort generated) and compares it with ``source.json`` beside the shards. A folder that a crash left
    mid-switch is restored first (:func:`jointray.atomic_dir.recover`).

    Raises:
        ConfigError: there are no shards at ``prepared``, they have no source record, or it differs (another format, root, clinical
            table or setting, or case files changed, added or removed since); the message names the
            shards' source and the config's, and says to run ``jointray prepare`` with this config.
    """
    prepared = Path(prepared)
    recover(prepared)
    rerun = "run `jointray prepare --config ...` with this config, then train again"
    if not prepared.is_dir():
        raise ConfigError(f"no prepared shards at {prepared} (train.prepared, else data.output): {rerun}")
    path = prepared / SOURCE_FILE
    if not path.is_file():
        raise ConfigError(f"the shards at {prepared} have no {SOURCE_FILE} (prepared before jointray recorded "
                          f"their source), so nothing shows they hold what this config asks for: {rerun}")
    then = json.loads(path.read_text())
    data = cfg.data
    s = data.synthetic
    if data.format == "synthetic" and not cohort_matches(data.root, s.n_subjects, s.seed, s.shape, s.spacing):
        now = _where(data)  # nothing to scan without generating it
        cases = s.n_subjects
    else:
        now = describe_source(data, find_cases(data))
        if now["digest"] == then.get("digest"):
            return
        cases = now["cases"]
    changes = "; ".join(_changes(then, now))
    raise ConfigError(
        f"the shards at {prepared} were prepared from {then.get('format')} {then.get('root')} "
        f"({_plural(then.get('cases', 0))}), but this config asks for {now['format']} {now['root']} "
        f"({_plural(cases)}){': ' + changes if changes else ''}. Train refuses shards of another source: {rerun}"
    )
