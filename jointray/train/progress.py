"""Human-readable progress: one line per epoch, and the final summary table."""

from __future__ import annotations

import math

from rich.table import Table

_SHOWN_VALIDATION = ("val/dice", "val/mmse_mae", "val/cdr_qwk", "val/c_index", "val/score")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def epoch_line(metrics: dict[str, float], epochs: int | None) -> str:
    """``epoch 3/20 | loss seg 0.41 mmse 1.2 | w seg 0.9 mmse 1.1 | val dice 0.81 ... | 12.3 cases/s | eta 2m10s``
    (``epoch 3 | ...`` when a time budget, not an epoch count, ends the run)."""
    losses = " ".join(f"{k.removeprefix('train/')} {v:.3f}" for k, v in sorted(metrics.items())
                      if k.startswith("train/"))
    weights = " ".join(f"{k.removeprefix('weight/')} {v:.2f}" for k, v in sorted(metrics.items())
                       if k.startswith("weight/"))
    val = " ".join(f"{k.removeprefix('val/')} {metrics[k]:.3f}" for k in _SHOWN_VALIDATION
                   if k in metrics and not math.isnan(metrics[k]))
    of = f"/{epochs}" if epochs is not None else ""
    val = f"val {val} | " if val else ""  # an epoch of the "all" fold that was not validated
    skipped = int(metrics.get("skipped_steps", 0))
    skipped = f"{skipped} step(s) skipped (gradient not finite) | " if skipped else ""
    return (f"epoch {int(metrics['epoch']) + 1}{of} | loss {losses} | w {weights} | {val}{skipped}"
            f"{metrics['cases_per_s']:.1f} cases/s | eta {_duration(metrics['eta_s'])}")


def summary_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(k for k in metrics if k.startswith("val/")):
        table.add_row(key, f"{metrics[key]:.4f}")
    for key in ("epoch", "step", "cases_per_s", "elapsed_s"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.1f}")
    return table
