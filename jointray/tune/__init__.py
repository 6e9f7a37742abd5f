"""Hyperparameter search over jointray's training on Ray Tune with Optuna (:mod:`jointray.tune.search`)."""

from jointray.tune.results import ResultsSummary, pareto_front
from jointray.tune.search import load_search, run_search

__all__ = ["ResultsSummary", "load_search", "pareto_front", "run_search"]
