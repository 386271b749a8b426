"""ImageNet ResNet-50 (v1.5), Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): ~76.5 % top-1.

Linear scaling (lr 0.1 x batch / 256) with 5 epochs of linear warmup, SGD with Nesterov momentum
0.9, weight decay 1e-4 on convolution and dense kernels, zero-initialised last BatchNorm of each
residual branch, 90 epochs; plus the Flax ImageNet example's cosine decay, label smoothing 0.1
and bfloat16 compute. Goyal et al. report 76.3 % (step schedule, no label smoothing); the Flax
example 76.5 % with these settings at batch 1024 on TPU.

    python train.py --config configs/imagenet_resnet50.py --workdir runs/imagenet_resnet50 \
        --config.data_dir=/path/to/tensorflow_datasets
"""

from configs import default

BATCH = 1024


def get_config():
    config = default.get_config()
    config.model = "resnet50"
    config.dataset = "tfds:imagenet2012"
    config.image_size = 224
    config.batch_size = BATCH
    config.num_epochs = 90.0
    config.optimizer = "nesterov"
    config.learning_rate = 0.1 * BATCH / 256
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.label_smoothing = 0.1
    config.dtype = "bfloat16"
    config.zero_init_residual = True
    config.log_every_steps = 100
    config.eval_every_steps = 0  # once per epoch
    config.checkpoint_every_steps = 2_000
    return config
