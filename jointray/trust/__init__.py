"""What makes a number honest: calibration fitted on held-back cases and applied at inference.

One concept a module: :mod:`~jointray.trust.scaling` (per-class temperature or vector scaling of voxel
probabilities), :mod:`~jointray.trust.conformal` (split-conformal intervals and ordinal prediction sets),
:mod:`~jointray.trust.risk_control` (conformal risk control of the review flag),
:mod:`~jointray.trust.quality` (predicted Dice from aggregated uncertainty), :mod:`~jointray.trust.ood`
(inputs unlike the calibration cases) and :mod:`~jointray.trust.calibration` (all of it fitted from
per-case rows, stored with the model as JSON).
"""

from jointray.trust.calibration import Calibration, fit_calibration
from jointray.trust.scaling import ProbabilityScaling, fit_scaling

__all__ = ["Calibration", "ProbabilityScaling", "fit_calibration", "fit_scaling"]
