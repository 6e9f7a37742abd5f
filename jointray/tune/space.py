"""From ``tune.space`` (validated YAML) to Ray Tune's distributions, and from a trial's parameters back to a config.

A search-space key is a config key, the way an override names it (``train.lr``, ``model.dropout``,
``train.curriculum.phases.1.seg``), so a trial's config is the base config with its parameters applied
as overrides, through the same validation as the command line's.

Optuna's categorical distributions hold only numbers, strings, booleans and None. A ``choice`` or
``grid`` dimension with a list or mapping among its values (``model.channels``) therefore travels as
JSON strings, one per value, and is decoded back before it reaches the config; the results table shows
those strings.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ray import tune

from jointray.config import Config, SearchDimension, config_from_tree, override_text


def _encoded(dim: SearchDimension) -> bool:
    return any(isinstance(v, (list, dict)) for v in (dim.choice or dim.grid or []))


def encode_value(dim: SearchDimension, value: Any) -> Any:
    return json.dumps(value) if _encoded(dim) else value


def decode_value(dim: SearchDimension, value: Any) -> Any:
    return json.loads(value) if _encoded(dim) else value


def tune_space(space: dict[str, SearchDimension]) -> dict[str, Any]:
    """``param_space`` for the Tuner: one Ray Tune distribution per key."""

    def one(dim: SearchDimension) -> Any:
        if dim.uniform:
            return tune.uniform(*dim.uniform)
        if dim.loguniform:
            return tune.loguniform(*dim.loguniform)
        if dim.integer:
            return tune.randint(dim.integer[0], dim.integer[1] + 1)  # randint excludes its upper bound
        values = [encode_value(dim, v) for v in (dim.choice if dim.choice is not None else dim.grid)]
        return tune.choice(values) if dim.choice is not None else tune.grid_search(values)

    return {key: one(dim) for key, dim in space.items()}


def encode_point(space: dict[str, SearchDimension], point: dict[str, Any]) -> dict[str, Any]:
    """A ``tune.points_to_evaluate`` entry in the searcher's encoding."""
    return {key: encode_value(space[key], value) for key, value in point.items()}


def trial_config(cfg: Config, params: dict[str, Any], trials_dir: str, trial_id: str) -> Config:
    """The config of one trial: ``cfg`` with the trial's parameters applied, in its own run folder
    ``<trials_dir>/<trial_id>`` (``trials_dir`` a path or a storage URI; its checkpoints, TensorBoard, MLflow
    run and fault marker), resumable: a trial restarted after the search's driver died continues its own
    training.

    Raises:
        ConfigError: a combination of parameters the config refuses (e.g. sampled phase bounds out of
            order); the trial fails with that message and the search goes on.
    """
    tree = cfg.model_dump(mode="json", exclude={"tune"})
    overrides = [override_text(key, decode_value(cfg.tune.space[key], value)) for key, value in params.items()]
    overrides += [override_text("train.name", trial_id), override_text("train.storage_path", trials_dir),
                  "train.resume=true"]
    return config_from_tree(copy.deepcopy(tree), overrides)
