"""Measure the train (or eval) step: images/s, step time, compile time, MFU, memory.

python benchmark.py --model resnet50 --per_device_batch_size 128,256 --dtype bfloat16 --json out.json
Lists are swept (one row per configuration); see docs/benchmarks.md.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import benchmark, cli, compile_cache

FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config",
    os.path.join(HERE, "configs", "default.py"),
    "Training config whose recipe (optimizer, weight decay, ...) the step uses.",
)
flags.DEFINE_list("model", ["resnet50"], "Registry name(s).")
flags.DEFINE_list("batch_size", None, "Global batch size(s), over all devices and hosts.")
flags.DEFINE_list("per_device_batch_size", None, "Batch size(s) per device (instead of --batch_size).")
flags.DEFINE_list("image_size", ["224"], "Image size(s) in pixels.")
flags.DEFINE_list("dtype", ["float32"], "Compute dtype(s): float32, bfloat16, float16.")
flags.DEFINE_integer("steps", 50, "Timed steps per configuration.")
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps after compiling.")
flags.DEFINE_string("mode", "train", "train (forward, backward, update) or eval (inference).")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: table by device kind).")
flags.DEFINE_string("json", None, "Write the rows of figures to this JSON file.")
flags.DEFINE_list(
    "data",
    None,
    "Feed the step from these dataset specs (and/or 'device': batches made on the devices, the "
    "default), each through every --loader: e.g. device,folder:/data/imagenet.",
)
flags.DEFINE_list("loader", ["grain"], "Input pipelines for --data specs: grain, dali (config.loader).")
flags.DEFINE_string(
    "profile",
    None,
    "Trace --profile_steps more steps of each configuration into this folder (jax.profiler) and print "
    "where the device time goes (python -m resnet_jax.trace_report reads it again).",
)
flags.DEFINE_integer("profile_steps", 5, "Steps traced per configuration with --profile.")
flags.DEFINE_integer("seed", 0, "Seed for init and the synthetic batch.")
flags.DEFINE_float(
    "time_budget_s",
    None,
    "Seconds for the whole sweep: configurations that would likely end later are skipped (and listed).",
)
flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Persistent compilation cache (default: --config.compilation_cache_dir, whose None means "
    "~/.cache/resnet_jax/jax_cache; '' off).",
)
cli.define_distributed()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    def run_benchmark():
        try:
            cli.initialize_distributed()
        except ValueError as e:  # multi-host flags that do not go together
            raise benchmark.BenchmarkError(str(e)) from None
        cache_dir = FLAGS.compilation_cache_dir
        if not FLAGS["compilation_cache_dir"].present:
            cache_dir = FLAGS.config.get("compilation_cache_dir")
        compile_cache.enable_compilation_cache(cache_dir)
        options = benchmark.Options(
            models=tuple(FLAGS.model),
            batch_sizes=benchmark.parse_sizes("--batch_size", FLAGS.batch_size),
            per_device_batch_sizes=benchmark.parse_sizes(
                "--per_device_batch_size", FLAGS.per_device_batch_size
            ),
            image_sizes=benchmark.parse_sizes("--image_size", FLAGS.image_size),
            dtypes=tuple(FLAGS.dtype),
            steps=FLAGS.steps,
            warmup_steps=FLAGS.warmup_steps,
            mode=FLAGS.mode,
            peak_tflops=FLAGS.peak_tflops,
            data=tuple(FLAGS.data) if FLAGS.data else None,
            loaders=tuple(FLAGS.loader),
            profile=FLAGS.profile,
            profile_steps=FLAGS.profile_steps,
            seed=FLAGS.seed,
            time_budget_s=FLAGS.time_budget_s,
        )
        ours = [*FLAGS.get_flags_for_module(sys.modules[__name__]), *FLAGS.get_flags_for_module(cli)]
        used = {f.name: f.value for f in ours if f.name != "config"}
        used |= {"config": FLAGS.config.to_dict(), "argv": sys.argv[1:]}
        benchmark.main(options, FLAGS.config, json_path=FLAGS.json, flags=used)

    sys.exit(cli.run(run_benchmark))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser(__doc__))
