"""Training objectives of the joint model: segmentation, MMSE, CDR, survival and a cross-task penalty."""

from jointray.losses.correlation import TaskCorrelationPenalty
from jointray.losses.ordinal import (
    CDR_STAGES,
    CoralLoss,
    cdr_to_class,
    class_to_cdr,
    coral_predict,
    coral_probabilities,
)
from jointray.losses.regression import MaskedHuberLoss
from jointray.losses.segmentation import DeepSupervisionDiceCE, pool_label
from jointray.losses.survival import CoxPHLoss

__all__ = [
    "CDR_STAGES",
    "CoralLoss",
    "CoxPHLoss",
    "DeepSupervisionDiceCE",
    "MaskedHuberLoss",
    "TaskCorrelationPenalty",
    "cdr_to_class",
    "class_to_cdr",
    "coral_predict",
    "coral_probabilities",
    "pool_label",
]
