"""The benchmark scripts still run against the library (tiny shapes). Their timings are not
tested; what is: the compile-time variants build the same GAML step (scanned, unrolled, remat),
both sides of the PyTorch comparison take a step, and bench/gpu.sh runs its parts in order within
its budget (python stubbed)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from bench import bench_compile, bench_vs_torch, profile_step
from gaml_jax import model as model_lib
from gaml_jax.config import ModelConfig
from gaml_jax.model import MultiExitBert

TINY = ModelConfig(
    vocab_size=1100,  # make_batch draws word pieces from 1000 up
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
)
BATCH, SEQ = 4, 16


def test_compile_variants_take_the_same_gaml_step():
    batch = jax.device_put(bench_vs_torch.make_batch(BATCH, SEQ, TINY.vocab_size))
    rng = jax.random.key(0)
    unrolled, scanned = MultiExitBert(TINY), MultiExitBert(TINY.replace(scan_layers=True))
    metrics = {}
    for name, model, context, optimizer in (
        ("unrolled", unrolled, contextlib.nullcontext, None),
        ("own-groups", unrolled, contextlib.nullcontext, {"own_group_size": 500}),  # TINY's are smaller
        ("tree-opt", unrolled, contextlib.nullcontext, {"flat": False}),
        ("per-tensor", unrolled, bench_compile.kernels_per_tensor, None),
        ("scan", scanned, contextlib.nullcontext, None),
        ("scan+remat", scanned, bench_compile.remat_layers, None),
    ):
        with context():
            compiled, state, _, _, _, ops = bench_compile.compile_step(
                model, batch, rng, SEQ, optimizer=optimizer
            )
        assert ops > 0
        _, metrics[name] = jax.device_get(compiled(state, batch, rng))
    # Dropout is on in the step: the same keys per layer in every form, so the same losses and
    # gradient norms (float32 sums in other orders aside).
    for name in ("own-groups", "tree-opt", "per-tensor", "scan", "scan+remat"):
        for key in ("ce", "kd", "grad_norm_ce"):
            np.testing.assert_allclose(metrics[name][key], metrics["unrolled"][key], rtol=1e-5, err_msg=name)


def test_both_sides_of_the_torch_comparison_step():
    batch = bench_vs_torch.make_batch(BATCH, SEQ, TINY.vocab_size)
    params = MultiExitBert(TINY).init(jax.random.key(0), batch["input_ids"])["params"]
    for method in ("ce", "gaml"):
        bench_vs_torch.jax_step(TINY, params, method, jax.device_put(batch))()
    bench_vs_torch.torch_step(TINY, bench_vs_torch.TorchSide("float32"), batch)()
    bench_vs_torch.jax_forward(TINY, params, batch)()


def _tiny_step_inputs():
    """bench_vs_torch's batch on the device and TINY's random parameters, as a race steps on them."""
    batch = jax.device_put(bench_vs_torch.make_batch(BATCH, SEQ, TINY.vocab_size))
    return batch, MultiExitBert(TINY).init(jax.random.key(0), batch["input_ids"])["params"]


def test_step_variants_take_the_same_step_but_for_what_they_change(monkeypatch):
    """``--variants``: the optimizer per tensor, an XLA option and the kernel gradients in XLA's
    form change how the step is computed, not its numbers, and so does a float32 residual stream
    under float32 compute; dropout bits from RngBitGenerator change the masks only. (The narrowing
    kernels' rule here for any width: TINY's outputs are narrower than its default minimum.)"""
    monkeypatch.setattr(model_lib, "_NARROWING_MIN_WIDTH", 1)
    batch, params = _tiny_step_inputs()
    assert bench_vs_torch.variant_options("xla:xla_cpu_use_xnnpack=false") == {
        "compiler_options": {"xla_cpu_use_xnnpack": False}
    }
    assert bench_vs_torch.variant_options("xla:some_level=2") == {"compiler_options": {"some_level": 2}}
    for bad in ("xla:no_value", "no_such_variant"):
        with pytest.raises(SystemExit, match="--variants"):
            bench_vs_torch.variant_options(bad)

    def two_steps(**options):
        run = bench_vs_torch.jax_step(TINY, params, "gaml", batch, **options)
        return [jax.device_get(run()) for _ in range(2)]

    base = two_steps()
    for name in (
        "tree",
        "all-flat",
        "xla:xla_cpu_use_xnnpack=false",
        "f32-stream",
        "eigen-dw",
        "eigen-narrow-dw",
        "strided-narrow-dw",
    ):  # TINY: float32
        for ours, theirs in zip(two_steps(**bench_vs_torch.variant_options(name)), base, strict=True):
            for key in ("ce", "kd", "grad_norm_ce"):
                np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, err_msg=f"{name} {key}")
    # Other dropout masks, so another loss; the same model and data, so a close one.
    rbg = two_steps(**bench_vs_torch.variant_options("rbg"))
    assert rbg[0]["ce"] != base[0]["ce"]
    np.testing.assert_allclose(rbg[0]["ce"], base[0]["ce"], rtol=0.2)


def test_steps_compiled_ahead_are_the_steps_each_variant_traces():
    """``compile_contenders`` compiles the steps before the race, several at once: each program is
    traced with its own variant's model switches (the last layer for every row here, a program of
    its own), leaves the module's switches as they were, and takes the same steps as the step
    compiled at its first call."""
    batch, params = _tiny_step_inputs()
    switch = model_lib.CLS_ONLY_LAST_LAYER

    def contenders():
        return {
            name: bench_vs_torch.jax_step(TINY, params, "ce", batch, **options)
            for name, options in (("base", {}), ("all-rows", bench_vs_torch.variant_options("all-rows-last")))
        }

    ahead, lazy = contenders(), contenders()
    bench_vs_torch.compile_contenders({**ahead, "not ours": lambda: None})
    assert model_lib.CLS_ONLY_LAST_LAYER == switch
    programs = {name: run.ahead[0].programs["step"] for name, run in ahead.items()}
    assert programs["base"].as_text() != programs["all-rows"].as_text()
    for name in ahead:
        for _ in range(2):
            ours, theirs = jax.device_get(ahead[name]()), jax.device_get(lazy[name]())
            for key in ("ce", "grad_norm_ce"):
                np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=f"{name} {key}")
    assert model_lib.CLS_ONLY_LAST_LAYER == switch


def test_a_variant_that_does_not_compile_leaves_the_race(capsys):
    """One XLA option this backend lacks must not cost a lent machine's whole race: the variant
    that may fail leaves the contenders with one line, the others are compiled; our step itself,
    not among those that may fail, raises."""
    batch, params = _tiny_step_inputs()
    bad = bench_vs_torch.variant_options("xla:xla_no_such_option=1")
    contenders = {
        "ours CE": bench_vs_torch.jax_step(TINY, params, "ce", batch),
        "ours CE xla:xla_no_such_option=1": bench_vs_torch.jax_step(TINY, params, "ce", batch, **bad),
    }
    bench_vs_torch.compile_contenders(contenders, may_fail={"ours CE xla:xla_no_such_option=1"})
    assert list(contenders) == ["ours CE"] and contenders["ours CE"].ahead[0].programs
    out = capsys.readouterr().out
    assert "ours CE xla:xla_no_such_option=1 left the race: it does not compile here" in out
    assert "compiled our 1 steps" in out
    ours_bad = bench_vs_torch.jax_step(TINY, params, "ce", batch, **bad)
    with pytest.raises(Exception, match="xla_no_such_option"):
        bench_vs_torch.compile_contenders(
            {"ours CE": ours_bad}, may_fail={"ours CE xla:xla_no_such_option=1"}
        )


def test_race_alternates_and_reverses_its_rounds():
    """Each contender is called once to warm up, then ``repeats`` times, every round in the reverse
    order of the one before, so that no contender always follows the same neighbour; the medians are
    of the timed calls only. A contender that may fail and whose first call does leaves the race."""
    assert bench_vs_torch.race_order(["a", "b", "c"], 4) == [
        ["a", "b", "c"],
        ["c", "b", "a"],
        ["a", "b", "c"],
        ["c", "b", "a"],
    ]
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds = bench_vs_torch.race(contenders, 3)
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert set(seconds) == {"a", "b", "c"}
    assert all(s["wall"] >= 0 and s["cpu"] >= 0 for s in seconds.values())

    def fails():
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore")

    contenders = {"a": lambda: None, "what-if": fails}
    assert set(bench_vs_torch.race(contenders, 2, may_fail={"what-if"})) == {"a"}
    assert list(contenders) == ["a"]
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        bench_vs_torch.race({"a": lambda: None, "ours": fails}, 2, may_fail={"what-if"})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_products_bench_races_the_same_products_on_both_sides(dtype):
    """``bench_products.py``: the product kinds it weighs are those of a layer of the model (the
    kernels' shapes and how many of each), and its four contenders compute the same forward and
    the same two gradients on both sides (PyTorch's weight gradient in its [out, in] layout)."""
    import torch

    from bench import bench_products

    params = MultiExitBert(TINY).init(jax.random.key(0), np.ones((1, SEQ), np.int32))["params"]
    kernels = [
        leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if "layer_0" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['kernel']")
    ]
    shape = {"hidden_size": TINY.hidden_size, "intermediate_size": TINY.intermediate_size}
    weighed = [(i, o) for _, i, o, count in bench_products.layer_products(shape) for _ in range(count)]
    assert sorted(kernels) == sorted(weighed)

    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]  # PyTorch rounds its output to bfloat16
    # TINY's widths, and wider ones, which take the CPU's bfloat16 products where it has them.
    widths = [(i, o) for _, i, o, _ in bench_products.layer_products(shape)] + [(64, 128), (128, 64)]

    def as_numpy(t) -> np.ndarray:
        return t.detach().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)

    for width_in, width_out in widths:
        calls = bench_products.contenders(torch, dtype, (BATCH, SEQ), width_in, width_out)
        ours_y, torch_y = calls["ours forward"](), calls["torch forward"]()
        np.testing.assert_allclose(as_numpy(ours_y), as_numpy(torch_y), rtol=tolerance, atol=tolerance * 0.1)
        (ours_dx, ours_dk), (torch_dx, torch_dw) = calls["ours backward"](), calls["torch backward"]()
        for ours, theirs in ((ours_dx, torch_dx), (ours_dk, torch_dw.T)):
            scale = np.abs(as_numpy(theirs)).max()
            np.testing.assert_allclose(
                as_numpy(ours), as_numpy(theirs), rtol=tolerance, atol=tolerance * scale
            )


# ------------------------------------------------------------------ bench/gpu.sh's control flow

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
STUB = """#!/bin/sh
# Stands in for python: says what it was asked to run; fails where $STUB_FAIL is in its arguments.
echo "stub $*"
case "$*" in *"$STUB_FAIL"*) exit 3 ;; esac
"""


def _gpu_sh(tmp_path, *args, fail="no such argument", budget=None):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "STUB_FAIL": fail, "TMPDIR": str(tmp_path)}
    env.pop("GPU_BUDGET", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if budget is not None:
        env["GPU_BUDGET"] = str(budget)
    done = subprocess.run(["bash", str(GPU_SCRIPT), *args], env=env, capture_output=True, text=True)
    started = re.findall(r"^\+ \[([a-z-]+), at", done.stdout, re.M)
    return done, started


def test_gpu_script_runs_its_parts_in_order_within_its_budget(tmp_path):
    """``bench/gpu.sh`` (one call of a lent GPU): the parts run in the issue's order, whatever order
    they are named in; a failing part is reported and the next one runs; a part that no longer
    fits the budget is skipped, and the last line names both; the cache folder it made is gone."""
    done, started = _gpu_sh(tmp_path, "--cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    assert started == ["train", "exit", "exit-torch", "variants", "profile", "checks"]
    assert "--variants all-rows-last" in done.stdout and "--torch-only" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("parts failed: 0; skipped: graphs;")

    done, started = _gpu_sh(tmp_path, "--cpu", "checks", "exit", "train")
    assert started == ["train", "exit", "checks"]

    done, started = _gpu_sh(tmp_path, "--cpu", "train", "exit", "checks", fail="bench_early_exit")
    assert done.returncode == 1
    assert started == ["train", "exit", "checks"]
    assert "!! exit exited with 3" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("parts failed: 1; skipped: none;")

    done, started = _gpu_sh(tmp_path, "--cpu", "train", "exit", budget=20)
    assert done.returncode == 0 and started == []
    assert done.stdout.splitlines()[-1].startswith("parts failed: 0; skipped: train exit;")
    assert not list(tmp_path.glob("gaml-gpu-xla.*"))


def test_gpu_script_stops_where_jax_sees_no_gpu(tmp_path):
    """On the GPU path, a failed version check (JAX without its GPU) stops the script before any
    part, rather than timing the CPU for the rest of the loan; an unknown part is a usage error."""
    done, started = _gpu_sh(tmp_path, fail="import jax")
    assert done.returncode == 1 and started == ["versions"]
    assert "stopping: without JAX on the GPU" in done.stdout
    done, _ = _gpu_sh(tmp_path, "--cpu", "trian")
    assert done.returncode == 2 and "usage: bash bench/gpu.sh" in done.stderr


def test_idle_gaps_are_the_time_no_event_covers_on_any_thread():
    """``profile_step.idle_gaps``: the time between the first event's start and the last one's end
    that no event covers, whatever thread each ran on, and each gap with the operation whose event
    ended last before it (not the last to start) and the one after it."""
    events = [  # (start, end, name); overlapping across threads, one event inside another
        (0, 10, "a"),
        (2, 4, "b"),  # inside a
        (8, 12, "c"),  # overlaps a's end: no gap
        (15, 20, "d"),  # a gap of 3 after c
        (16, 30, "e"),
        (17, 18, "f"),  # starts after e, ends first: the gap after it is e's
        (40, 41, "g"),  # a gap of 10 after e
    ]
    idle, span, gaps = profile_step.idle_gaps(list(reversed(events)))  # any order
    assert (idle, span) == (13, 41)
    assert gaps == [(10, "e", "g"), (3, "c", "d")]
    assert profile_step.idle_gaps([]) == (0, 0, [])


def test_column_major_reads_are_the_entry_operations_reading_a_transposed_layout():
    """``profile_step.column_major_reads``: in the entry computation only, each reader of a 2-D or
    larger array whose minor-to-major layout is not descending, with that array's shape; row-major
    arrays, vectors, the branches' own arrays and readers that touch no data (a tuple's element)
    are not reported."""
    hlo = """HloModule m

%branch (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{0,1} transpose(%p), dimensions={1,0}
}

ENTRY %main (a: f32[4,8], v: f32[8]) -> f32[32] {
  %a = f32[4,8]{1,0} parameter(0)
  %v = f32[8]{0} parameter(1)
  %c = (f32[8,4]{0,1}) conditional(%pred, %a, %a), branch_computations={%branch, %branch}
  %g = f32[8,4]{0,1} get-tuple-element(%c), index=0
  %x = f32[2,4,8]{1,2,0} fusion(%a), kind=kLoop, calls=%f
  %u = f32[32]{0} fusion(%g, %v), kind=kLoop, calls=%h
  %w = f32[8,4]{1,0} copy(%g)
  ROOT %y = f32[2,4,8]{2,1,0} add(%x, %x)
}
"""
    reads = profile_step.column_major_reads(hlo)
    assert reads == [
        ("u", "g", "f32[8,4]{0,1}"),
        ("w", "g", "f32[8,4]{0,1}"),
        ("y", "x", "f32[2,4,8]{1,2,0}"),
        ("y", "x", "f32[2,4,8]{1,2,0}"),
    ], reads
