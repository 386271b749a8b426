"""Fine-tune an ImageNet-pretrained ResNet-50 on an image folder (one sub-folder per class).

    python -m resnet_jax.convert --from torchvision --model resnet50 resnet50-11ad3fa6.pth \
        --out runs/resnet50_torchvision
    python train.py --config configs/finetune_folder.py --workdir runs/finetune \
        --config.dataset=folder:/path/to/images [--config.freeze_backbone=True]

The classifier is replaced (fresh init) when the folder has another number of classes than 1000.
The numbers follow common transfer-learning practice (Kornblith et al. 2019, "Do Better ImageNet
Models Transfer Better?"): SGD with momentum at a tenth of the from-scratch learning rate
(0.1 x batch/256), short cosine schedule with one warmup epoch, light weight decay, label smoothing.
`freeze_backbone=True` is linear probing: only `fc` learns (BatchNorm statistics stay as loaded), for
which a larger learning rate and no weight decay work better: add `--config.learning_rate=0.1
--config.weight_decay=0`.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet50"
    config.init_from = "runs/resnet50_torchvision"  # written by python -m resnet_jax.convert
    config.freeze_backbone = False
    config.dataset = "folder:data/images"  # set with --config.dataset=folder:PATH
    config.image_size = 224
    config.augment = "imagenet"  # random-resized crops and flips; eval: resize 256, center crop 224
    config.batch_size = 64
    config.num_epochs = 10.0
    config.optimizer = "momentum"
    config.learning_rate = 0.0025  # 0.1 x 64/256, divided by 10 for fine-tuning
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    config.log_every_steps = 10
    config.eval_every_steps = 0  # every epoch
    return config
