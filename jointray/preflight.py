"""What a command needs on disk, checked by the CLI before it starts Ray: a typo in a path then fails in about a
second, naming the path, instead of after Ray's start-up (or a cluster job's submission).

These look at the file system only, and import nothing heavy, so that the CLI can run them before it imports
Ray, torch and MONAI. The steps that read the inputs check them again in full, for callers from Python; a
check here only has to catch the mistakes a person makes on the command line.
"""

from __future__ import annotations

from pathlib import Path

from jointray.config import Config, ConfigError
from jointray.storage import is_uri


def check_prepare(cfg: Config) -> None:
    """``data.root`` exists (the synthetic cohort is written there, so not for it) and so does ``data.clinical``."""
    data = cfg.data
    if data.format != "synthetic" and not Path(data.root).exists():
        raise ConfigError(f"data.root: {data.root} does not exist (data.format={data.format})")
    if data.clinical is not None and not Path(data.clinical).is_file():
        raise ConfigError(f"data.clinical: {data.clinical} is not a file")


def check_train(cfg: Config) -> None:
    """The prepared shards' folder exists; whether its shards match the config is the trainer's check."""
    prepared = Path(cfg.train.prepared or cfg.data.output)
    if not prepared.is_dir():
        raise ConfigError(f"no prepared shards at {prepared} (train.prepared, else data.output): run "
                          "`jointray prepare` with this config first")


def check_checkpoint(checkpoint: str | Path) -> None:
    """``--checkpoint`` exists (a storage URI is fetched and checked by :func:`jointray.artifacts.read_config`,
    as is whether a folder holds a checkpoint: it needs torch imported)."""
    if not is_uri(checkpoint) and not Path(checkpoint).exists():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist")


def check_evaluate(checkpoint: str | Path, data: Path, labels: Path | None) -> None:
    """``--checkpoint``, ``--data`` and ``--labels`` (if given) exist."""
    check_checkpoint(checkpoint)
    if not data.exists():
        raise ConfigError(f"--data {data} does not exist")
    if labels is not None and not labels.is_dir():
        raise ConfigError(f"--labels {labels} is not a folder")
