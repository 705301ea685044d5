"""The training loop: resume equals an uninterrupted run and checks its config, a finished run is
not trained again, NaN stops keep the last good checkpoint, bad configs fail before compute, pmap
trains what shard_map trains, and two processes (jax.distributed) compute what one does."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gaml_jax import train_step, trainer
from gaml_jax.checkpoints import Checkpointer
from gaml_jax.trainer import ConfigError, train_and_evaluate
from gaml_jax.weights import load_tokenizer
from tests import tiny


def _params_at(workdir, step):
    """The parameters of the checkpoint at ``step`` as host numpy arrays."""

    ckpt = Checkpointer(workdir)
    try:
        assert step in ckpt.manager.all_steps()
    finally:
        ckpt.close()
    return _restore(workdir, step)


def _restore(workdir, step):
    from gaml_jax.checkpoints import read_model_config
    from gaml_jax.model import MultiExitBert

    model = MultiExitBert(read_model_config(workdir))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.ones((1, 8), np.int32))["params"])
    ckpt = Checkpointer(workdir)
    try:
        params, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return jax.device_get(params)


def _assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y)


def _train_lines(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if "ce" in line}


def test_killed_run_resumes_as_if_never_stopped(tiny_assets, tmp_path):
    config = tiny.train_config(*tiny_assets, num_train_steps=6)
    config.model.hidden_dropout_prob = 0.2  # randomness that a resumed run must replay
    whole = tmp_path / "whole"
    train_and_evaluate(config, str(whole))
    killed = tmp_path / "killed"
    # Stopped after step 3: the latest checkpoint is step 2, so step 3 is redone on resume.
    train_and_evaluate(config, str(killed), stop_after_step=3)
    assert Checkpointer(killed).latest_step() == 2
    train_and_evaluate(config, str(killed))
    _assert_trees_equal(_params_at(killed, 6), _params_at(whole, 6))
    assert _train_lines(killed)[6]["ce"] == _train_lines(whole)[6]["ce"]
    # The params really moved: the test would pass vacuously on a frozen model.
    start = _params_at(whole, 2)
    assert (
        np.abs(start["classifier_0"]["kernel"] - _params_at(whole, 6)["classifier_0"]["kernel"]).max() > 1e-4
    )


def test_the_run_compiles_every_length_it_meets_before_its_first_step(tiny_assets, tmp_path, monkeypatch):
    """shard_map: the train step for each padded length the run's batches take, and the evaluation
    for each length of the dev batches, compile before the first batch is drawn, once each, and
    nothing compiles them during the loop (compilation.compile_ahead)."""
    config = tiny.train_config(*tiny_assets, num_train_steps=6)
    config.data.length_buckets = (8, 10, 12, 16)  # the tiny pairs are 6-16 tokens: several lengths
    compiles, at_first_batch, train_shapes = collections.Counter(), {}, []

    def listen(event, secs, fun_name="", **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[fun_name] += 1

    real = trainer.data_lib.train_batches

    def train_batches(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 0:
                at_first_batch.update(compiles)
            train_shapes.append(batch["input_ids"].shape)
            yield batch

    monkeypatch.setattr(trainer.data_lib, "train_batches", train_batches)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        train_and_evaluate(config, str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    dev = trainer.data_lib.load_task(config.data, load_tokenizer(config.model.name))[1]["validation"]
    dev_shapes = {
        b["input_ids"].shape
        for b in trainer.data_lib.eval_batches(dev, 8, buckets=(8, 10, 12, 16), max_length=16)
    }
    assert len(train_shapes) == 6 and len(set(train_shapes)) >= 2
    assert at_first_batch["jit(train_step)"] == compiles["jit(train_step)"] == len(set(train_shapes))
    assert at_first_batch["jit(predict)"] == compiles["jit(predict)"] == len(dev_shapes)


def test_nan_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(tiny_assets, tmp_path, monkeypatch):
    real = trainer.make_optimizer

    def blows_up_at_step_3(**kwargs):  # updates are infinite from the optimizer's third update on
        return optax.chain(real(**kwargs), optax.scale_by_schedule(lambda n: jnp.where(n >= 2, jnp.inf, 1.0)))

    monkeypatch.setattr(trainer, "make_optimizer", blows_up_at_step_3)
    config = tiny.train_config(*tiny_assets, num_train_steps=6)
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 3 .*last good checkpoint \(step 2\)"):
        train_and_evaluate(config, str(tmp_path))
    ckpt = Checkpointer(tmp_path)
    assert ckpt.manager.all_steps() == [2]
    ckpt.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params_at(tmp_path, 2)))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("method", "kd", "train.method='kd' is not one of"),
        ("grad_mode", "fwd", "train.grad_mode='fwd' is not one of"),
        ("batch_size", 12, "multiple of the 8 devices"),
        ("temperature", 0.0, "temperature must be > 0"),
        ("parallel", "vmap", "train.parallel='vmap' is not one of"),
    ],
)
def test_bad_train_config_fails_before_any_loading(tmp_path, key, value, message):
    config = tiny.train_config(tmp_path / "no-model", tmp_path / "no.csv", tmp_path / "no.csv")
    config.train[key] = value
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_bad_data_fails_before_compute(tiny_assets, tmp_path):
    checkpoint, train_file, dev_file = tiny_assets
    config = tiny.train_config(checkpoint, train_file, dev_file)
    config.data.task = "sst3"
    config.data.train_file = config.data.validation_file = None
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        train_and_evaluate(config, str(tmp_path / "run"))
    bad = tmp_path / "bad.csv"
    bad.write_text(dev_file.read_text().replace(",1\n", ",7\n", 1))
    config = tiny.train_config(checkpoint, train_file, bad)
    with pytest.raises(ValueError, match="label"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    """A tiny run trained to its end (4 steps, shard_map, a log line every step): its config
    maker, workdir and returned results. Tests must not change the workdir (copy it)."""

    def make_config():
        return tiny.train_config(*tiny_assets, num_train_steps=4, log_every=1)

    workdir = tmp_path_factory.mktemp("finished")
    results = train_and_evaluate(make_config(), str(workdir))
    return make_config, workdir, results


def test_learning_rates_are_logged_from_the_schedule(finished_run):
    make_config, workdir, _ = finished_run
    t = make_config().train
    lines = _train_lines(workdir)
    assert sorted(lines) == [1, 2, 3, 4]
    for step, line in lines.items():
        count = step - 1  # optax's count when update `step` is made
        for key in ("learning_rate", "exit_learning_rate"):
            if count < t.warmup_steps:
                expected = t[key] * count / t.warmup_steps
            else:
                expected = t[key] * (t.num_train_steps - count) / (t.num_train_steps - t.warmup_steps)
            assert line[key] == pytest.approx(expected, rel=1e-6, abs=1e-12), (step, key)
        assert "learning_rate_step" not in line


def test_a_finished_run_says_so_and_returns_its_results(finished_run, capsys):
    make_config, workdir, results = finished_run
    metrics_before = (workdir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train_and_evaluate(make_config(), str(workdir)) == results
    captured = capsys.readouterr()
    assert f"{workdir} already finished at step 4 of 4; its validation accuracy by exit: " in captured.out
    assert "compiling" not in captured.err  # no progress bar
    assert (workdir / "metrics.jsonl").read_text() == metrics_before


@pytest.mark.parametrize(
    ("key", "value", "extend", "named"),
    [
        ("learning_rate", 2e-3, False, "train.learning_rate 0.001 -> 0.002"),
        ("method", "ce", False, 'train.method "gaml" -> "ce"'),
        ("num_train_steps", 6, False, "train.num_train_steps 4 -> 6"),
        ("learning_rate", 2e-3, True, "train.learning_rate 0.001 -> 0.002"),
    ],
)
def test_resume_refuses_a_changed_config_naming_the_fields(finished_run, key, value, extend, named):
    make_config, workdir, _ = finished_run
    saved = (workdir / "config.json").read_text()
    config = make_config()
    config.train[key] = value
    with pytest.raises(ConfigError, match=re.escape(named)) as error:
        train_and_evaluate(config, str(workdir), extend=extend)
    message = str(error.value)
    assert "\n" not in message and "new --workdir" in message
    assert ("--extend permits changing only" if extend else "add --extend") in message
    assert (workdir / "config.json").read_text() == saved


def test_resume_allows_fields_that_do_not_change_the_computation(finished_run, tmp_path, capsys):
    make_config, workdir, results = finished_run
    config = make_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.update(log_every=3, checkpoint_every=5, keep_checkpoints=1, eval_batch_size=16)
    config.train.update(parallel="pmap", grad_mode="grad")
    assert train_and_evaluate(config, str(workdir)) == results
    assert "already finished at step 4 of 4" in capsys.readouterr().out


def test_a_run_saved_before_a_config_field_existed_resumes_under_its_old_value(finished_run, tmp_path):
    """``trainer.ADDED_FIELDS``: a run whose config.json predates a field is compared as if it held
    the value that computes what the older code computed."""
    make_config, workdir, results = finished_run
    shutil.copytree(workdir, tmp_path / "run")
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    del saved["model"]["float32_residual"]
    path.write_text(json.dumps(saved))
    assert train_and_evaluate(make_config(), str(tmp_path / "run")) == results
    config = make_config()
    config.model.float32_residual = True
    with pytest.raises(ConfigError, match=re.escape("model.float32_residual false -> true")):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_extend_trains_a_finished_run_longer(finished_run, tmp_path):
    make_config, workdir, _ = finished_run
    shutil.copytree(workdir, tmp_path / "run")
    config = make_config()
    config.train.num_train_steps = 6
    train_and_evaluate(config, str(tmp_path / "run"), extend=True)
    assert Checkpointer(tmp_path / "run").latest_step() == 6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["num_train_steps"] == 6
    assert sorted(_train_lines(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    # Steps 1-4 are the finished run's; 5 and 6 follow the schedule of the new length.
    assert _train_lines(tmp_path / "run")[5]["learning_rate"] == pytest.approx(1e-3 * (6 - 4) / (6 - 2))


def test_a_run_saved_with_another_optimizer_layout_is_refused_in_one_line(
    finished_run, tmp_path, monkeypatch
):
    """A workdir whose optimizer state has another structure (a run saved before the state went
    flat) stops with one line that says to train in a new workdir; nothing in it changes."""
    make_config, workdir, _ = finished_run
    shutil.copytree(workdir, tmp_path / "run")
    real = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda **kw: real(**{**kw, "per_tensor_alignment": True}))
    config = make_config()
    config.train.num_train_steps = 6
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError, match="structured otherwise") as error:
        train_and_evaluate(config, str(tmp_path / "run"), extend=True)
    assert "\n" not in str(error.value) and "new --workdir" in str(error.value)
    assert Checkpointer(tmp_path / "run").latest_step() == 4
    assert (tmp_path / "run" / "config.json").read_text() == saved


def test_a_run_saved_with_every_tensor_concatenated_resumes_with_tensors_of_their_own(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    """A run saved before large tensors were groups of their own in the flat optimizer (every
    tensor concatenated) resumes under this version: its state regrouped, one line says so, and
    the run ends where an uninterrupted run of the new layout ends."""
    real = trainer.make_optimizer
    config = tiny.train_config(*tiny_assets, num_train_steps=6)
    # The tiny model's tensors are all small: a lower threshold gives it groups of one tensor.
    monkeypatch.setattr(trainer, "make_optimizer", lambda **kw: real(**{"own_group_size": 500, **kw}))
    whole = tmp_path / "whole"
    train_and_evaluate(config, str(whole))
    killed = tmp_path / "killed"
    monkeypatch.setattr(trainer, "make_optimizer", lambda **kw: real(**{**kw, "own_group_size": None}))
    train_and_evaluate(config, str(killed), stop_after_step=3)
    monkeypatch.setattr(trainer, "make_optimizer", lambda **kw: real(**{"own_group_size": 500, **kw}))
    capsys.readouterr()
    train_and_evaluate(config, str(killed))
    assert "laid out as before 2026-12-06: regrouped to resume" in capsys.readouterr().out
    got, want = _params_at(killed, 6), _params_at(whole, 6)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    start = _params_at(whole, 2)
    assert np.abs(start["classifier_0"]["kernel"] - want["classifier_0"]["kernel"]).max() > 1e-4


def test_pmap_trains_what_shard_map_trains(finished_run, tmp_path, monkeypatch):
    make_config, workdir, results = finished_run
    config = make_config()
    config.train.parallel = "pmap"
    wrapped = []
    monkeypatch.setattr(trainer, "pmap_step", lambda fn: wrapped.append(fn) or train_step.pmap_step(fn))
    pmap_results = train_and_evaluate(config, str(tmp_path))
    assert len(wrapped) == 1  # the run really went through jax.pmap
    for split, exits in results.items():
        for got, want in zip(pmap_results[split], exits, strict=True):
            assert got == pytest.approx(want, rel=1e-6)
    for x, y in zip(
        jax.tree.leaves(_params_at(tmp_path, 4)), jax.tree.leaves(_params_at(workdir, 4)), strict=True
    ):
        np.testing.assert_allclose(x, y, atol=1e-6)
    for step, line in _train_lines(tmp_path).items():
        assert line["grad_norm_ce"] == pytest.approx(_train_lines(workdir)[step]["grad_norm_ce"], rel=1e-6)


def _run(args, env=None, timeout=600):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=tiny.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_train_py_rejects_an_unknown_config_key(tmp_path):
    result = _run(["train.py", "--workdir", str(tmp_path), "--config.train.learning_rat=1e-4"])
    assert result.returncode != 0
    assert "learning_rat" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_compute_what_one_process_computes(tiny_assets, tmp_path):
    """train.py on 2 processes x 2 CPU devices (jax.distributed, gloo collectives) against 1 process
    x 4 devices, same global batch: the same parameters after 4 steps."""
    checkpoint, train_file, dev_file = tiny_assets
    flags = [
        f"--config.model.name={checkpoint}",
        "--config.data.task=csv",
        f"--config.data.train_file={train_file}",
        f"--config.data.validation_file={dev_file}",
        "--config.data.max_length=16",
        "--config.data.length_buckets=(16,)",
        "--config.train.batch_size=8",
        "--config.train.eval_batch_size=8",
        "--config.train.num_train_steps=4",
        "--config.train.warmup_steps=2",
        "--config.train.learning_rate=1e-3",
        "--config.train.checkpoint_every=4",
        "--config.train.log_every=2",
    ]
    one = _run(
        ["train.py", f"--workdir={tmp_path / 'one'}", *flags],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                f"--workdir={tmp_path / 'two'}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *flags,
            ],
            cwd=tiny.REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    a, b = _restore(tmp_path / "one", 4), _restore(tmp_path / "two", 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    assert _train_lines(tmp_path / "two")[4]["ce"] == pytest.approx(
        _train_lines(tmp_path / "one")[4]["ce"], 1e-5
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("learning_rate", -1e-4),
        ("exit_learning_rate", -5e-4),
        ("learning_rate", float("nan")),
        ("warmup_steps", -1),
        ("num_train_steps", -6),
        ("log_every", 0),
        ("checkpoint_every", 0),
        ("keep_checkpoints", 0),
    ],
)
def test_negative_rates_and_zero_intervals_name_the_field_before_any_loading(tmp_path, key, value):
    config = tiny.train_config(tmp_path / "no-model", tmp_path / "no.csv", tmp_path / "no.csv")
    config.train[key] = value
    with pytest.raises(ValueError, match=rf"train\.{key} must be .*; set --config\.train\.{key}\."):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
