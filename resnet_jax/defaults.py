"""Every config key with its default: ResNet-50 on ImageNet with the Goyal et al. (2017) SGD recipe.

`config_checks.check_config` completes any config from these defaults and rejects keys that are
not here, so this is the one list of keys. The valid names of a key with choices live in the
registry named beside it (and `config_checks.DOMAINS`); docs/training.md lists them, and its test
checks that the list is complete. `configs/default.py` is this config; the other files in
`configs/` start from it and change a few fields. Every key can be overridden on the command line:
`--config.batch_size=128`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "resnet50"  # models.MODELS (`python -m resnet_jax.models` lists them)
    config.dtype = "float32"  # models.DTYPES: the compute dtype; params stay float32
    config.zero_init_residual = True  # last BatchNorm scale of each residual branch starts at 0
    config.activation = "relu"  # models.ACTIVATIONS
    # Fine-tuning: start from the weights in this directory (`python -m resnet_jax.convert` output or a
    # training workdir) when the workdir has no checkpoint yet; a classifier of another size starts fresh.
    config.init_from = ml_collections.config_dict.placeholder(str)
    config.freeze_backbone = False  # linear probing: only fc learns; BatchNorm keeps its loaded statistics

    # Data: a dataset spec (data.SPEC_FORMS). Classes and shape come from the data.
    config.dataset = "tfds:imagenet2012"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data dir (None: tfds default)
    config.image_size = 224
    config.augment = "auto"  # augment.AUGMENTATIONS (auto: by dataset and image size)
    config.auto_augment = "none"  # autoaugment.POLICIES: a policy after the crop and flip
    config.random_erase_prob = 0.0  # timm's random erasing with per-pixel noise, after the policy
    # Repeated augmentation: k > 1 shows each epoch N / k images k times, differently augmented.
    config.repeated_aug = 1
    # Eval preprocessing: shorter side to eval_image_size / eval_crop_pct, then the central square.
    config.eval_image_size = 0  # 0: image_size; larger tests above the train resolution (FixRes)
    config.eval_crop_pct = 0.0  # 0: 0.875 for ImageNet-style augmentation, else 1
    config.train_split = "train"  # tfds split names
    config.eval_split = "auto"  # auto: validation if the dataset has one, else test
    config.folder_eval_fraction = 0.1  # folder: without train/ and val/, this share of each class is eval
    # dali.LOADERS: grain decodes on the host; dali decodes the ImageNet crop with NVIDIA DALI (on the
    # GPU of a GPU host; docs/data.md says when it pays). grain keeps the order and the position either way.
    config.loader = "grain"
    config.num_workers = -1  # grain worker processes per host; -1: 0 for in-memory data, else one per core
    config.device_prefetch = 1  # global batches sent to the devices ahead of the step (0: none)
    config.batch_size = 256  # global, over all devices and hosts
    config.eval_batch_size = 0  # 0: same as batch_size
    # Micro-batches per step (gradients averaged, one optimizer update): batch_size // k examples
    # go through the model at a time. BatchNorm normalises each micro-batch on its own.
    config.grad_accum_steps = 1
    # BatchNorm statistics in training: 0 = over the whole (micro-)batch on all devices ("sync BN");
    # k = over groups of k examples, like per-device BN in pmap codes (k must divide each device's share).
    config.bn_group_size = 0
    # models.FOLD_BN. on: each BatchNorm after a stride-1 1x1 convolution (bottlenecks' last conv,
    # stride-1 projections) is computed with that convolution as one: statistics from the input's
    # covariance, normalisation folded into the kernel; the same model up to float rounding.
    # off: conv, then nn.BatchNorm. auto: on for TPU meshes only (docs/benchmarks.md says why).
    config.fold_bn = "auto"
    # The ImageNet stem's 7x7 stride-2 convolution computed on 2x2 blocks of the image (12 input
    # channels instead of 3; Google's MLPerf ResNet): the same parameters and outputs. Even image sides.
    config.space_to_depth_stem = False
    # > 0: the image padded with zero channels to this many before the first convolution (its kernel
    # too, in the forward pass; same parameters and outputs). 4: cuDNN's first-layer NHWC kernels.
    config.pad_input_channels = 0
    # norms.BN_FORMS: how each BatchNorm not folded writes its normalisation, the same function
    # either way. centered: nn.BatchNorm's (x - mean) * a + bias; affine: x * a + (bias - mean * a),
    # whose backward XLA's CUDA backend compiles to fewer kernels and bytes (docs/benchmarks.md).
    config.bn_form = "centered"

    # Length: num_train_steps > 0 overrides num_epochs.
    config.num_epochs = 90.0
    config.num_train_steps = -1

    # Optimisation: optim.OPTIMIZERS. learning_rate and weight_decay left at None take the
    # optimizer's defaults (optim.DEFAULT_LEARNING_RATES / DEFAULT_WEIGHT_DECAYS). The learning
    # rate is for the global batch.
    config.optimizer = "nesterov"
    config.learning_rate = ml_collections.config_dict.placeholder(float)
    config.momentum = 0.9  # momentum, nesterov, lars
    config.b1 = 0.9  # adam, adamw, lamb
    config.b2 = 0.999
    config.eps = ml_collections.config_dict.placeholder(float)  # None: the optimizer's own
    config.rmsprop_decay = 0.9
    config.adagrad_initial_accumulator = 0.1
    config.trust_coefficient = ml_collections.config_dict.placeholder(float)  # lars 1e-3, lamb 1.0
    config.weight_decay = ml_collections.config_dict.placeholder(float)
    config.weight_decay_mode = "auto"  # optim.WEIGHT_DECAY_MODES (auto: decoupled for adamw/lars/lamb)
    config.weight_decay_mask = "kernels"  # optim.WEIGHT_DECAY_MASKS (kernels: conv and dense)
    config.grad_clip_norm = 0.0  # 0: no clipping

    config.lr_schedule = "cosine"  # optim.SCHEDULES, after a warmup
    config.warmup_epochs = 5.0  # clipped to the run's length
    config.warmup_style = "linear"  # optim.WARMUP_STYLES (linear: from warmup_factor x lr up to lr)
    config.warmup_factor = 0.0
    config.lr_end_factor = 0.0  # cosine/linear/polynomial end at this x lr
    config.lr_step_epochs = (30, 60, 80)  # step: multiply by lr_decay_factor at these epochs
    config.lr_decay_factor = 0.1
    config.lr_power = 2.0  # polynomial

    # Loss: step.LOSSES (bce: per-class sigmoid binary cross-entropy as timm's; with
    # bce_target_threshold, targets above it become 1).
    config.loss = "softmax"
    config.bce_target_threshold = ml_collections.config_dict.placeholder(float)

    # Regularisation.
    config.label_smoothing = 0.0
    config.mixup_alpha = 0.0  # > 0: mixup with lambda ~ Beta(alpha, alpha)
    config.cutmix_alpha = 0.0  # > 0: cutmix; with both, one of the two per batch
    config.mixup_switch_prob = 0.5  # with both: probability of cutmix
    config.mixup_prob = 1.0  # probability that a batch is mixed at all
    config.ema_decay = 0.0  # > 0: keep an EMA of params and BatchNorm statistics; evaluate it
    config.drop_path_rate = 0.0  # stochastic depth, rising linearly to this over the blocks
    config.dropout_rate = 0.0  # before the classifier

    # Mixed precision: dtype float16 adds dynamic loss scaling (halve on overflow and skip the step,
    # double after loss_scale_period good steps).
    config.loss_scale_init = 2.0**15
    config.loss_scale_period = 2000

    config.seed = 0  # init, data order and augmentation

    # Cadence in steps; 0 = once per epoch.
    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 3  # the last K, plus the best by eval accuracy
    config.skip_nonfinite_steps = False  # False: stop at a non-finite loss/gradient; True: skip and count
    # step.GRAD_NORMS: the logged gradient norm (which also tests the step for inf/NaN) as one
    # square-sum per parameter, or one reduction over their concatenation. auto: concatenated on
    # CPU meshes (faster compiles), per parameter elsewhere (docs/benchmarks.md has both's costs).
    config.grad_norm = "auto"

    # Watching a run (docs/training.md): progress = progress.PROGRESS_MODES (auto: a bar on a
    # terminal, else lines); eval_images = eval images with predicted labels in TensorBoard after
    # each eval (0: none); profile_steps = "START:END" writes a jax.profiler trace of those steps
    # to WORKDIR/profile ("": off).
    config.progress = "auto"
    config.eval_images = 8
    config.profile_steps = ""

    # The watchdog (docs/scaling.md, "When a run hangs"): a process that completes no unit of work (a
    # train step, an eval batch) for watchdog_seconds prints its Python stacks and exits with status
    # 3. 0: automatic, 10 x the longest step + the longest compile, at least 60 s. Compiling, the
    # first evaluation and checkpoint saves may take up to watchdog_compile_seconds.
    config.watchdog_seconds = 0.0
    config.watchdog_compile_seconds = 1800.0

    # JAX's persistent compilation cache: None = ~/.cache/resnet_jax/jax_cache, '' = off.
    config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    return config
