"""The configs shipped inside the package, so that ``--config synthetic`` works from any folder and from an
installed wheel, not only from the repository root.

The files live in ``jointray/configs/`` (package data, see pyproject.toml); the repository's top-level
``configs/`` is a link to that folder, so ``configs/synthetic.yaml`` paths keep working in a checkout.
"""

from __future__ import annotations

from pathlib import Path

#: The folder of the built-in YAML files.
FOLDER = Path(__file__).parent / "configs"
#: A Ray Serve config file (``serve run``) shipped beside the run configs: not a jointray config, so no name.
SERVE_CONFIG = FOLDER / "serve.yaml"


def names() -> list[str]:
    """The built-in jointray configs by the name ``--config`` takes (the file name without ``.yaml``)."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml") if p != SERVE_CONFIG)


def find(value: str | Path) -> Path | None:
    """The file ``value`` means: a file at that path if there is one (it wins over a built-in of the same
    name), else the built-in config of that name; None when it is neither."""
    path = Path(value)
    if path.is_file():
        return path
    if str(value) in names():
        return FOLDER / f"{value}.yaml"
    return None
