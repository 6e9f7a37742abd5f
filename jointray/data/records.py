"""What a source yields: one :class:`CaseRecord` per subject, and :class:`Quarantined` for what it refused."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: Outcome targets a case may carry; any of them may be missing (None).
TARGETS = ("mmse", "cdr", "time", "event")
#: Table columns with a meaning of their own: never clinical inputs (a target there would leak it).
RESERVED_COLUMNS = frozenset({"subject_id", "label", "split", "fold", *TARGETS})


@dataclass
class CaseRecord:
    """One subject as found by a source, before anything is read.

    ``images`` holds one path per channel (modality or view): a NIfTI file, a DICOM folder or a
    zip of one DICOM series. ``clinical`` maps column name to a raw value (float, str or None).
    """

    subject_id: str
    images: list[str]
    label: str | None = None
    clinical: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(TARGETS))
    split: str | None = None
    fold: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CaseRecord:
        return cls(**json.loads(text))


@dataclass
class Quarantined:
    """An input that was not prepared, with the file at fault and a one-line reason."""

    subject_id: str | None
    path: str
    reason: str
    stage: str  # "scan" (found by the source), "validate" or "preprocess"


def clean_value(value: Any) -> Any:
    """Normalise a table cell: NaN, None and empty strings are all 'missing' (None)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    if hasattr(value, "item"):  # numpy scalar → Python, so records serialise to JSON
        return value.item()
    return value
