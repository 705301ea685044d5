"""Fine-tunes a multi-exit BERT with GAML. With no arguments: MiniLM on Rotten Tomatoes.

    python train.py                                            # the embedded default
    python train.py --config configs/sst2.py --workdir workdirs/sst2 --config.train.method=ml
    python train.py --workdir workdirs/default                 # a killed run resumes here

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

    from gaml_jax.compilation import enable_compilation_cache
    from gaml_jax.trainer import train_and_evaluate

    enable_compilation_cache()  # ~/.cache/gaml_jax/xla, or $JAX_COMPILATION_CACHE_DIR

    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
