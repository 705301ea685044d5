"""Fine-tunes a multi-exit BERT with GAML. With no arguments: MiniLM on Rotten Tomatoes.

    python train.py                                            # the embedded default
    python train.py --config configs/sst2.py --workdir workdirs/sst2 --config.train.method=ml
    python train.py --workdir workdirs/default                 # a killed run resumes here
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

import os
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

HERE = Path(__file__).resolve().parent

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", str(HERE / "configs" / "default.py"), "Training config file (configs/*.py).", lock_config=True
)
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


def main(argv):
    del argv
    import jax

    if FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO

    from gaml_jax.trainer import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir, extend=FLAGS.extend)


if __name__ == "__main__":
    app.run(main)
