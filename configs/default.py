"""Shared defaults: ResNet-50 on ImageNet with the Goyal et al. (2017) SGD recipe.

Every config key, its default and its meaning live in `resnet_jax/defaults.py`, inside the package,
so that a config built in Python (a notebook, a script) is completed from the same defaults and a
misspelt key is an error. Other configs import this module and change a few fields; every key can be
overridden on the command line: `--config.batch_size=128`.
"""

from resnet_jax.defaults import get_config  # noqa: F401  (the config of `--config configs/default.py`)
