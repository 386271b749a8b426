"""CIFAR-10 ResNet-18 with the common 200-epoch cosine recipe: ~95 % top-1.

The recipe of the widely used kuangliu/pytorch-cifar baseline (95.4 % reported there) and of many
papers since: the ResNet-18 stages (64-512 filters, basic blocks, projection shortcuts) behind a
CIFAR stem (one 3x3 convolution, no max-pool), SGD momentum 0.9, lr 0.1 for batch 128, weight
decay 5e-4, cosine decay over 200 epochs, pad-crop-flip augmentation.

    python train.py --config configs/cifar10_resnet18.py --workdir runs/cifar10_resnet18
"""

from configs import cifar10_resnet20


def get_config():
    config = cifar10_resnet20.get_config("cifar_resnet18")
    config.num_train_steps = -1
    config.num_epochs = 200.0
    config.weight_decay = 5e-4
    config.lr_schedule = "cosine"
    config.eval_every_steps = 0  # once per epoch
    config.checkpoint_every_steps = 0
    return config
