"""Fine-tunes a multi-exit BERT with GAML. With no arguments: MiniLM on Rotten Tomatoes.

    python train.py                                            # the embedded default
    python train.py --config configs/glue.py:sst2 --workdir workdirs/sst2 --config.train.method=ml
    python train.py --workdir workdirs/default                 # a killed run resumes here
    python train.py --config.train.learning_rate=2e-5 --print_config   # the resolved config

Every config field, with its default and a comment, is in configs/default.py; override any with
--config.<field>=<value>. --print_config prints the config a run would use and exits.

    python train.py --workdir workdirs/default --config.train.num_train_steps=500 --extend

A workdir that holds a run resumes it under the same config only: a changed field is refused,
naming it (train in a new --workdir instead). Fields that do not change what is computed may
change: train.log_every, checkpoint_every, keep_checkpoints, eval_batch_size, parallel,
grad_mode and data.cache_dir. --extend also lets train.num_train_steps / num_epochs change, to
train a run longer: the learning-rate schedule is then recomputed for the new length (its decay
stretched to the new last step, so the rate rises again from where it had fallen). A finished
run restarted prints its results and exits.

Multi-host: start one process per host with --coordinator_address/--num_processes/--process_id
(or the JAX_COORDINATOR_ADDRESS environment and a cluster JAX detects by itself).
"""

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

HERE = Path(__file__).resolve().parent
# Errors a user can cause (config values, data files, model folders, a run that diverged) end in
# one line naming the problem and the fix; any other exception is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)
FIELDS_HELP = "The fields, with defaults and comments, are in configs/default.py; --print_config prints them."


def fail(message: str) -> NoReturn:
    sys.exit(f"train.py: error: {message}")


def unknown_field(error: BaseException, argv: Sequence[str]) -> str | None:
    """The message for ml_collections' error on an unknown ``--config.<field>`` (a bare
    ``AttributeError: "'foo'"``), or None when ``error`` is about something else."""
    text = error
    while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError("'foo'\nDid you..."))
        text = text.args[0]
    if not isinstance(text, str):
        return None
    deeper = re.search(r"Attempting to lookup: ([\w.]+)", text)  # --config.train.learning_rate.x
    if deeper:
        return f"--config.{deeper.group(1)}: {text.split('. ')[0]}. {FIELDS_HELP}"
    field, _, did_you_mean = text.partition("\n")
    field = field.strip("'\"")
    for arg in argv[1:]:
        override = re.match(r"--?(?:no)?config\.([\w.]+)", arg)
        if override and field in override.group(1).split("."):
            parts = override.group(1).split(".")
            unknown = ".".join(parts[: parts.index(field) + 1])
            hint = f" {did_you_mean.strip()}" if did_you_mean.strip() else ""
            return f"{arg.split('=')[0]}: the config has no field {unknown!r}.{hint} {FIELDS_HELP}"
    return None


@contextlib.contextmanager
def flag_errors(argv: Sequence[str]) -> Iterator[None]:
    """One line for a bad --config or --config.<field>=<value> (ml_collections reads them both
    when the flag is defined and when flags are parsed)."""
    try:
        yield
    except flags.Error as e:  # a value that does not parse, an unknown flag
        fail(str(e))
    except OSError as e:  # the --config file (ml_collections' message spans several lines), a --flagfile
        detail = str(e).strip().splitlines()[-1].strip()
        fail(f"--config: {detail}. Config files: configs/*.py." if "config file" in str(e) else detail)
    except (AttributeError, KeyError) as e:
        message = unknown_field(e, argv)
        if message is None:
            raise
        fail(message)


with flag_errors(sys.argv):
    config_flags.DEFINE_config_file(
        "config",
        str(HERE / "configs" / "default.py"),
        "Training config file (configs/*.py); override any field with --config.<field>=<value>, "
        f"e.g. --config.train.learning_rate=2e-5. {FIELDS_HELP}",
        lock_config=True,
    )
flags.DEFINE_bool("print_config", False, "Print the resolved config (file and overrides) and exit.")
flags.DEFINE_string("workdir", "workdirs/default", "Checkpoints, metrics and the run's description go here.")
flags.DEFINE_bool(
    "extend",
    False,
    "Resume the workdir's run with a changed train.num_train_steps / num_epochs (train it longer); "
    "config.json is rewritten.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts), for multi-host runs.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-host runs.")
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    with flag_errors(argv):
        rest = FLAGS(argv)
        FLAGS.config.keys()  # ml_collections defers a missing config file's error to first use
    return rest


def main(argv):
    del argv
    if FLAGS.print_config:
        print(FLAGS.config, end="")
        return
    try:
        train()
    except USER_ERRORS as e:
        fail(str(e) or type(e).__name__)


def train() -> None:
    from gaml_jax.host_memory import keep_host_memory

    keep_host_memory()  # before JAX starts: XLA:CPU's buffers reuse their pages (no page faults per step)
    import jax

    if FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO

    from gaml_jax.compilation import enable_compilation_cache
    from gaml_jax.trainer import train_and_evaluate

    enable_compilation_cache()  # ~/.cache/gaml_jax/xla, or $JAX_COMPILATION_CACHE_DIR

    train_and_evaluate(FLAGS.config, FLAGS.workdir, extend=FLAGS.extend)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
