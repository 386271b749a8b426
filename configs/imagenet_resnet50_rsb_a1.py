"""ImageNet ResNet-50, "ResNet strikes back" procedure A1 (Wightman, Touvron, Jégou 2021): 80.4 % top-1.

A2 (configs/imagenet_resnet50_rsb_a2.py) run twice as long, as in the paper's table 1: 600 epochs,
weight decay 0.01, label smoothing 0.1 inside the binary cross-entropy, mixup 0.2; the rest as A2
(LAMB lr 5e-3, batch 2048, repeated augmentation 3, rand-m7-mstd0.5-inc1, CutMix 1.0, stochastic
depth 0.05, 224 px, tested at 224 with crop 0.95).

Not run to the end here (no ImageNet-scale hardware); tests run 3 of its steps.

    python train.py --config configs/imagenet_resnet50_rsb_a1.py --workdir runs/rsb_a1 \
        --config.data_dir=/path/to/tensorflow_datasets
"""

from configs import imagenet_resnet50_rsb_a2


def get_config():
    config = imagenet_resnet50_rsb_a2.get_config()
    config.num_epochs = 600.0
    config.weight_decay = 0.01
    config.label_smoothing = 0.1
    config.mixup_alpha = 0.2
    return config
