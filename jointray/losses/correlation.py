"""A penalty that asks the outcome heads to reproduce the correlations between the outcome targets."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations

import torch
from torch.nn.modules.loss import _Loss

from jointray.losses.masking import as_vector, present, zero_with_graph


class TaskCorrelationPenalty(_Loss):
    """Squared gap between the batch correlation of two tasks' predictions and that of their targets.

    For each pair of tasks (a, b) given in both ``input`` and ``target``, over the subjects where both
    targets are present (at least ``min_subjects``)::

        penalty_ab = (r(ŷ_a, ŷ_b) − r(y_a, y_b))²,     r = Pearson correlation

    and the result is the mean over the pairs available (a 0 connected to the graph when none is).
    A pair is not available when fewer than ``min_subjects`` subjects have both targets or when a
    target is constant over them (its correlation is undefined).

    Rationale: MMSE, CDR and risk measure one disease process, so their targets are strongly correlated
    (MMSE falls as CDR rises). Heads trained each on its own masked loss are not told this and can make
    jointly implausible predictions (a high MMSE with a high CDR), most of all for subjects with few
    targets. Matching the cross-task correlation in each batch is a weak, scale-free coupling of the
    heads: it constrains only the joint structure, never an individual prediction, so it cannot pull a
    head away from its own target's scale or offset. It is a jointray heuristic, not a method from a
    paper; weight it low (the balancer's job).

    Orientation: a prediction must increase with its target (pass −risk against a time-to-event
    target, or risk against an event indicator), and each task must be one number per subject: for
    CDR, e.g., the expected class ``Σ_k k·p_k`` from :func:`~jointray.losses.ordinal.coral_probabilities`.

    The prediction correlation is ``cov / sqrt(var_a·var_b + eps)``: ``eps`` keeps the gradient bounded
    when a head's predictions are (nearly) constant, as at initialisation; its relative bias,
    ``eps / (2·var_a·var_b)``, is negligible for predictions in their natural units.

    Shapes:
        - input: mapping task name → (B,) or (B, 1) predictions.
        - target: mapping task name → (B,) float targets, NaN = missing.
        - output: scalar.
    """

    def __init__(self, min_subjects: int = 3, eps: float = 1e-8) -> None:
        """
        Args:
            min_subjects: the fewest subjects with both targets for a pair to count (at least 3: with 2,
                a correlation is always ±1).
            eps: added to the product of the prediction variances (see above).
        """
        super().__init__()
        if min_subjects < 3:
            raise ValueError(f"min_subjects must be >= 3, got {min_subjects}")
        self.min_subjects = min_subjects
        self.eps = eps

    def forward(self, input: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not input:
            raise ValueError("input has no task")
        tasks = [name for name in input if name in target]
        preds = {name: as_vector(input[name], f"input[{name!r}]") for name in tasks}
        targets = {name: as_vector(target[name], f"target[{name!r}]").to(preds[name].dtype) for name in tasks}
        penalties = []
        for a, b in combinations(tasks, 2):
            both = present(targets[a]) & present(targets[b])
            if int(both.sum()) < self.min_subjects:
                continue
            ya, yb = targets[a][both], targets[b][both]
            ya, yb = ya - ya.mean(), yb - yb.mean()
            target_scale = (ya.square().mean() * yb.square().mean()).sqrt()
            if float(target_scale) == 0.0:
                continue
            target_r = (ya * yb).mean() / target_scale
            pa, pb = preds[a][both], preds[b][both]
            pa, pb = pa - pa.mean(), pb - pb.mean()
            pred_r = (pa * pb).mean() / (pa.square().mean() * pb.square().mean() + self.eps).sqrt()
            penalties.append((pred_r - target_r).square())
        if not penalties:
            return zero_with_graph(*input.values())
        return torch.stack(penalties).mean()
