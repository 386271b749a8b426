"""Train and evaluate a ResNet.

python train.py --config configs/digits.py --workdir runs/digits [--config.key=value ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import compile_cache, parallel, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl, TensorBoard events and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host: every process runs this same command. Cloud TPU VMs, SLURM and Open MPI need none of these.
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0, reachable from all.")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes (one per host).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes - 1.")
flags.DEFINE_bool(
    "distributed",
    None,
    "Call jax.distributed.initialize(). Default: when the three flags above are given or JAX detects "
    "a cluster (Cloud TPU VM, SLURM, Open MPI); --nodistributed runs alone.",
)


@flags.multi_flags_validator(["coordinator_address", "num_processes", "process_id", "distributed"])
def _check_distributed_flags(values):
    try:
        parallel.check_distributed_args(**values)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed
    )
    try:
        compile_cache.enable_compilation_cache(FLAGS.config.get("compilation_cache_dir"))
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (*train.USER_ERRORS, compile_cache.CompilationCacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
