"""Training logs: a metrics JSONL file, TensorBoard events and a tqdm progress bar.

In a run directory: ``metrics.jsonl`` (one JSON object per logged step: ``{"step": ..., "loss": ...}``)
and ``tb/`` (TensorBoard event files, written with tensorboardX). When a run resumes from step ``s``, the
lines after ``s`` written by the interrupted run are dropped from ``metrics.jsonl`` and TensorBoard is
told to purge them, so both show one clean curve.

Example:
    >>> import json, tempfile, pathlib
    >>> run_dir = pathlib.Path(tempfile.mkdtemp())
    >>> with MetricsLogger(run_dir, tensorboard=False) as log:
    ...     log.write(1, {"loss": 0.5, "lr/head": 1e-3})
    >>> json.loads((run_dir / "metrics.jsonl").read_text())
    {'step': 1, 'loss': 0.5, 'lr/head': 0.001}
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tqdm


def to_python(value: Any) -> Any:
    """Converts arrays/NumPy scalars to JSON-serialisable Python values (scalars, nested lists)."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        item = arr.item()
        if isinstance(item, float) and not math.isfinite(item):
            return str(item)  # JSON has no NaN/inf
        return item
    return arr.tolist()


class MetricsLogger:
    """Writes metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard events to ``<run_dir>/tb``.

    Args:
      run_dir: the run directory (created if missing).
      start_step: the step training starts from (a resumed run): logged lines with a larger step are dropped.
      tensorboard: also write TensorBoard events (scalars only).
    """

    def __init__(self, run_dir: str | Path, *, start_step: int = 0, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it pulls in protobuf

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
        self.path.write_text("".join(x + "\n" for x in kept))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one line ``{"step": step, **metrics}`` and the scalar metrics to TensorBoard."""
        values = {k: to_python(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        """Flushes and closes the files."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar over global steps showing the stage, loss, learning rate and examples per second.

    Example:
        >>> bar = ProgressBar(total=10, initial=0, enabled=False)
        >>> rate = bar.update(1, loss=0.25, lr=1e-3, examples=8)
        >>> bar.close()
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True) -> None:
        self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")
        self._last = time.perf_counter()

    def set_stage(self, name: str) -> None:
        """Shows the current stage's name."""
        self._bar.set_description(name)

    def update(self, steps: int, *, loss: float, lr: float, examples: int) -> float:
        """Advances by ``steps``; returns examples per second since the previous update."""
        now = time.perf_counter()
        rate = examples / max(now - self._last, 1e-9)
        self._last = now
        self._bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", ex_per_s=f"{rate:.1f}", refresh=False)
        self._bar.update(steps)
        return rate

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()
