"""Evaluation metrics: segmentation overlap and surface distance, volumes and their agreement,
outcome scores (regression, ordinal stage, survival) and calibration. See each module for the
definitions, shapes and undefined cases; :mod:`jointray.metrics.aggregate` summarises per-case values.
"""

from jointray.metrics.aggregate import summarize
from jointray.metrics.calibration import (
    BIN_CONFIDENCE,
    BIN_CORRECT,
    BIN_COUNT,
    IntervalCoverage,
    bins_calibration_error,
    class_calibration_error,
    flatten_voxels,
    interval_coverage,
    predictive_interval,
    reliability_bins,
    voxel_calibration_error,
)
from jointray.metrics.ordinal import MISSING, ordinal_metrics
from jointray.metrics.regression import regression_metrics
from jointray.metrics.segmentation import segmentation_metrics
from jointray.metrics.structures import Spacing, Structures
from jointray.metrics.survival import concordance_index
from jointray.metrics.volume import (
    BlandAltman,
    bland_altman,
    intraclass_correlation,
    structure_volumes,
    volume_metrics,
)

__all__ = [
    "BIN_CONFIDENCE",
    "BIN_CORRECT",
    "BIN_COUNT",
    "MISSING",
    "BlandAltman",
    "IntervalCoverage",
    "Spacing",
    "Structures",
    "bins_calibration_error",
    "bland_altman",
    "class_calibration_error",
    "concordance_index",
    "flatten_voxels",
    "interval_coverage",
    "intraclass_correlation",
    "ordinal_metrics",
    "predictive_interval",
    "regression_metrics",
    "reliability_bins",
    "segmentation_metrics",
    "structure_volumes",
    "summarize",
    "volume_metrics",
    "voxel_calibration_error",
]
