"""ImageNet ResNet-50 with a modern, long recipe (after torchvision's "V2" weights, 80.86 %).

torchvision's recipe (Vryniotis 2021, "How to train state-of-the-art models using TorchVision's
latest primitives"): 600 epochs, SGD momentum 0.9 at lr 0.5 for batch 1024 with 5 linear warm-up
epochs from 0.01 x lr and cosine decay, weight decay 2e-5 (none on BatchNorm), label smoothing
0.1, mixup 0.2, cutmix 1.0, EMA of the weights, TrivialAugment (torchvision's TrivialAugmentWide),
random erasing with probability 0.1, repeated augmentation (4), training at 176 px and testing at
224 px (resize 232, centre crop 224). Not run to the end here.

The EMA decay is per step: torchvision's 0.99998 every 32 steps, adjusted for batch 1024 and 600
epochs, comes to about 0.99997 per step.

    python train.py --config configs/imagenet_resnet50_strong.py --workdir runs/imagenet_resnet50_strong \
        --config.data_dir=/path/to/tensorflow_datasets
"""

from configs import imagenet_resnet50


def get_config():
    config = imagenet_resnet50.get_config()
    config.batch_size = 1024
    config.image_size = 176
    config.num_epochs = 600.0
    config.optimizer = "momentum"
    config.learning_rate = 0.5
    config.weight_decay = 2e-5
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.warmup_factor = 0.01
    config.label_smoothing = 0.1
    config.mixup_alpha = 0.2
    config.cutmix_alpha = 1.0
    config.mixup_switch_prob = 0.5
    config.ema_decay = 0.99997
    config.auto_augment = "trivialaugment"
    config.random_erase_prob = 0.1
    config.repeated_aug = 4
    config.eval_image_size = 224
    config.eval_crop_pct = 224 / 232
    return config
