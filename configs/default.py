"""Shared defaults: ResNet-50 on ImageNet with the Goyal et al. (2017) SGD recipe.

Other configs import this and change a few fields. Every key can be overridden
on the command line: `--config.batch_size=128`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model: a registry name (python -c "from resnet_jax import models; print(models.names())").
    config.model = "resnet50"
    config.dtype = "float32"  # compute dtype; params stay float32
    config.zero_init_residual = True  # last BatchNorm scale of each residual branch starts at 0
    config.activation = "relu"  # relu | tanh | sigmoid

    # Data: digits | synthetic | tfds:NAME | folder:PATH. Classes and image shape come from the data.
    config.dataset = "tfds:imagenet2012"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data dir (None: tfds default)
    config.image_size = 224
    config.augment = "auto"  # auto | cifar | imagenet | shift | none (auto: by dataset and image size)
    config.train_split = "train"  # tfds split names
    config.eval_split = "auto"  # auto: validation if the dataset has one, else test
    config.folder_eval_fraction = 0.1  # folder: without train/ and val/, this share of each class is eval
    config.num_workers = -1  # grain worker processes per host; -1: 0 for in-memory data, else one per core
    config.batch_size = 256  # global, over all devices and hosts
    config.eval_batch_size = 0  # 0: same as batch_size
    # Micro-batches per step (gradients averaged, one optimizer update): batch_size // k examples
    # go through the model at a time. BatchNorm normalises each micro-batch on its own.
    config.grad_accum_steps = 1
    # BatchNorm statistics in training: 0 = over the whole (micro-)batch on all devices ("sync BN");
    # k = over groups of k examples, like per-device BN in pmap codes (k must divide each device's share).
    config.bn_group_size = 0

    # Length: num_train_steps > 0 overrides num_epochs.
    config.num_epochs = 90.0
    config.num_train_steps = -1

    # Optimisation; the learning rate is for the global batch.
    config.optimizer = "nesterov"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0  # clipped to the run's length
    config.weight_decay = 1e-4  # convolution and dense kernels only
    config.label_smoothing = 0.0
    config.grad_clip_norm = 0.0  # 0: no clipping

    config.seed = 0  # init, data order and augmentation

    # Cadence in steps; 0 = once per epoch.
    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 3  # the last K, plus the best by eval accuracy
    config.skip_nonfinite_steps = False  # False: stop at a non-finite loss/gradient; True: skip and count

    # JAX's persistent compilation cache: None = ~/.cache/resnet_jax/jax_cache, '' = off.
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
