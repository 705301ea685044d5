"""Early-exit predictions for new texts with a model trained by train.py.

    python predict.py --workdir workdirs/default --speedup 2 --input reviews.txt --output preds.jsonl
    python predict.py --workdir workdirs/default --threshold 0.3 --input dev.csv --output preds.jsonl
    echo "a gripping, funny film" | python predict.py --workdir W --speedup 2 --input - --output -

The input is a CSV/TSV/JSONL file (text columns: the run's task's, or --text_columns) or plain
text, one example per line (.txt, or - for stdin; a sentence pair as text_a<TAB>text_b). The
output has one JSON object per input, in order: label, label_id, probabilities, exit_layer,
truncated. At the end it prints the mean layers run, the speed-up in layers and the latency per
example at the batch size used.
"""

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a train.py run (or a python -m gaml_jax.convert folder).")
flags.DEFINE_float("threshold", None, "Exit threshold of the criterion.")
flags.DEFINE_float("speedup", None, "Target speed-up in layers: finds the threshold on the run's dev split.")
flags.DEFINE_string("criterion", "entropy", "Exit criterion: entropy, confidence or patience.")
flags.DEFINE_string("input", None, "Examples: .csv, .tsv, .json, .jsonl, .txt, or - for stdin lines.")
flags.DEFINE_string("output", None, "JSONL file to write, or - for stdout.")
flags.DEFINE_list("text_columns", None, "Text column(s) of a CSV/TSV/JSONL input; default: the task's.")
flags.DEFINE_integer("batch_size", 32, "Examples per batch (1 measures single-example latency).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of the run.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        for name in ("workdir", "input", "output"):
            if getattr(FLAGS, name) is None:
                raise ValueError(f"--{name} is required.")
        from gaml_jax import serving

        threshold = FLAGS.threshold
        if FLAGS.criterion == "patience" and threshold is not None and float(threshold).is_integer():
            threshold = int(threshold)
        summary = serving.predict_files(
            FLAGS.workdir,
            FLAGS.input,
            FLAGS.output,
            criterion=FLAGS.criterion,
            threshold=threshold,
            speedup=FLAGS.speedup,
            text_columns=FLAGS.text_columns,
            batch_size=FLAGS.batch_size,
            checkpoint=FLAGS.checkpoint,
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        sys.exit(f"predict.py: error: {e}")
    # The summary goes to stderr when the predictions go to stdout.
    print(summary.format(), file=sys.stderr if FLAGS.output == "-" else sys.stdout)


if __name__ == "__main__":
    app.run(main)
