"""CIFAR-10 ResNet-110, He et al. 2016 (Table 6): expected 93.57 % top-1 (best of 5; 93.39 +- 0.16).

The ResNet-20 recipe with 110 layers (n = 18) and the paper's warm-up for this depth: lr 0.01
"until the training error is below 80 % (about 400 iterations)", then back to 0.1. Here: a
constant 0.01 for the first 400 steps.

    python train.py --config configs/cifar10_resnet110.py --workdir runs/cifar10_resnet110
"""

from configs import cifar10_resnet20


def get_config():
    config = cifar10_resnet20.get_config("resnet110")
    config.warmup_epochs = 400 / cifar10_resnet20.STEPS_PER_EPOCH
    config.warmup_style = "constant"
    config.warmup_factor = 0.1
    return config
