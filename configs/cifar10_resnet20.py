"""CIFAR-10 ResNet-20, He et al. 2016 ("Deep Residual Learning", Sec. 4.2): expected 91.25 % top-1.

The paper's recipe: batch 128, SGD with momentum 0.9, lr 0.1, weight decay 1e-4, 64k iterations
with the lr divided by 10 at 32k and 48k, 4-pixel pad + random 32x32 crop + horizontal flip,
option-A (zero-padding) shortcuts, no zero-initialised residual branches. The paper trains on
45k images and reports on the 10k test set; here the whole 50k train split is used (390 steps per
epoch), so the iteration counts are the paper's and the epochs are a little fewer.

    python train.py --config configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20
"""

from configs import default

CIFAR10_TRAIN = 50_000
BATCH = 128
STEPS_PER_EPOCH = CIFAR10_TRAIN // BATCH  # 390


def get_config(model: str = "resnet20"):
    config = default.get_config()
    config.model = model
    config.dataset = "tfds:cifar10"
    config.image_size = 32
    config.augment = "cifar"
    config.batch_size = BATCH
    config.num_train_steps = 64_000
    config.optimizer = "momentum"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.weight_decay_mode = "coupled"
    config.lr_schedule = "step"
    config.lr_step_epochs = (32_000 / STEPS_PER_EPOCH, 48_000 / STEPS_PER_EPOCH)
    config.lr_decay_factor = 0.1
    config.warmup_epochs = 0.0
    config.zero_init_residual = False
    config.log_every_steps = 500
    config.eval_every_steps = 4_000
    config.checkpoint_every_steps = 4_000
    return config
