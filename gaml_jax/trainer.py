"""The training loop: data, model, the parallel GAML step, evaluation of every exit, checkpoints.

``train.py`` parses flags and calls :func:`train_and_evaluate`; nothing else lives there.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gaml_jax import data as data_lib
from gaml_jax.checkpoints import Checkpointer, write_run_metadata
from gaml_jax.evaluation import exit_scores, make_predict_fn, predict_exits
from gaml_jax.train_step import (
    GRAD_MODES,
    METHODS,
    TrainState,
    create_train_state,
    data_mesh,
    make_optimizer,
    replicate,
    shard_batch,
    shard_map_step,
    train_step,
)
from gaml_jax.weights import load_pretrained, load_tokenizer
from gaml_jax.writer import MetricWriter


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 compute on accelerators, float32 on the CPU."""
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any data or model is loaded, on values no run can use."""
    t = config.train
    if t.method not in METHODS:
        raise ValueError(
            f"train.method={t.method!r} is not one of {METHODS} (ce: plain multi-exit, ml: + mutual "
            "learning, gaml: + gradient alignment)."
        )
    if t.grad_mode not in GRAD_MODES:
        raise ValueError(f"train.grad_mode={t.grad_mode!r} is not one of {GRAD_MODES}.")
    n = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        if t[key] <= 0 or t[key] % n:
            raise ValueError(
                f"train.{key}={t[key]} must be a positive multiple of the {n} devices; "
                f"set --config.train.{key} to a multiple of {n}."
            )
    if t.num_epochs <= 0 and not t.num_train_steps:
        raise ValueError("Set train.num_epochs > 0 or train.num_train_steps > 0.")
    if t.temperature <= 0:
        raise ValueError(f"train.temperature must be > 0, got {t.temperature}.")


def _mean_metrics(history: list[dict[str, jax.Array]], first_step: int) -> dict[str, float]:
    """Example-weighted means of the per-step metrics (one host transfer per log step).

    ``first_step`` is the step number of ``history[0]``; ``first_bad_step`` names the first step
    whose loss or parameters were not finite (0 if none).
    """
    host = jax.device_get(history)
    counts = np.array([m["count"] for m in host], np.float64)
    total = max(counts.sum(), 1.0)
    out: dict[str, float] = {
        "ce": float(np.dot(counts, [m["ce"] for m in host]) / total),
        "kd": float(np.dot(counts, [m["kd"] for m in host]) / total),
        "grad_norm_ce": float(np.mean([m["grad_norm_ce"] for m in host])),
    }
    finite = [np.isfinite(m["ce"]) and np.isfinite(m["kd"]) and m["params_finite"] > 0 for m in host]
    out["first_bad_step"] = 0 if all(finite) else first_step + finite.index(False)
    for key in ("grad_cosine", "projected"):
        if key in host[0]:
            out[key] = float(np.mean([m[key] for m in host]))
    exit_correct = np.sum([m["exit_correct"] for m in host], axis=0)
    for k, correct in enumerate(exit_correct):
        out[f"train_accuracy_exit{k}"] = float(correct / total)
    return out


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after_step: int | None = None
):
    """Trains ``config`` into ``workdir`` (resuming from its latest checkpoint) and returns the last
    dev evaluation: ``{split: [metrics of exit 0, exit 1, ...]}``.

    ``stop_after_step`` ends the run right after that step's checkpoint, as a kill would (tests).
    """
    check_config(config)
    workdir = Path(workdir).absolute()
    t = config.train
    tokenizer = load_tokenizer(config.model.name)
    task, splits = data_lib.load_task(config.data, tokenizer)
    bucket_kw = dict(buckets=tuple(config.data.length_buckets), max_length=config.data.max_length)
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())

    overrides = {k: v for k, v in config.model.items() if k not in ("name", "dtype") and v is not None}
    model, params = load_pretrained(
        config.model.name,
        num_labels=task.num_labels,
        seed=t.seed,
        dtype=resolve_dtype(config.model.dtype),
        **overrides,
    )
    train_split = splits[task.train_split]
    steps_per_epoch = data_lib.steps_per_epoch(train_split, t.batch_size)
    total_steps = int(t.num_train_steps or steps_per_epoch * t.num_epochs)
    tx = make_optimizer(
        method=t.method,
        total_steps=total_steps,
        learning_rate=t.learning_rate,
        exit_learning_rate=t.exit_learning_rate,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        grad_clip_norm=t.grad_clip_norm,
        kd_weight=t.kd_weight,
        per_tensor_alignment=t.per_tensor_alignment,
    )
    state = create_train_state(params, tx)

    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
    start_step = ckpt.latest_step() or 0
    if start_step:
        params, opt_state = ckpt.restore(start_step, state.params, state.opt_state)
        state = TrainState(step=np.int32(start_step), params=params, opt_state=opt_state)
        if jax.process_index() == 0:
            print(f"Resuming {workdir} from its checkpoint at step {start_step} of {total_steps}.")
    elif jax.process_index() == 0:
        write_run_metadata(
            workdir, model_config=model.config, task=task, run_config=config.to_dict(), tokenizer=tokenizer
        )

    mesh = data_mesh()
    state = replicate(state, mesh)
    step_fn = shard_map_step(
        functools.partial(
            train_step,
            model=model,
            tx=tx,
            temperature=t.temperature,
            exit_weighting=t.exit_weighting,
            grad_mode=t.grad_mode,
        ),
        mesh,
    )
    predict_fn = make_predict_fn(model)
    rng = jax.random.key(t.seed)
    writer = MetricWriter(workdir)

    def evaluate(step: int) -> tuple[dict[str, list[dict[str, float]]], float]:
        results = {}
        for split_name in task.eval_splits:
            batches = data_lib.eval_batches(splits[split_name], t.eval_batch_size, **bucket_kw, **proc)
            exit_logits, labels = predict_exits(
                predict_fn, state.params, batches, put=lambda b: shard_batch(b, mesh)
            )
            results[split_name] = scores = exit_scores(task.metrics, exit_logits, labels)
            for k, exit_metrics in enumerate(scores):
                writer.write(step, f"{split_name}/exit{k}", exit_metrics)
        # The checkpoint's score: the deepest exit's main metric on the first dev split.
        score = results[task.eval_splits[0]][-1][task.main_metric]
        return results, score

    batches = data_lib.train_batches(
        train_split,
        t.batch_size,
        seed=t.seed,
        start_step=start_step,
        length_group_batches=config.data.length_group_batches,
        **bucket_kw,
        **proc,
    )
    history: list[dict[str, jax.Array]] = []
    results: dict[str, list[dict[str, float]]] = {}
    progress = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    )
    progress.set_postfix_str("compiling the step (first call)...")
    tick, examples = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        state, metrics = step_fn(state, shard_batch(next(batches), mesh), rng)
        history.append(metrics)
        examples += t.batch_size
        progress.update(1)
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0 or done == total_steps
        if done % t.log_every == 0 or end_of_epoch or done % t.checkpoint_every == 0:
            summary = _mean_metrics(history, first_step=done - len(history) + 1)
            history = []
            bad_step = summary.pop("first_bad_step")
            if bad_step:
                raise FloatingPointError(
                    f"The loss or the parameters became NaN/Inf at step {bad_step} "
                    f"(mean CE {summary['ce']}, KD {summary['kd']}); stopping. The last good checkpoint "
                    f"(step {ckpt.latest_step()}) is kept in {workdir}. Lower train.learning_rate "
                    "or check the data."
                )
            elapsed = time.perf_counter() - tick
            summary["examples_per_s"] = examples / max(elapsed, 1e-9)
            summary["learning_rate_step"] = done
            tick, examples = time.perf_counter(), 0
            writer.write(done, "train", summary)
            progress.set_postfix(
                ce=f"{summary['ce']:.4f}", kd=f"{summary['kd']:.4f}", ex_s=f"{summary['examples_per_s']:.1f}"
            )
        if end_of_epoch:
            results, score = evaluate(done)
            line = " ".join(f"{m[task.main_metric]:.4f}" for m in results[task.eval_splits[0]])
            progress.write(
                f"step {done} (epoch {math.ceil(done / steps_per_epoch)}): dev {task.main_metric} "
                f"by exit: {line}"
            )
            ckpt.save(done, state.params, state.opt_state, score=score)
        elif done % t.checkpoint_every == 0:
            ckpt.save(done, state.params, state.opt_state)
        if stop_after_step is not None and done >= stop_after_step:
            break
    progress.close()
    writer.close()
    ckpt.close()
    return results
