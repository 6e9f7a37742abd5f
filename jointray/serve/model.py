"""The model deployment: one :class:`~jointray.inference.predictor.Predictor` per replica, batched forward passes.

Requests arrive already prepared (the ingress decodes, validates and resamples on CPU), so a replica
spends its time in :meth:`ModelServer.forward`: ``@serve.batch`` gathers up to ``max_batch_size``
cases (or what arrived within ``batch_wait_timeout_s``), groups them by MC settings and runs each
group as one vectorised :meth:`Predictor.forward`. Batch size and wait come from ``user_config`` and
change through :meth:`reconfigure` without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any

import torch
from ray import serve

from jointray.config import InferenceConfig
from jointray.inference.cases import PreparedCase
from jointray.inference.forward import ForwardResult
from jointray.inference.predictor import Predictor

#: Batch sizes remembered for inspection (``batch_sizes``); older ones are dropped.
BATCH_HISTORY = 1000


class ModelUnusable(RuntimeError):
    """The replica's model can no longer answer (non-finite weights, or a failed forward pass)."""


@serve.deployment(name="ModelServer")
class ModelServer:
    def __init__(self, checkpoint: str, inference: dict[str, Any], threads: int):
        torch.set_num_threads(threads)
        self.predictor = Predictor(checkpoint, inference=InferenceConfig.model_validate(inference))
        self.history: collections.deque[int] = collections.deque(maxlen=BATCH_HISTORY)
        self.failure: str | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.forward.set_max_batch_size(int(user_config["max_batch_size"]))
        self.forward.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def forward(self, cases: list[PreparedCase], mc_samples: list[int],
                      mc_modes: list[str]) -> list[ForwardResult]:
        """One batch of prepared cases → their forward results, in order."""
        self.history.append(len(cases))
        return await asyncio.to_thread(self._forward, cases, mc_samples, mc_modes)

    def _forward(self, cases: list[PreparedCase], mc_samples: list[int], mc_modes: list[str]) -> list[ForwardResult]:
        results: list[ForwardResult | None] = [None] * len(cases)
        order = sorted(range(len(cases)), key=lambda i: (mc_samples[i], mc_modes[i]))
        for (samples, mode), group in itertools.groupby(order, key=lambda i: (mc_samples[i], mc_modes[i])):
            indices = list(group)
            try:
                outputs = self.predictor.forward([cases[i] for i in indices], samples, mode)
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: this replica may be unusable now
                self.failure = f"{type(exc).__name__}: {exc}"
                raise
            for i, output in zip(indices, outputs):
                results[i] = output
        return results  # type: ignore[return-value]

    def check_health(self) -> None:
        """Raise when the model cannot answer, so Serve replaces this replica."""
        if self.failure is not None:
            raise ModelUnusable(f"a forward pass failed: {self.failure}")
        for model in self.predictor.models:
            if not isinstance(model, torch.nn.Module):
                continue  # an exported graph: its weights are files checked against their hashes on load
            for name, parameter in model.named_parameters():
                if not bool(torch.isfinite(parameter).all()):
                    raise ModelUnusable(f"parameter {name} holds non-finite values")

    def ready(self) -> dict[str, Any]:
        """The model's identity, after the health check (``GET /healthz``)."""
        self.check_health()
        return {"version": self.predictor.version, "batch_sizes_seen": len(self.history)}

    def batch_sizes(self) -> list[int]:
        """Sizes of the most recent batches this replica ran."""
        return list(self.history)

