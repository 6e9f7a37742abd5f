"""Multi-task loss balancing: how the per-task losses become the one loss that is backpropagated.

A balancer is a :class:`LossBalancer` (an ``nn.Module``) over a fixed list of ``T`` task names
("seg", "mmse", "cdr", "risk" or a subset). The trainer uses it like this::

    balancer = make_balancer(cfg.train.balancer, tasks, shared_parameters=model.last_shared_layer.parameters())
    optimizer = AdamW([{"params": model.parameters()},          # UncertaintyBalancer learns its s_t
                       {"params": balancer.parameters(), "weight_decay": 0.0}])
    for epoch in range(epochs):
        phase = curriculum.at(epoch / epochs)
        for batch in loader:
            losses = {...}                                   # 0-d loss per task present in the batch
            total = balancer(losses, scales=phase.scales(losses))
            total.backward()
        balancer.epoch_end(epoch_mean_losses)                # InverseRate and DWA adapt here

Conventions shared by every balancer:

- **Composition.** ``forward(losses, scales)`` returns ``Σ_t scales[t] · term_t`` over the tasks present,
  where ``term_t`` is the balancer's own term, ``w_t · L_t`` for all but :class:`UncertaintyBalancer`.
  ``scales`` is the curriculum's task scale, so the total is
  ``Σ_t curriculum_scale(t) · balancer_weight(t) · L_t``: the curriculum says what the phase is about,
  the balancer evens out the tasks' loss scales and speeds underneath it.
- **Absent tasks.** A task missing from ``losses`` (no subject in the batch has its target) is skipped
  for that step: it adds nothing and its weight does not change. A task missing from ``epoch_end``
  counts as unchanged for that epoch (NaN in the history, ratio 1).
- **Weights** sum to ``T`` for the adaptive balancers; :class:`FixedBalancer` uses its weights as given
  and :class:`UncertaintyBalancer` reports ``0.5·exp(−s_t)``, which has no fixed sum.
- **Checkpoints.** ``state_dict()`` holds everything a resumed run needs: loss histories, learnt
  weights, GradNorm's first losses and its Adam state. Loading checks the task list matches.
- **Data parallelism.** Report all-reduced epoch means to ``epoch_end`` and InverseRate/DWA stay
  identical on every worker. :class:`UncertaintyBalancer`'s ``log_variance`` gradients need the same
  all-reduce as the model's. :class:`GradNormBalancer` updates from the local batch: average
  ``task_weights`` across workers after each step.

Losses are assumed positive (Dice, cross-entropy, Huber and Cox partial likelihood are): the adaptive
balancers divide by them.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args

import torch
from torch import Tensor, nn

from jointray.config import BalancerConfig

# Guards the loss ratios against a zero denominator.
_EPS = 1e-12


class LossBalancer(nn.Module, ABC):
    """Turns the losses of several tasks into one scalar to backpropagate.

    Args:
        tasks: task names, in a fixed order (the order of every per-task tensor in the state).
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {list(tasks)}")

    def forward(self, losses: Mapping[str, Tensor], scales: Mapping[str, float] | None = None) -> Tensor:
        """The total loss of one step.

        Args:
            losses: 0-d loss per task present in the step; tasks not given are skipped.
            scales: an external factor per present task (the curriculum's task scale), multiplying the
                task's whole balanced term; None scales every task by 1.

        Returns:
            0-d tensor ``Σ_t scales[t] · term_t`` over the present tasks.
        """
        self._check_known(losses)
        present = {task: losses[task] for task in self.tasks if task in losses}
        if not present:
            raise ValueError(f"no task loss given; expected some of {list(self.tasks)}")
        for task, loss in present.items():
            if loss.ndim != 0:
                raise ValueError(f"loss of task {task!r} must be 0-d, got shape {tuple(loss.shape)}")
        if scales is None:
            scales = dict.fromkeys(present, 1.0)
        unscaled = [task for task in present if task not in scales]
        if unscaled:
            raise ValueError(f"scales given, but none for task(s) {unscaled}")
        terms = self._terms(present)
        return sum(scales[task] * terms[task] for task in present)

    @abstractmethod
    def _terms(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """The balanced term (0-d) of each present task, before the external scale."""

    @abstractmethod
    def weights(self) -> dict[str, float]:
        """The current weight of each task, for logging."""

    def epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        """Record the mean training loss per task of the epoch just finished.

        Balancers that adapt per epoch update their weights here; the others only check the names.
        """
        self._check_known(epoch_losses)

    def get_extra_state(self) -> dict[str, Any]:
        """Non-tensor state for ``state_dict``: the task list, checked on load; subclasses add theirs."""
        return {"tasks": list(self.tasks)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if tuple(state["tasks"]) != self.tasks:
            raise ValueError(f"state is for tasks {state['tasks']}, this balancer has {list(self.tasks)}")

    def _check_known(self, names: Iterable[str]) -> None:
        unknown = sorted(set(names) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this balancer has {list(self.tasks)}")


class _WeightedBalancer(LossBalancer):
    """A balancer whose term is ``w_t · L_t``, with the weights in the buffer ``task_weights`` (T,)."""

    task_weights: Tensor

    def __init__(self, tasks: Sequence[str], initial: Sequence[float]):
        super().__init__(tasks)
        self.register_buffer("task_weights", torch.tensor(initial, dtype=torch.float32))

    def _terms(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return {task: self.task_weights[self.tasks.index(task)] * loss for task, loss in losses.items()}

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.task_weights.tolist()))


class FixedBalancer(_WeightedBalancer):
    """Constant weights: ``total = Σ_t w_t · L_t``.

    The weights are used as given, not normalised to sum to ``T``. This is the balancing of the ``dv1``
    baseline and the control for every adaptive method.

    Args:
        tasks: task names.
        weights: weight per task; a task not listed gets 1.0. None: all 1.0.
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None):
        weights = weights or {}
        super().__init__(tasks, [float(weights.get(task, 1.0)) for task in tasks])
        self._check_known(weights)


class _EpochRateBalancer(_WeightedBalancer):
    """Weights recomputed at every epoch end from the history of epoch-mean task losses.

    The history is (epochs, T) float64, NaN where a task had no loss in an epoch.
    """

    def __init__(self, tasks: Sequence[str], temperature: float):
        super().__init__(tasks, [1.0] * len(tasks))
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self._history: list[list[float]] = []

    def epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        super().epoch_end(epoch_losses)
        self._history.append([float(epoch_losses.get(task, math.nan)) for task in self.tasks])
        history = torch.tensor(self._history, dtype=torch.float64)
        self.task_weights.copy_(self._weights_from(history))

    @abstractmethod
    def _weights_from(self, history: Tensor) -> Tensor:
        """(epochs, T) float64 history → (T,) weights for the next epoch."""

    def _softmax_weights(self, ratios: Tensor) -> Tensor:
        """``T · softmax(ratios / temperature)`` with NaN ratios (no data) counted as 1."""
        ratios = torch.nan_to_num(ratios, nan=1.0)
        return len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0)

    def get_extra_state(self) -> dict[str, Any]:
        # A copy: a state_dict taken now must not grow with later epochs.
        return {**super().get_extra_state(), "history": [list(row) for row in self._history]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._history = [list(row) for row in state["history"]]


class InverseRateBalancer(_EpochRateBalancer):
    """Softmax of the inverse training rate: tasks that have learnt least so far get the most weight.

    With ``ℓ_t(k)`` the mean training loss of task ``t`` in epoch ``k`` (k = 1..E recorded so far), the
    weights for the next epoch are uniform (``w_t = 1``) while ``E < warmup_epochs``, and afterwards

    - ``L̃_t = mean(ℓ_t over the last `window` epochs) / mean(ℓ_t over epochs 1..warmup_epochs)``, the
      loss ratio of GradNorm (Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss
      Balancing in Deep Multitask Networks", ICML), averaged over epochs to damp batch noise;
    - ``r_t = L̃_t / mean_i(L̃_i)``, the relative inverse training rate (mean 1; a task whose loss has
      stalled has the largest ``r_t``);
    - ``w = T · softmax(r / temperature)``.

    A small temperature concentrates the weight on the slowest task, a large one tends to uniform.
    Where GradNorm steers gradient norms towards ``r_t^α`` step by step, this sets the weights directly,
    costs nothing per step and needs no access to the model. The window may overlap the warm-up in the
    first epochs after it.

    Args:
        tasks: task names.
        temperature: softmax temperature, > 0.
        warmup_epochs: epochs of uniform weights whose mean loss is the baseline, >= 1.
        window: recent epochs averaged for the current loss, >= 1.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 1.0, warmup_epochs: int = 5, window: int = 5):
        super().__init__(tasks, temperature)
        if warmup_epochs < 1 or window < 1:
            raise ValueError(f"warmup_epochs and window must be >= 1, got {warmup_epochs} and {window}")
        self.warmup_epochs = warmup_epochs
        self.window = window

    def _weights_from(self, history: Tensor) -> Tensor:
        if len(history) < self.warmup_epochs:
            return torch.ones(len(self.tasks))
        baseline = history[: self.warmup_epochs].nanmean(dim=0)
        loss_ratio = history[-self.window :].nanmean(dim=0) / baseline.clamp_min(_EPS)
        return self._softmax_weights(loss_ratio / loss_ratio.nanmean())


class DWABalancer(_EpochRateBalancer):
    """Dynamic weight averaging (Liu, Johns, Davison 2019, "End-to-End Multi-Task Learning with
    Attention", CVPR, eq. 7).

    With ``ℓ_t(k)`` the mean training loss of task ``t`` in epoch ``k``, the weights for epoch ``k`` are

        ``w_t(k) = T · exp(r_t(k−1) / τ) / Σ_i exp(r_i(k−1) / τ)``, ``r_t(k−1) = ℓ_t(k−1) / ℓ_t(k−2)``,

    uniform for the first two epochs, which have no ratio yet. A task whose loss fell least in the last
    epoch gets the most weight; ``τ`` = 2 is the paper's choice.

    Args:
        tasks: task names.
        temperature: ``τ``, > 0.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks, temperature)

    def _weights_from(self, history: Tensor) -> Tensor:
        if len(history) < 2:
            return torch.ones(len(self.tasks))
        return self._softmax_weights(history[-1] / history[-2].clamp_min(_EPS))


class UncertaintyBalancer(LossBalancer):
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla 2018, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR).

    Each task has a learnable log-variance ``s_t = log σ_t²`` (``log_variance``, (T,), initially 0) and
    the term

        ``term_t = 0.5 · exp(−s_t) · L_t + 0.5 · s_t``,

    the negative log-likelihood of a Gaussian with variance ``σ_t²`` up to constants, for every task.
    ``exp(−s_t)`` down-weights a task with large loss (large uncertainty); ``0.5 · s_t`` keeps ``σ_t``
    from growing without bound. Learning ``s`` rather than ``σ`` keeps the parameter unconstrained and
    the weight finite. The stationary point ``∂term_t/∂s_t = 0`` is ``s_t* = log L_t``: the weights tend
    to ``0.5 / L_t``. The paper's classification form (``exp(−s)·L + 0.5·s``) moves that point to
    ``log 2L_t``, where its weight ``exp(−s)`` is the same ``0.5 / L_t``, so one form serves every task
    and the reported weights stay comparable. A curriculum scale multiplies the whole
    term, so it leaves ``s_t*`` where it is, and a task scaled by 0 leaves its ``s_t`` untouched.

    ``log_variance`` is an ``nn.Parameter``: the trainer's optimiser must include
    ``balancer.parameters()``, without weight decay (decay would pull ``s_t`` towards 0).
    :meth:`weights` reports ``0.5 · exp(−s_t)``, which has no fixed sum.

    Args:
        tasks: task names.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__(tasks)
        self.log_variance = nn.Parameter(torch.zeros(len(self.tasks)))

    def _terms(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        terms = {}
        for task, loss in losses.items():
            s = self.log_variance[self.tasks.index(task)]
            terms[task] = 0.5 * torch.exp(-s) * loss + 0.5 * s
        return terms

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, (0.5 * torch.exp(-self.log_variance.detach())).tolist()))


class GradNormBalancer(LossBalancer):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich 2018, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML).

    Learnable weights ``w`` (``task_weights``, (T,), initially 1) are tuned so that every task's
    gradient norm on the last shared layer ``W`` grows with how little it has learnt. In each training
    step, over the present tasks:

    - ``G_t = ‖∇_W (w_t · L_t)‖₂`` and ``Ḡ = mean_t G_t``;
    - ``L̃_t = L_t / L_t(0)`` with ``L_t(0)`` the task's loss in its first step, ``r_t = L̃_t / mean_i L̃_i``;
    - ``L_grad = Σ_t |G_t − Ḡ · r_t^α|`` with the target ``Ḡ · r_t^α`` held constant;
    - ``w`` takes one step of its own Adam (learning rate ``lr``) on ``∂L_grad/∂w``, is clamped
      positive and renormalised so that ``Σ w = T`` (absent tasks keep their weight).

    The step returns ``Σ_t w_t · L_t`` with the weights from before the update, detached: the model
    learns from the weighted losses, never from ``L_grad`` (Algorithm 1 of the paper).

    Since ``w_t`` is a scalar, ``∇_W (w_t L_t) = w_t ∇_W L_t``, so ``G_t = w_t · ‖∇_W L_t‖``: the norms
    ``‖∇_W L_t‖`` are taken once per task with ``torch.autograd.grad`` without ``create_graph``, and
    ``∂L_grad/∂w`` is exactly what differentiating through ``∇_W`` would give, without a second-order
    graph of the model. The forward graph is retained for the trainer's ``backward``. Outside training
    (``eval()`` or under ``torch.no_grad()``) the weights are applied but not updated.

    ``task_weights`` is an ``nn.Parameter`` with ``requires_grad=False``, so it follows ``.to(device)``
    and sits in ``state_dict``; it has a ``.grad`` only inside the update, so a trainer optimiser given
    ``balancer.parameters()`` leaves it alone. The Adam state is in ``state_dict``.

    Args:
        tasks: task names.
        shared_parameters: ``W``, the parameters of the last layer shared by every task (not owned: not
            in ``parameters()`` or ``state_dict``). Every task loss must depend on them.
        alpha: ``α`` >= 0, the strength of the pull towards equal training rates (0: equal norms).
        lr: learning rate of the weights' Adam.
    """

    def __init__(
        self, tasks: Sequence[str], shared_parameters: Iterable[Tensor], alpha: float = 1.5, lr: float = 0.025
    ):
        super().__init__(tasks)
        self.shared_parameters = list(shared_parameters)
        if not self.shared_parameters:
            raise ValueError("GradNorm needs the shared parameters W (the last shared layer); none given")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)), requires_grad=False)
        # L_t(0); NaN until the task's first step.
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), math.nan))
        self._optimizer = torch.optim.Adam([self.task_weights], lr=lr)

    def _terms(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        index = [self.tasks.index(task) for task in losses]
        step_weights = self.task_weights.detach().clone()
        if self.training and torch.is_grad_enabled():
            self._update(index, losses)
        return {task: step_weights[i] * loss for i, (task, loss) in zip(index, losses.items())}

    def _update(self, index: list[int], losses: dict[str, Tensor]) -> None:
        weights = self.task_weights
        idx = torch.tensor(index, device=weights.device)
        norms = torch.stack([self._grad_norm(task, loss) for task, loss in losses.items()]).to(weights)
        current = torch.stack([loss.detach() for loss in losses.values()]).to(weights)
        first = self.initial_losses[idx]
        self.initial_losses[idx] = torch.where(first.isnan(), current, first)
        loss_ratio = current / self.initial_losses[idx].clamp_min(_EPS)
        relative_rate = loss_ratio / loss_ratio.mean()

        before = weights.detach().clone()
        leaf = before.clone().requires_grad_()
        grad_norms = leaf[idx] * norms
        target = grad_norms.mean().detach() * relative_rate**self.alpha
        (weights.grad,) = torch.autograd.grad((grad_norms - target).abs().sum(), leaf)
        self._optimizer.step()
        # No .grad outside this update: a trainer optimiser holding this parameter must skip it.
        self._optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():
            stepped = weights[idx].clamp_min(_EPS)
            # Absent tasks keep their weight (Adam's momentum would move them); the present ones share
            # what is left of T, which also stops rounding drift of the sum.
            present_total = len(self.tasks) - (before.sum() - before[idx].sum())
            weights.copy_(before)
            weights[idx] = stepped * present_total / stepped.sum()

    def _grad_norm(self, task: str, loss: Tensor) -> Tensor:
        """``‖∇_W L_t‖₂`` over all shared parameters, detached."""
        grads = torch.autograd.grad(loss, self.shared_parameters, retain_graph=True, allow_unused=True)
        used = [g.detach() for g in grads if g is not None]
        if not used:
            raise ValueError(f"the loss of task {task!r} does not depend on GradNorm's shared parameters")
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in used]))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.task_weights.tolist()))

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "optimizer": self._optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        # A deep copy: Optimizer.load_state_dict keeps the given tensors, and two live balancers must
        # not share Adam moments.
        self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


def make_balancer(
    cfg: BalancerConfig, tasks: Sequence[str], shared_parameters: Iterable[Tensor] | None = None
) -> LossBalancer:
    """The balancer ``cfg`` describes, over ``tasks``.

    Args:
        cfg: ``train.balancer``. ``temperature`` None takes the method's default; fixed weights for
            tasks outside ``tasks`` are ignored (a subset of heads trained with a shared config).
        tasks: the task names trained.
        shared_parameters: the last shared layer's parameters; required by ``gradnorm`` only.
    """
    temperature = {} if cfg.temperature is None else {"temperature": cfg.temperature}
    if cfg.kind == "fixed":
        return FixedBalancer(tasks, {task: w for task, w in cfg.weights.items() if task in tasks})
    if cfg.kind == "inverse_rate":
        return InverseRateBalancer(tasks, **temperature, warmup_epochs=cfg.warmup_epochs, window=cfg.window)
    if cfg.kind == "uncertainty":
        return UncertaintyBalancer(tasks)
    if cfg.kind == "dwa":
        return DWABalancer(tasks, **temperature)
    if cfg.kind == "gradnorm":
        if shared_parameters is None:
            raise ValueError("balancer kind 'gradnorm' needs shared_parameters (the last shared layer)")
        return GradNormBalancer(tasks, shared_parameters, alpha=cfg.alpha, lr=cfg.lr)
    allowed = get_args(BalancerConfig.model_fields["kind"].annotation)
    raise ValueError(f"unknown balancer kind {cfg.kind!r}; expected one of {list(allowed)}")
