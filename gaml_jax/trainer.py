"""The training loop: data, model, the parallel GAML step, evaluation of every exit, checkpoints.

``train.py`` parses flags and calls :func:`train_and_evaluate`; nothing else lives there.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gaml_jax import data as data_lib
from gaml_jax.checkpoints import (
    CHECKPOINT_DIR,
    RUN_CONFIG_FILE,
    Checkpointer,
    LayoutError,
    write_json_atomic,
    write_run_metadata,
)
from gaml_jax.compilation import CompiledAhead, compile_ahead
from gaml_jax.evaluator import exit_scores, make_predict_fn, predict_exits
from gaml_jax.tasks import TaskInfo
from gaml_jax.train_step import (
    GRAD_MODES,
    METHODS,
    TrainState,
    create_train_state,
    data_mesh,
    dropout_key,
    learning_rate_schedule,
    make_optimizer,
    pmap_replicate,
    pmap_step,
    regroup_flat_state,
    replicate,
    shard_batch,
    shard_map_step,
    split_for_pmap,
    train_step,
)
from gaml_jax.weights import load_pretrained, load_tokenizer
from gaml_jax.writer import MetricWriter

PARALLEL_FORMS = ("shard_map", "pmap")

# Whether a shard_map run compiles its programs (the train step for every padded length it will
# meet, the evaluation for every dev length) before its first step, several at once
# (compilation.compile_ahead). False: each compiles when first called, one at a time.
COMPILE_AHEAD = True

# Fields a resumed run may change: they alter neither the data, the model nor the updates, only how
# often the run logs and checkpoints, where tokens are cached, how dev batches are cut, and how the
# same step is parallelised, differentiated or compiled (scanned or unrolled layers).
RESUMABLE_CHANGES = frozenset(
    {
        "data.cache_dir",
        "model.scan_layers",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.eval_batch_size",
        "train.parallel",
        "train.grad_mode",
    }
)
# Fields that `extend=True` (train.py --extend) lets a resumed run change: the run's length.
EXTENSIONS = frozenset({"train.num_train_steps", "train.num_epochs"})
# Fields added to the config after runs were saved without them, each with the value that computes
# what the code before it computed: a saved run that lacks one is compared as if it held that
# value, so it resumes under that value and is refused under another.
ADDED_FIELDS = {"model.float32_residual": False}


class ConfigError(ValueError):
    """A config that cannot run in this workdir; the message names the fields and the fix."""


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
    # 0 is allowed for these (a learning rate of 0 freezes that part); a negative value would
    # train in the wrong direction, or be taken as "off" somewhere without a word.
    for key in (
        "learning_rate",
        "exit_learning_rate",
        "warmup_steps",
        "weight_decay",
        "grad_clip_norm",
        "kd_weight",
        "num_train_steps",
    ):
        if not (math.isfinite(t[key]) and t[key] >= 0):
            raise ValueError(f"train.{key} must be a number >= 0, got {t[key]}; set --config.train.{key}.")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):  # counts: 0 would mean never
        if t[key] < 1:
            raise ValueError(f"train.{key} must be >= 1, got {t[key]}; set --config.train.{key}.")
    if t.parallel not in PARALLEL_FORMS:
        raise ValueError(f"train.parallel={t.parallel!r} is not one of {PARALLEL_FORMS}.")
    if t.parallel == "pmap" and jax.process_count() > 1:
        raise ValueError(
            "train.parallel='pmap' maps over one host's devices only; multi-host runs need "
            "--config.train.parallel=shard_map."
        )


def _restore_all_flat(ckpt: Checkpointer, step: int, state: TrainState, optimizer: dict) -> tuple | None:
    """``(params, opt_state)`` of a checkpoint whose flat optimizer state has every tensor
    concatenated (gaml-jax before 2026-12-06, when large tensors became groups of their own),
    regrouped as this code's optimizer lays it out; None if the checkpoint is not of that form."""
    if optimizer["per_tensor_alignment"]:  # the tree form: its layout has not changed
        return None
    saved = jax.eval_shape(make_optimizer(**optimizer, own_group_size=None).init, state.params)
    try:
        params, opt_state = ckpt.restore(step, state.params, saved)
    except LayoutError:
        return None
    if jax.process_index() == 0:
        print(f"The optimizer state at step {step} is laid out as before 2026-12-06: regrouped to resume.")
    return params, regroup_flat_state(opt_state, params, state.opt_state)


def _flat_items(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_saved(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as ``config.json`` holds it (tuples as lists, odd values as strings)."""
    return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))


def check_resume(
    config: ml_collections.ConfigDict, workdir: Path, step: int, *, extend: bool = False
) -> bool:
    """Compares ``config`` with the ``config.json`` of the run in ``workdir`` (at ``step``).

    Raises ConfigError naming the fields that differ where the run cannot go on under the new
    config. Returns True where ``config.json`` must be rewritten (only fields in
    ``RESUMABLE_CHANGES``, or with ``extend`` the run's length, differ).
    """
    path = workdir / RUN_CONFIG_FILE
    if not path.exists():
        raise ConfigError(
            f"{workdir} holds checkpoints but no {RUN_CONFIG_FILE} (not a train.py workdir, or a damaged "
            "one): train in a new --workdir."
        )
    missing = "(absent)"
    saved = {**ADDED_FIELDS, **_flat_items(json.loads(path.read_text()))}
    new = _flat_items(_as_saved(config))
    changed = sorted(k for k in saved.keys() | new.keys() if saved.get(k, missing) != new.get(k, missing))
    allowed = RESUMABLE_CHANGES | (EXTENSIONS if extend else frozenset())
    refused = [k for k in changed if k not in allowed]
    if refused:

        def show(flat: dict, key: str) -> str:
            return json.dumps(flat[key]) if key in flat else missing

        diff = ", ".join(f"{k} {show(saved, k)} -> {show(new, k)}" for k in refused)
        how = (
            "--extend permits changing only train.num_train_steps and train.num_epochs"
            if extend
            else "to train it longer, change only train.num_train_steps or train.num_epochs and add --extend"
        )
        raise ConfigError(
            f"{workdir} holds a run (at step {step}) with another config: {diff}. Resume it with its own "
            f"config ({path}), or train in a new --workdir; {how}."
        )
    return bool(changed)


def _latest_step(workdir: Path) -> int:
    """The step of the workdir's latest checkpoint, 0 if none (creates nothing)."""
    if not (workdir / CHECKPOINT_DIR).is_dir():
        return 0
    ckpt = Checkpointer(workdir)
    try:
        return ckpt.latest_step() or 0
    finally:
        ckpt.close()


def _logged_results(workdir: Path, splits: tuple[str, ...]) -> dict[str, list[dict[str, float]]]:
    """The last dev evaluation that ``metrics.jsonl`` holds: ``{split: [metrics of each exit]}``."""
    path = workdir / "metrics.jsonl"  # MetricWriter's file
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    results = {}
    for split in splits:
        rows = [line for line in lines if line["split"].startswith(f"{split}/exit")]
        if rows:
            last = max(row["step"] for row in rows)
            by_exit = {
                int(row["split"].rsplit("exit", 1)[1]): {
                    k: v for k, v in row.items() if k not in ("step", "split")
                }
                for row in rows
                if row["step"] == last
            }
            results[split] = [by_exit[k] for k in sorted(by_exit)]
    return results


class _Parallel(NamedTuple):
    """How the step is spread over the devices (``train.parallel``)."""

    step: Callable  # (device state, device batch, rng) -> (device state, metrics)
    put_state: Callable  # host TrainState -> device state
    put_batch: Callable  # this process's host batch -> device batch
    unreplicate: Callable  # device state or host metrics -> one copy (checkpoints, logs)
    eval_params: Callable  # device state -> params replicated over the mesh (evaluation)


def _batch_shape(*args) -> tuple[int, ...]:
    """The program a call of the step (state, batch, rng) or of predict (params, batch) needs: its
    batch's shape (the length bucket; the batch size is the run's)."""
    return args[1]["input_ids"].shape


def _parallel(form: str, step_fn: Callable, mesh: jax.sharding.Mesh) -> _Parallel:
    if form == "shard_map":
        return _Parallel(
            # Compiled ahead, for every length the run will meet, before the first step.
            step=CompiledAhead(shard_map_step(step_fn, mesh), key=_batch_shape),
            put_state=lambda state: replicate(state, mesh),
            put_batch=lambda batch: shard_batch(batch, mesh),
            unreplicate=lambda tree: tree,  # global arrays, replicated over the mesh
            eval_params=lambda state: state.params,
        )
    n = jax.local_device_count()

    def first(tree):
        return jax.tree.map(lambda x: x[0], tree)  # replicas are identical

    return _Parallel(
        step=pmap_step(step_fn),
        put_state=lambda state: pmap_replicate(state, n),
        put_batch=lambda batch: split_for_pmap(batch, n),
        unreplicate=first,
        eval_params=lambda state: replicate(jax.device_get(first(state.params)), mesh),
    )


def _mean_metrics(host: list[dict[str, np.ndarray]], first_step: int) -> dict[str, float]:
    """Example-weighted means of the per-step metrics (fetched in one host transfer per log step).

    ``first_step`` is the step number of ``host[0]``; ``first_bad_step`` names the first step
    whose loss or parameters were not finite (0 if none).
    """
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
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    extend: bool = False,
    stop_after_step: int | None = None,
):
    """Trains ``config`` into ``workdir`` (resuming from its latest checkpoint) and returns the last
    dev evaluation: ``{split: [metrics of exit 0, exit 1, ...]}``.

    A workdir that holds a run resumes it only under the same config (see :func:`check_resume`);
    ``extend`` lets the resumed run change its length (``train.num_train_steps`` /
    ``train.num_epochs``). A finished run is not trained again: its logged results are returned.
    ``stop_after_step`` ends the run right after that step's checkpoint, as a kill would (tests).
    """
    check_config(config)
    workdir = Path(workdir).absolute()
    t = config.train
    start_step = _latest_step(workdir)
    rewrite_config = start_step > 0 and check_resume(config, workdir, start_step, extend=extend)
    tokenizer = load_tokenizer(config.model.name)
    task, splits = data_lib.load_task(config.data, tokenizer)
    bucket_kw = dict(buckets=tuple(config.data.length_buckets), max_length=config.data.max_length)
    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_split = splits[task.train_split]
    steps_per_epoch = data_lib.steps_per_epoch(train_split, t.batch_size)
    total_steps = int(t.num_train_steps or steps_per_epoch * t.num_epochs)
    if start_step >= total_steps:
        return _report_finished(workdir, task, start_step, total_steps)

    overrides = {k: v for k, v in config.model.items() if k not in ("name", "dtype") and v is not None}
    model, params = load_pretrained(
        config.model.name,
        num_labels=task.num_labels,
        seed=t.seed,
        dtype=resolve_dtype(config.model.dtype),
        **overrides,
    )
    optimizer = dict(
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
    tx = make_optimizer(**optimizer)
    state = create_train_state(params, tx)
    # The rate of update s is schedule(s - 1) (optax counts from 0). Tabulated once, before the
    # loop, with the optimizer's own schedule (one compiled program): logging never waits on it.
    schedules = {
        key: learning_rate_schedule(t[key], t.warmup_steps, total_steps)
        for key in ("learning_rate", "exit_learning_rate")
    }
    rates = jax.device_get(
        jax.jit(lambda: {key: jax.vmap(s)(jnp.arange(total_steps)) for key, s in schedules.items()})()
    )

    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
    if start_step:
        try:
            params, opt_state = ckpt.restore(start_step, state.params, state.opt_state)
        except LayoutError as error:  # e.g. a run saved before the optimizer state went flat
            restored = _restore_all_flat(ckpt, start_step, state, optimizer)
            if restored is None:
                raise ConfigError(
                    f"{error}: it was written by another version of gaml-jax and cannot resume; train in "
                    "a new --workdir (eval.py and predict.py still read its parameters)."
                ) from None
            params, opt_state = restored
        state = TrainState(step=np.int32(start_step), params=params, opt_state=opt_state)
        if jax.process_index() == 0:
            if rewrite_config:  # allowed changes: config.json describes the run as it goes on
                write_json_atomic(workdir / RUN_CONFIG_FILE, config.to_dict())
            print(f"Resuming {workdir} from its checkpoint at step {start_step} of {total_steps}.")
    elif jax.process_index() == 0:
        write_run_metadata(
            workdir, model_config=model.config, task=task, run_config=config.to_dict(), tokenizer=tokenizer
        )

    mesh = data_mesh()
    parallel = _parallel(
        t.parallel,
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
    state = parallel.put_state(state)
    predict_fn = CompiledAhead(make_predict_fn(model), key=_batch_shape)
    rng = dropout_key(t.seed)
    writer = MetricWriter(workdir)

    def evaluate(step: int) -> tuple[dict[str, list[dict[str, float]]], float]:
        results = {}
        params = parallel.eval_params(state)
        for split_name in task.eval_splits:
            batches = data_lib.eval_batches(splits[split_name], t.eval_batch_size, **bucket_kw, **proc)
            exit_logits, labels = predict_exits(
                predict_fn, params, batches, put=lambda b: shard_batch(b, mesh)
            )
            results[split_name] = scores = exit_scores(task.metrics, exit_logits, labels)
            for k, exit_metrics in enumerate(scores):
                writer.write(step, f"{split_name}/exit{k}", exit_metrics)
        # The checkpoint's score: the deepest exit's main metric on the first dev split.
        score = results[task.eval_splits[0]][-1][task.main_metric]
        return results, score

    def save(step: int, score: float | None = None) -> None:
        one = parallel.unreplicate(state)
        ckpt.save(step, one.params, one.opt_state, score=score)

    ahead = COMPILE_AHEAD and t.parallel == "shard_map"
    if ahead:
        last = total_steps  # the run's last step, and whether it evaluates (end of an epoch, or of the run)
        if stop_after_step is not None:
            last = max(min(stop_after_step, total_steps), start_step + 1)
        evaluates = last == total_steps or last // steps_per_epoch > start_step // steps_per_epoch
        _compile_ahead(
            parallel, state, rng, predict_fn, config, splits, task, (start_step, last), evaluates, mesh
        )
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
    if not ahead:
        progress.set_postfix_str("compiling the step (first call)...")
    tick, examples = time.perf_counter(), 0
    for step in range(start_step, total_steps):
        state, metrics = parallel.step(state, parallel.put_batch(next(batches)), rng)
        history.append(metrics)
        examples += t.batch_size
        progress.update(1)
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0 or done == total_steps
        if done % t.log_every == 0 or end_of_epoch or done % t.checkpoint_every == 0:
            host = [parallel.unreplicate(m) for m in jax.device_get(history)]
            summary = _mean_metrics(host, first_step=done - len(history) + 1)
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
            summary.update({key: float(rate[done - 1]) for key, rate in rates.items()})
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
            save(done, score)
        elif done % t.checkpoint_every == 0:
            save(done)
        if stop_after_step is not None and done >= stop_after_step:
            break
    progress.close()
    writer.close()
    ckpt.close()
    return results


def _compile_ahead(parallel, state, rng, predict_fn, config, splits, task, steps, evaluates, mesh) -> None:
    """Compiles the train step for every padded length steps [first, last) will meet, and the
    evaluation's forward for every length of the dev splits when the run evaluates, several at once
    (compilation.compile_ahead). On a 2-core CPU the demo's training compiled in 10% less wall clock
    than with each program compiled when the loop first met it (two clean pairs of runs;
    docs/performance.md); with more cores than programs, it should approach the time of the slowest one."""
    t = config.train
    bucket_kw = dict(buckets=tuple(config.data.length_buckets), max_length=config.data.max_length)
    first, last = steps
    train_split = splits[task.train_split]
    local = t.batch_size // jax.process_count()
    lengths = data_lib.train_lengths(
        train_split,
        t.batch_size,
        last - first,
        seed=t.seed,
        start_step=first,
        length_group_batches=config.data.length_group_batches,
        **bucket_kw,
    )
    jobs = [
        (parallel.step, (state, parallel.put_batch(data_lib.batch_of_length(train_split, local, n)), rng))
        for n in lengths
    ]
    if evaluates:
        proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
        params, keys = parallel.eval_params(state), ("input_ids", "attention_mask", "token_type_ids")
        shapes = {}  # one batch of each shape the dev splits' batches take
        for split_name in task.eval_splits:
            for batch in data_lib.eval_batches(splits[split_name], t.eval_batch_size, **bucket_kw, **proc):
                shapes.setdefault(batch["input_ids"].shape, batch)
        for batch in shapes.values():
            jobs.append((predict_fn, (params, shard_batch({k: batch[k] for k in keys}, mesh))))
    with tqdm(
        total=len(jobs),
        desc=f"compiling (train step at lengths {', '.join(map(str, lengths))}"
        + (", evaluation)" if evaluates else ")"),
        unit="program",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    ) as bar:
        compile_ahead(jobs, progress=lambda: bar.update(1))


def _report_finished(
    workdir: Path, task: TaskInfo, step: int, total_steps: int
) -> dict[str, list[dict[str, float]]]:
    """A finished run is not trained again: says so, with the results it logged."""
    results = _logged_results(workdir, task.eval_splits)
    if jax.process_index() == 0:
        dev = task.eval_splits[0]
        scores = " ".join(f"{m[task.main_metric]:.4f}" for m in results.get(dev, []))
        print(
            f"{workdir} already finished at step {step} of {total_steps}; its {dev} {task.main_metric} "
            f"by exit: {scores or '(not logged)'}. To train it longer, raise train.num_train_steps "
            "(or train.num_epochs) and add --extend; to train again, use a new --workdir."
        )
    return results
