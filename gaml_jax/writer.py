"""One small metric writer for process 0: JSONL (``metrics.jsonl``) and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax


class MetricWriter:
    """Appends ``{"step": s, "split": ..., **scalars}`` lines and TensorBoard scalars.

    Only process 0 writes; on other processes every call is a no-op.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.active = jax.process_index() == 0
        self._tb = None
        if not self.active:
            return
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        except ImportError:  # TensorBoard events are optional; JSONL is always written.
            self._tb = None

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
