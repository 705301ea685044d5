"""Early-exit evaluation of a model trained by train.py.

    python eval.py --workdir workdirs/default --threshold 0.3              # entropy criterion
    python eval.py --workdir workdirs/default --threshold 0.9 --criterion confidence
    python eval.py --workdir workdirs/default --threshold 2 --criterion patience
    python eval.py --workdir workdirs/default --speedup 2 --json report.json
    python eval.py --workdir workdirs/default --speedup 2 --data_file test.csv --predictions preds.jsonl
    python eval.py --workdir workdirs/ce --workdir workdirs/ml --workdir workdirs/gaml --sweep

With a threshold (or a target speed-up, whose threshold is found on the dev split) it runs real
early exit over the split: examples that have exited are no longer computed. It prints the task's
metrics, the mean number of layers run, the speed-up in layers, the speed-up measured on the clock
(all layers over early exit, the same batches) and how many examples left at each exit.
--sweep writes a CSV and a PNG of score against layer speed-up for a grid of thresholds of each
criterion, one curve per --workdir.
"""

import json
import sys
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Workdir of a train.py run; several with --sweep.")
flags.DEFINE_float("threshold", None, "Exit threshold of the criterion.")
flags.DEFINE_float("speedup", None, "Target speed-up in layers: finds the threshold on the dev split.")
flags.DEFINE_string("criterion", "entropy", "Exit criterion: entropy, confidence or patience.")
flags.DEFINE_string("split", None, "Split to evaluate; default: the task's dev split.")
flags.DEFINE_bool("sweep", False, "Score against speed-up over a grid of thresholds of every criterion.")
flags.DEFINE_string("out", None, "Folder for sweep.csv and sweep.png; default: the first workdir.")
flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
flags.DEFINE_integer("batch_size", 32, "Examples per batch (1 measures single-example latency).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of the run.")
flags.DEFINE_string(
    "data_file", None, "Score a labelled .csv/.tsv/.json/.jsonl file instead of a split (threshold from dev)."
)
flags.DEFINE_list("text_columns", None, "With --data_file: its text column(s); default: the run's task's.")
flags.DEFINE_string("label_column", None, "With --data_file: its label column; default: the run's task's.")
flags.DEFINE_string("predictions", None, "Also write every example's prediction (JSONL) to this file.")
flags.DEFINE_bool(
    "measure", True, "Time early exit against all layers (3 more timed passes of each over the split)."
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from gaml_jax.compilation import enable_compilation_cache

    enable_compilation_cache()  # ~/.cache/gaml_jax/xla, or $JAX_COMPILATION_CACHE_DIR
    try:
        if FLAGS.sweep:
            sweep()
        else:
            evaluate()
    except (ValueError, OSError, ImportError) as e:  # what a user can cause; any other is a bug
        sys.exit(f"eval.py: error: {e}")


def evaluate():
    from gaml_jax import criteria, early_exit, evaluation, serving

    if not FLAGS.workdir or len(FLAGS.workdir) != 1:
        raise ValueError("Give exactly one --workdir (several are for --sweep).")
    if (FLAGS.threshold is None) == (FLAGS.speedup is None):
        raise ValueError("Give one of --threshold T or --speedup S (or --sweep).")
    if FLAGS.speedup is not None and not FLAGS.speedup >= 1:
        raise ValueError(f"--speedup must be >= 1, got {FLAGS.speedup}.")
    if FLAGS.threshold is not None:  # fail before any loading; num_labels is checked again below
        criteria.check_criterion(FLAGS.criterion, _as_number(FLAGS.threshold), num_labels=2)
    elif FLAGS.criterion not in criteria.CRITERIA:
        criteria.check_criterion(FLAGS.criterion, 1, num_labels=2)
    if FLAGS.data_file and FLAGS.split:
        raise ValueError("Give --split or --data_file, not both.")
    if FLAGS.data_file and not Path(FLAGS.data_file).is_file():
        raise FileNotFoundError(f"--data_file: no such file {FLAGS.data_file!r}.")
    run = evaluation.load_run(FLAGS.workdir[0], FLAGS.checkpoint)
    config = run.model.config
    runner = early_exit.EarlyExitRunner(run.model, run.params)
    if FLAGS.data_file:
        split = FLAGS.data_file
        batches = serving.file_batches(
            run,
            FLAGS.data_file,
            FLAGS.batch_size,
            text_columns=FLAGS.text_columns,
            label_column=FLAGS.label_column,
        )
    else:
        split = FLAGS.split or run.task.eval_splits[0]
        batches = evaluation.split_batches(run, split, FLAGS.batch_size)
    exit_logits = None  # every exit's logits on `split`, when the threshold search computed them
    if FLAGS.threshold is not None:
        criteria.check_criterion(FLAGS.criterion, _as_number(FLAGS.threshold), config.num_labels)
        threshold = _as_number(FLAGS.threshold)
    else:
        dev = run.task.eval_splits[0]
        dev_batches = batches if dev == split else evaluation.split_batches(run, dev, FLAGS.batch_size)
        dev_logits = evaluation.all_exit_logits(runner, dev_batches)
        exit_logits = dev_logits if dev == split else None
        threshold = criteria.find_threshold(
            dev_logits, FLAGS.criterion, FLAGS.speedup, config.num_hidden_layers, config.exits
        )
        print(f"{FLAGS.criterion} threshold {threshold:.10g} gives {FLAGS.speedup:g}x fewer layers on {dev}.")
    report = evaluation.run_early_exit(
        runner,
        batches,
        FLAGS.criterion,
        threshold,
        task=run.task,
        split=split,
        exit_logits=exit_logits,
        measure=FLAGS.measure,
    )
    print(evaluation.format_report(report, run))
    if FLAGS.predictions:
        serving.write_predictions(FLAGS.predictions, runner, batches, FLAGS.criterion, threshold, run.task)
        print(f"Wrote {FLAGS.predictions}.")
    if FLAGS.json:
        _write_json(FLAGS.json, report.to_json() | {"workdir": run.workdir, "step": run.step})


def sweep():
    import csv

    from gaml_jax import criteria, evaluation

    if not FLAGS.workdir:
        raise ValueError("Give at least one --workdir.")
    rows = []
    for workdir in FLAGS.workdir:
        run = evaluation.load_run(workdir, FLAGS.checkpoint)
        split = FLAGS.split or run.task.eval_splits[0]
        rows += evaluation.sweep_run(run, split, criteria=criteria.CRITERIA, batch_size=FLAGS.batch_size)
    out = Path(FLAGS.out or FLAGS.workdir[0])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    evaluation.plot_sweep(rows, out / "sweep.png")
    print(evaluation.format_sweep(rows))
    print(f"Wrote {out / 'sweep.csv'} and {out / 'sweep.png'}.")
    if FLAGS.json:
        _write_json(FLAGS.json, rows)


def _as_number(value: float) -> float | int:
    return int(value) if FLAGS.criterion == "patience" and float(value).is_integer() else value


def _write_json(path: str, payload) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"Wrote {path}.")


if __name__ == "__main__":
    app.run(main)
