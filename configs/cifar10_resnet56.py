"""CIFAR-10 ResNet-56, He et al. 2016 (Table 6): expected 93.03 % top-1.

The ResNet-20 recipe (configs/cifar10_resnet20.py) with 56 layers (n = 9).

    python train.py --config configs/cifar10_resnet56.py --workdir runs/cifar10_resnet56
"""

from configs import cifar10_resnet20


def get_config():
    return cifar10_resnet20.get_config("resnet56")
