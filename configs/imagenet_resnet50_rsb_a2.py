"""ImageNet ResNet-50, "ResNet strikes back" procedure A2 (Wightman, Touvron, Jégou 2021): 79.8 % top-1.

The paper's table 1, column A2: 300 epochs at batch 2048, LAMB at lr 5e-3 with 5 warmup epochs
(from 1e-4 x lr) and cosine decay to 1e-6, weight decay 0.02 (not on BatchNorm or biases), binary
cross-entropy with targets thresholded at 0.2 and no label smoothing, stochastic depth 0.05,
repeated augmentation (3), RandAugment rand-m7-mstd0.5-inc1, mixup 0.1 and CutMix 1.0 (one of
the two per batch), no random erasing, no EMA; trained at 224 px and tested at 224 with crop
0.95, in mixed precision. timm keeps the zero-initialised last BatchNorm of each block.

Not run to the end here (no ImageNet-scale hardware); tests run 3 of its steps.

    python train.py --config configs/imagenet_resnet50_rsb_a2.py --workdir runs/rsb_a2 \
        --config.data_dir=/path/to/tensorflow_datasets
"""

from configs import imagenet_resnet50

BATCH = 2048


def get_config():
    config = imagenet_resnet50.get_config()
    config.batch_size = BATCH
    config.num_epochs = 300.0
    config.optimizer = "lamb"
    config.learning_rate = 5e-3
    config.weight_decay = 0.02
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.warmup_factor = 1e-4
    config.lr_end_factor = 1e-6 / config.learning_rate
    config.loss = "bce"
    config.bce_target_threshold = 0.2
    config.label_smoothing = 0.0
    config.drop_path_rate = 0.05
    config.repeated_aug = 3
    config.auto_augment = "rand-m7-mstd0.5-inc1"
    config.mixup_alpha = 0.1
    config.cutmix_alpha = 1.0
    config.mixup_switch_prob = 0.5
    config.image_size = 224
    config.eval_image_size = 224
    config.eval_crop_pct = 0.95
    return config
