"""Checkpoints of a training run: orbax ``CheckpointManager`` under ``WORKDIR/checkpoints``.

Each checkpoint holds the parameters and the optimizer state (the step is its name), so a
killed run resumes where it stopped. Orbax writes into a temporary folder and renames it
when complete: a checkpoint is never half-written. The last ``keep`` checkpoints are kept,
and the best one by dev score; ``best.json`` names it.

The best is decided here, not by orbax's ``BestN`` (which breaks ties and NaN scores its own
way): the preservation policy keeps whatever step ``best.json`` names, and a new best is saved
before ``best.json`` moves to it and the old best is deleted after, so ``best.json`` always
names a checkpoint on disk, even if the run is killed in between. The earlier of equal scores
stays the best; a NaN (or infinite) score never becomes it.

The run's static description (model config, task, run config, tokenizer) is written once
beside them so that ``eval.py`` needs nothing but the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gaml_jax.config import ModelConfig
from gaml_jax.model import MultiExitBert

PyTree = Any

MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "config.json"
TASK_FILE = "task.json"
BEST_FILE = "best.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Writes JSON through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


class _LatestAndProtected:
    """Orbax preservation policy: the last ``keep`` checkpoints and the steps in ``protected``."""

    def __init__(self, keep: int):
        self.keep = max(keep, 1)  # the latest checkpoint is what a killed run resumes from
        self.protected: set[int] = set()

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        first_kept = len(checkpoints) - self.keep  # orbax lists them by increasing step
        return [i >= first_kept or c.step in self.protected for i, c in enumerate(checkpoints)]


class LayoutError(ValueError):
    """A checkpoint whose trees (parameters, optimizer state) are not those the code builds."""


class Checkpointer:
    """Saves and restores ``(params, opt_state)`` by step; keeps the last ``keep`` and the best."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        self.workdir = Path(workdir).absolute()
        path = self.workdir / BEST_FILE
        # Held in memory: every process decides the same best from the same scores.
        self._best: dict | None = json.loads(path.read_text()) if path.exists() else None
        self._policy = _LatestAndProtected(keep)
        if self._best is not None:
            self._policy.protected = {int(self._best["step"])}
        self.manager = ocp.CheckpointManager(
            self.workdir / CHECKPOINT_DIR,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=self._policy, enable_async_checkpointing=False, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best(self) -> dict | None:
        """``{"step": ..., "score": ...}`` of the best checkpoint, or None before any dev score."""
        return self._best

    def save(self, step: int, params: PyTree, opt_state: PyTree, score: float | None = None) -> None:
        """Saves at ``step``; with a dev ``score`` (higher is better) it may become the best."""
        old = self._best
        new_best = (
            score is not None
            and math.isfinite(score)
            and (old is None or not math.isfinite(old["score"]) or float(score) > old["score"])
        )
        if new_best:
            self._policy.protected.add(int(step))  # both kept until best.json names the new one
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        if not new_best:
            return
        self._best = {"step": int(step), "score": float(score)}
        write_json_atomic(self.workdir / BEST_FILE, self._best)
        self._policy.protected = {int(step)}
        steps = self.manager.all_steps()
        if old is not None and old["step"] in steps and old["step"] not in steps[-self._policy.keep :]:
            self.manager.delete(old["step"])

    def restore(self, step: int, params: PyTree, opt_state: PyTree | None = None) -> tuple[PyTree, PyTree]:
        """Restores into the structure (and shardings) of ``params`` / ``opt_state``.

        With ``opt_state=None`` only the parameters are read (evaluation).
        """
        items = {"params": ocp.args.StandardRestore(_abstract(params))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as error:
            if "structures do not match" not in str(error):  # orbax's words for another tree
                raise
            raise LayoutError(
                f"the checkpoint at step {step} in {self.workdir} holds parameters or an optimizer "
                "state structured otherwise than this code builds them"
            ) from error
        return restored["params"], restored.get("opt_state") if opt_state is not None else None

    def close(self) -> None:
        self.manager.close()


def _abstract(tree: PyTree) -> PyTree:
    """Shapes and dtypes to restore into. Leaves without a sharding (host arrays, eval_shape
    results) are read whole onto this process's first device, whatever topology saved them
    (8 GPUs, 2 hosts, ...); the caller places them from there."""
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        struct = ocp.utils.to_shape_dtype_struct(x)
        if getattr(struct, "sharding", None) is None:
            struct = jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=local)
        return struct

    return jax.tree.map(leaf, tree)


def write_run_metadata(
    workdir: str | os.PathLike, *, model_config: ModelConfig, task: Any, run_config: dict, tokenizer: Any
) -> None:
    """The run's static description, written once at the start of a fresh run."""
    workdir = Path(workdir)
    write_json_atomic(workdir / MODEL_CONFIG_FILE, dataclasses.asdict(model_config))
    write_json_atomic(workdir / TASK_FILE, dataclasses.asdict(task))
    write_json_atomic(workdir / RUN_CONFIG_FILE, run_config)
    tokenizer.save_pretrained(str(workdir / TOKENIZER_DIR))


def read_model_config(workdir: str | os.PathLike) -> ModelConfig:
    fields = json.loads((Path(workdir) / MODEL_CONFIG_FILE).read_text())
    if fields.get("exit_layers") is not None:
        fields["exit_layers"] = tuple(fields["exit_layers"])
    return ModelConfig(**fields)


def load_trained(workdir: str | os.PathLike, which: str = "best") -> tuple[MultiExitBert, PyTree, int]:
    """The model and parameters of a training run: its ``best`` checkpoint (by dev score) or its
    ``latest``. Raises FileNotFoundError, naming the fix, where the workdir holds none."""
    workdir = Path(workdir).absolute()
    if not (workdir / MODEL_CONFIG_FILE).exists() or not (workdir / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(
            f"{workdir} holds no gaml-jax training run (no {MODEL_CONFIG_FILE} or {CHECKPOINT_DIR}/). "
            "Train one first: python train.py --workdir " + str(workdir)
        )
    ckpt = Checkpointer(workdir)
    try:
        best = ckpt.best()
        step = best["step"] if which == "best" and best else ckpt.latest_step()
        if step is not None and step not in ckpt.manager.all_steps():
            raise FileNotFoundError(
                f"{workdir / BEST_FILE} names step {step}, which is not in {workdir / CHECKPOINT_DIR} "
                "(a run written before the best checkpoint was always kept): evaluate the latest "
                "checkpoint instead (eval.py --checkpoint latest)."
            )
        if step is None:
            raise FileNotFoundError(
                f"{workdir / CHECKPOINT_DIR} holds no complete checkpoint yet: let train.py run to its "
                "first checkpoint (train.checkpoint_every steps, or the end of an epoch)."
            )
        model = MultiExitBert(read_model_config(workdir))
        abstract = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jax.numpy.ones((1, 8), jax.numpy.int32))["params"]
        )
        params, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return model, params, step
