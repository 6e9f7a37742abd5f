"""The training curriculum: phases by training progress, each with task scales, cross-task strength and lr.

Progress is ``p = epoch / epochs`` in [0, 1); the phase in force is the first whose ``until`` exceeds
``p``. The default phases (DESIGN.md) train segmentation first and phase in the outcomes and the
outcome → segmentation gates once the segmentation is worth conditioning:

=========  ====  =======  =====  ========
progress   seg   outcome  cross  lr_scale
=========  ====  =======  =====  ========
p < 0.3    0.8   0.2      0.0    1.0
p < 0.6    0.6   0.4      0.3    0.5
p < 1.0    0.5   0.5      0.5    0.2
=========  ====  =======  =====  ========

- ``seg`` scales the segmentation loss, ``outcome`` each outcome loss (mmse, cdr, risk).
- ``cross`` is read by the model: the strength (0..1) of the outcome → segmentation gates; 0 leaves
  the segmentation independent of the outcome branch. (The segmentation → outcome path, detached
  predicted volumes, is always on.)
- ``lr_scale`` sets the phase's peak learning rate, ``lr = lr_scale × train.lr``, for the trainer's
  schedule (with ``train.lr = 1e-3``: 1e-3, 5e-4, 2e-4). A search over ``train.lr`` thus moves every
  phase's rate together and a search over a phase's ``lr_scale`` reshapes the steps.

**With a balancer**, the phase's scales are passed as the balancer's external ``scales``::

    total = balancer(losses, scales=phase.scales(losses))   # Σ_t task_scale(t) · balancer_weight(t) · L_t

The curriculum decides what a phase emphasises; the balancer evens out loss magnitudes and learning
speeds underneath. The adaptive balancers see the unscaled losses, so a phase change does not look to
them like a jump in a task's loss.

**Disabled** (the default: ``train.curriculum``), training is one phase over [0, 1) with seg and outcome 1.0, ``cross`` 1.0 (the model as
designed, every interaction at full strength) and ``lr = train.lr``: the no-curriculum baseline. Its
end state differs from the default schedule's (cross 0.5); for a comparison of the schedule alone, set
the last phase's ``cross`` to 1.0.

The trained model ends in the last phase, ``at(1.0)``: inference must use that phase's ``cross``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jointray.config import CurriculumConfig, PhaseConfig

SEG_TASK = "seg"
#: The outcome heads of ``model.heads``, all scaled by a phase's ``outcome``.
OUTCOME_TASKS = ("mmse", "cdr", "risk")


@dataclass(frozen=True)
class Phase:
    """One phase of a curriculum, in force for progress in ``[start, until)``.

    ``index`` counts phases from 0, so a trainer can tell when a new phase begins (e.g. to restart its
    learning-rate warm-up at the new peak ``lr``).
    """

    index: int
    start: float
    until: float
    seg: float
    outcome: float
    cross: float
    lr: float

    def task_scale(self, task: str) -> float:
        """The scale of ``task``'s loss: ``seg`` for "seg", ``outcome`` for each outcome task."""
        if task == SEG_TASK:
            return self.seg
        if task in OUTCOME_TASKS:
            return self.outcome
        raise ValueError(f"unknown task {task!r}; expected {SEG_TASK!r} or one of {list(OUTCOME_TASKS)}")

    def scales(self, tasks: Iterable[str]) -> dict[str, float]:
        """:meth:`task_scale` of each task, the ``scales`` argument of a loss balancer."""
        return {task: self.task_scale(task) for task in tasks}


class Curriculum:
    """The phases of training, looked up by progress.

    Args:
        cfg: ``train.curriculum`` (its phases are validated: ``until`` strictly increasing up to 1.0).
        lr: ``train.lr``: the phases' rates are multiples of it, and the single phase's rate when the
            curriculum is disabled.

    Attributes:
        phases: the :class:`Phase` s in order, covering [0, 1).
    """

    def __init__(self, cfg: CurriculumConfig, lr: float):
        specs = cfg.phases if cfg.enabled else [PhaseConfig(until=1.0, seg=1.0, outcome=1.0, cross=1.0, lr_scale=1.0)]
        starts = [0.0] + [spec.until for spec in specs[:-1]]
        self.phases = tuple(
            Phase(index, start, spec.until, spec.seg, spec.outcome, spec.cross, spec.lr_scale * lr)
            for index, (start, spec) in enumerate(zip(starts, specs))
        )

    def at(self, progress: float) -> Phase:
        """The phase in force at ``progress = epoch / epochs``.

        ``progress`` is in [0, 1); 1.0 is accepted and gives the last phase, the one training ends in.
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        return next((phase for phase in self.phases if progress < phase.until), self.phases[-1])
