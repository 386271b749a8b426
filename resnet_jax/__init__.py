"""ResNets in JAX/Flax: models, sharded training, data, checkpoints and tools.

On a host without an accelerator, importing the package selects the CPU and keeps the CUDA
plugin's driver probes off stderr (`resnet_jax.cpu_host`).
"""

from resnet_jax import cpu_host

cpu_host.select_cpu_without_accelerator()
with cpu_host.quiet_driver_probes():
    import jax  # noqa: F401  (loads the plugins' libraries now, under the filter)

    cpu_host.register_plugins()
