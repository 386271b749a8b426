"""ImageNet ResNet-50, "ResNet strikes back" procedure A3 (Wightman, Touvron, Jégou 2021): 78.1 % top-1.

The short procedure of the paper's table 1: 100 epochs trained at 160 px and tested at 224 (crop
0.95), LAMB at lr 8e-3, weight decay 0.02, rand-m6-mstd0.5-inc1, no repeated augmentation and no
stochastic depth; the rest as A2 (configs/imagenet_resnet50_rsb_a2.py: batch 2048, binary
cross-entropy thresholded at 0.2, mixup 0.1, CutMix 1.0).

Not run to the end here (no ImageNet-scale hardware); tests run 3 of its steps.

    python train.py --config configs/imagenet_resnet50_rsb_a3.py --workdir runs/rsb_a3 \
        --config.data_dir=/path/to/tensorflow_datasets
"""

from configs import imagenet_resnet50_rsb_a2


def get_config():
    config = imagenet_resnet50_rsb_a2.get_config()
    config.num_epochs = 100.0
    config.image_size = 160
    config.learning_rate = 8e-3
    config.lr_end_factor = 1e-6 / config.learning_rate
    config.auto_augment = "rand-m6-mstd0.5-inc1"
    config.repeated_aug = 1
    config.drop_path_rate = 0.0
    return config
