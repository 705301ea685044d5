"""The package's shape (issue #10): no import cycle among gaml_jax modules, one home per concept,
and configs/ as a leaf that the library reads its defaults from."""

from __future__ import annotations

import ast
from pathlib import Path

from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """gaml_jax modules a file imports (at any depth: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gaml_jax"):
            if node.module == "gaml_jax":
                out |= {f"gaml_jax.{alias.name}" for alias in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gaml_jax.")}
    return out


def _graph(package: str) -> dict[str, set[str]]:
    modules = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_no_import_cycle_among_gaml_jax_modules():
    graph = _graph("gaml_jax")
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*trail, module, dep])}"
            if dep not in state:
                visit(dep, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_configs_import_nothing_from_the_library():
    for path in (ROOT / "configs").glob("*.py"):
        assert not _imports(path), f"{path.name} imports the library"


def test_each_concept_has_one_home():
    from gaml_jax import criteria, data, early_exit, evaluation, evaluator, metrics, names, tasks

    assert tasks.task_info("rt").main_metric == "accuracy"  # the task table
    defined_in = lambda text: [p.name for p in (ROOT / "gaml_jax").glob("*.py") if text in p.read_text()]
    assert defined_in("class TaskInfo") == ["tasks.py"] and defined_in("GLUE_TASKS: dict") == ["tasks.py"]
    assert data.GLUE_TASKS is tasks.GLUE_TASKS and not hasattr(metrics, "main_score")
    assert criteria.find_threshold and criteria.simulate and criteria.sweep_thresholds  # thresholds
    for function in ("find_threshold", "exit_decisions", "simulate", "sweep_thresholds", "CRITERIA:"):
        assert defined_in(function.join(["def ", "("]) if function[-1] != ":" else function) == [
            "criteria.py"
        ], function
    assert early_exit.EarlyExitRunner and evaluation.run_early_exit
    assert evaluator.exit_scores and not hasattr(evaluation, "make_predict_fn")
    # Parameter names are made in names.py alone.
    for path in (ROOT / "gaml_jax").glob("*.py"):
        if path.name != "names.py":
            text = path.read_text()
            for spelled in ('f"layer_{', 'f"pooler_{', 'f"classifier_{', '"classifier_0"', '"layer_0"'):
                assert spelled not in text, f"{path.name} spells a parameter name: {spelled}"
    assert names.parse(names.layer(3)) == ("layer", 3)
    assert names.parse(names.pooler(2, shared=False)) == ("pooler", 2)
    assert names.parse(names.pooler(2, shared=True)) == ("pooler", None)
    assert names.parse(names.classifier(0)) == ("classifier", 0)


def test_hf_names_round_trip_through_one_table():
    from gaml_jax import names

    cases = {
        "embeddings.word_embeddings.weight": ("embeddings", None, ("word_embeddings",), "embedding", False),
        "embeddings.LayerNorm.gamma": ("embeddings", None, ("LayerNorm",), "scale", False),
        "encoder.layer.11.attention.self.query.weight": (
            "layer",
            11,
            ("attention", "self", "query"),
            "kernel",
            True,
        ),
        "encoder.layer.0.output.LayerNorm.bias": ("layer", 0, ("output", "LayerNorm"), "bias", False),
        "pooler.dense.bias": ("pooler", None, ("dense",), "bias", False),
        "classifier.weight": ("classifier", None, (), "kernel", True),
    }
    for hf_name, parsed in cases.items():
        assert names.from_hf(hf_name) == parsed
        expected = hf_name.replace(".gamma", ".weight")
        assert names.to_hf(*parsed[:4]) == (expected, parsed[4])
    for unknown in ("cls.predictions.bias", "classifier.dense.weight", "encoder.layer.x.output.dense.weight"):
        assert names.from_hf(unknown) is None


def test_glue_config_takes_its_task_as_argument():
    from absl import flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(["prog", f"--config={ROOT / 'configs' / 'glue.py'}:mrpc"])
    assert fv.config.data.task == "mrpc" and fv.config.model.name == "bert-base-uncased"
    assert fv.config.train.learning_rate == 2e-5
