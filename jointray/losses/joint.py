"""All task losses of the joint model for one batch, by task name.

The balancer and the curriculum (``jointray.train``) turn this dict into the scalar to
backpropagate; keeping the per-task values separate is what lets them weigh tasks adaptively.
"""

from __future__ import annotations

import torch
from torch import nn

from jointray.config import LossConfig, ModelConfig
from jointray.losses.correlation import TaskCorrelationPenalty
from jointray.losses.ordinal import CoralLoss, cdr_to_class, coral_probabilities
from jointray.losses.regression import MaskedHuberLoss
from jointray.losses.segmentation import DeepSupervisionDiceCE
from jointray.losses.survival import CoxPHLoss
from jointray.tasks import JointOutput, Targets


class JointLoss(nn.Module):
    """Per-task losses: ``seg`` (deep-supervised Dice+CE), ``mmse`` (Huber), ``cdr`` (CORAL), ``risk``
    (Cox partial likelihood), and ``correlation`` (task-correlation penalty) when its weight is > 0.

    Tasks the model does not predict, or whose targets are absent from the batch, are left out.
    ``correlation`` comes already multiplied by ``train.loss.correlation_weight``: it is a regulariser
    to add to the balanced total, not a task for the balancer to weigh.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: LossConfig):
        super().__init__()
        self.cdr_classes = model_cfg.cdr_classes
        self.seg = DeepSupervisionDiceCE(weights=cfg.deep_supervision)
        self.mmse = MaskedHuberLoss(delta=cfg.huber_delta)
        self.cdr = CoralLoss()
        self.risk = CoxPHLoss(ties=cfg.cox_ties)
        self.correlation = TaskCorrelationPenalty() if cfg.correlation_weight > 0 else None
        self.correlation_weight = cfg.correlation_weight

    def forward(self, out: JointOutput, targets: Targets) -> dict[str, torch.Tensor]:
        """Losses in fp32 whatever the model's precision: under bf16/fp16 autocast the heads' outputs
        would otherwise meet Huber, CORAL and the Cox partial likelihood (a ``logcumsumexp`` over the
        batch) in half precision, and autocast would run any matmul inside the losses in it too."""
        device = (out.seg[0] if out.seg is not None else next(iter(out.outcomes.values()))).device
        with torch.autocast(device.type, enabled=False):
            return self._losses(out, targets)

    def _losses(self, out: JointOutput, targets: Targets) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if out.seg is not None and targets.label is not None:
            losses["seg"] = self.seg(out.seg, targets.label, targets.has_label)
        o = {name: value.float() for name, value in out.outcomes.items()}
        if "mmse" in o and targets.mmse is not None:
            losses["mmse"] = self.mmse(o["mmse"], targets.mmse)
        cdr_class = None
        if "cdr" in o and targets.cdr is not None:
            cdr_class = cdr_to_class(targets.cdr, self.cdr_classes)
            losses["cdr"] = self.cdr(o["cdr"], cdr_class)
        if "risk" in o and targets.time is not None and targets.event is not None:
            losses["risk"] = self.risk(o["risk"], targets.time, targets.event)
        if self.correlation is not None:
            predictions, observed = {}, {}
            if "mmse" in o and targets.mmse is not None:
                predictions["mmse"], observed["mmse"] = o["mmse"], targets.mmse
            if cdr_class is not None:  # expected class, so CDR is one number per subject
                grades = torch.arange(self.cdr_classes, device=o["cdr"].device, dtype=torch.float32)
                predictions["cdr"] = (coral_probabilities(o["cdr"].float()) * grades).sum(-1)
                observed["cdr"] = torch.where(cdr_class >= 0, cdr_class.float(), torch.nan)
            if "risk" in o and targets.time is not None:  # higher risk ~ shorter time: orient as −risk
                predictions["risk"] = -o["risk"]
                event_time = torch.where(targets.event == 1, targets.time, torch.nan)
                observed["risk"] = event_time
            if len(predictions) >= 2:
                losses["correlation"] = self.correlation_weight * self.correlation(predictions, observed)
        return losses
