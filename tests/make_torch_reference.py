"""PyTorch reference logits for the weight-import parity test (tests/test_weights.py).

    python tests/make_torch_reference.py     # needs torch (CPU); writes tests/data/torch_reference.npz

Small PyTorch ResNets written here with torchvision's and timm's module names (neither library is
needed) are filled with seeded random weights, random BatchNorm running statistics included, and
run in eval mode on a seeded input. The file stores, per architecture, only the state dict's key
names and shapes, the seeds and the logits (a few KB); the test rebuilds the same numpy state dict
from the seeds, converts it with `resnet_jax.weights` and compares logits without torch. Where
torch is installed the test also compares against these modules live.
"""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "torch_reference.npz"
INPUT_SHAPE = (2, 3, 50, 38)  # NCHW; odd sizes on the way down exercise padding and ceil-mode pooling
NUM_CLASSES = 10
# name -> (source, torch constructor options)
ARCHITECTURES = {
    "resnet18": ("torchvision", dict(block="basic", layers=(2, 2, 2, 2))),
    "resnet50": ("torchvision", dict(block="bottleneck", layers=(3, 4, 6, 3))),
    "resnext50_32x4d": (
        "torchvision",
        dict(block="bottleneck", layers=(3, 4, 6, 3), groups=32, base_width=4),
    ),
    "wide_resnet50_2": ("torchvision", dict(block="bottleneck", layers=(3, 4, 6, 3), base_width=128)),
    "resnet50d": ("timm", dict(block="bottleneck", layers=(3, 4, 6, 3), deep_stem=True, avg_down=True)),
    "resnet18d": ("timm", dict(block="basic", layers=(2, 2, 2, 2), deep_stem=True, avg_down=True)),
    "seresnet50": ("timm", dict(block="bottleneck", layers=(3, 4, 6, 3), se=True)),
    # timm's pre-activation ResNetV2 (resnetv2_50, resnetv2_18) with BatchNorm and plain convolutions
    "preact_resnet50": ("timm", dict(block="bottleneck", layers=(3, 4, 6, 3), v2=True)),
    "preact_resnet18": ("timm", dict(block="basic", layers=(2, 2, 2, 2), v2=True)),
}


def random_state_dict(keys: list[str], shapes: list[tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Seeded values for a state dict's keys: He-scaled conv and linear weights, BatchNorm affine and
    running statistics away from their defaults (so that a swapped or dropped one shows)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in zip(keys, shapes, strict=True):
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(7, np.int64)
        elif key.endswith("running_mean"):
            state[key] = rng.normal(0.0, 0.2, shape)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("weight") and len(shape) == 1:  # BatchNorm scale
            state[key] = rng.uniform(0.3, 1.0, shape)
        elif key.endswith("bias"):
            state[key] = rng.normal(0.0, 0.1, shape)
        else:  # conv OIHW or linear (out, in)
            fan_in = math.prod(shape[1:])
            state[key] = rng.normal(0.0, math.sqrt(1.0 / fan_in), shape)
        state[key] = state[key].astype(np.int64 if key.endswith("num_batches_tracked") else np.float32)
    return state


def reference_input(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=INPUT_SHAPE).astype(np.float32)


def build_torch_model(options: dict):
    """A torchvision/timm-compatible ResNet in PyTorch (key names as theirs)."""
    import torch
    from torch import nn

    def make_divisible(v, divisor=8):
        return max(divisor, int(v + divisor / 2) // divisor * divisor)

    class SEModule(nn.Module):
        def __init__(self, channels):
            super().__init__()
            reduced = make_divisible(channels / 16)
            self.fc1 = nn.Conv2d(channels, reduced, 1, bias=True)
            self.fc2 = nn.Conv2d(reduced, channels, 1, bias=True)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride, downsample, groups, base_width, se):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.se = SEModule(planes) if se else None
            self.downsample = downsample

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if self.se is not None:
                y = self.se(y)
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride, downsample, groups, base_width, se):
            super().__init__()
            width = int(planes * base_width / 64) * groups
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.se = SEModule(planes * 4) if se else None
            self.downsample = downsample

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            if self.se is not None:
                y = self.se(y)
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self, block, layers, groups=1, base_width=64, deep_stem=False, avg_down=False, se=False):
            super().__init__()
            block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
            if deep_stem:  # timm's stem_type='deep', stem_width=32
                self.conv1 = nn.Sequential(
                    nn.Conv2d(3, 32, 3, 2, 1, bias=False),
                    nn.BatchNorm2d(32),
                    nn.ReLU(),
                    nn.Conv2d(32, 32, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(32),
                    nn.ReLU(),
                    nn.Conv2d(32, 64, 3, 1, 1, bias=False),
                )
            else:
                self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inplanes = 64
            for i, count in enumerate(layers):
                planes, stride = 64 * 2**i, 1 if i == 0 else 2
                blocks = []
                for j in range(count):
                    downsample = None
                    out = planes * block.expansion
                    if j == 0 and (stride != 1 or inplanes != out):
                        conv = nn.Conv2d(inplanes, out, 1, 1 if avg_down else stride, bias=False)
                        if avg_down:
                            pool = (
                                nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                                if stride > 1
                                else nn.Identity()
                            )
                            downsample = nn.Sequential(pool, conv, nn.BatchNorm2d(out))
                        else:
                            downsample = nn.Sequential(conv, nn.BatchNorm2d(out))
                    blocks.append(
                        block(inplanes, planes, stride if j == 0 else 1, downsample, groups, base_width, se)
                    )
                    inplanes = out
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(inplanes, NUM_CLASSES)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return self.fc(x.mean((2, 3)))

    class PreActBlock(nn.Module):
        """timm's PreActBasic / PreActBottleneck (BatchNorm-ReLU as norm layers)."""

        def __init__(self, in_chs, out_chs, stride, bottleneck, project):
            super().__init__()
            mid = out_chs // 4 if bottleneck else out_chs
            self.downsample = DownsampleConv(in_chs, out_chs, stride) if project else None
            self.norm1 = nn.BatchNorm2d(in_chs)
            if bottleneck:
                self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
                self.norm2 = nn.BatchNorm2d(mid)
                self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
                self.norm3 = nn.BatchNorm2d(mid)
                self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
            else:
                self.conv1 = nn.Conv2d(in_chs, mid, 3, stride, 1, bias=False)
                self.norm2 = nn.BatchNorm2d(mid)
                self.conv2 = nn.Conv2d(mid, out_chs, 3, 1, 1, bias=False)
            self.bottleneck = bottleneck

        def forward(self, x):
            pre = torch.relu(self.norm1(x))
            shortcut = x if self.downsample is None else self.downsample(pre)
            y = self.conv1(pre)
            y = self.conv2(torch.relu(self.norm2(y)))
            if self.bottleneck:
                y = self.conv3(torch.relu(self.norm3(y)))
            return y + shortcut

    class DownsampleConv(nn.Module):
        def __init__(self, in_chs, out_chs, stride):
            super().__init__()
            self.conv = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

        def forward(self, x):
            return self.conv(x)

    class Stage(nn.Module):
        def __init__(self, blocks):
            super().__init__()
            self.blocks = nn.Sequential(*blocks)

        def forward(self, x):
            return self.blocks(x)

    class ResNetV2(nn.Module):
        """timm's ResNetV2 layout: stem.conv/pool, stages.S.blocks.B, norm, head.fc (a 1x1 conv)."""

        def __init__(self, block, layers, v2=True):
            super().__init__()
            bottleneck = block == "bottleneck"
            self.stem = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(3, 64, 7, 2, 3, bias=False), pool=nn.MaxPool2d(3, 2, 1))
            )
            stages, in_chs = [], 64
            for i, count in enumerate(layers):
                out_chs = 64 * 2**i * (4 if bottleneck else 1)
                blocks = []
                for j in range(count):
                    stride = 2 if i > 0 and j == 0 else 1
                    project = j == 0 and (bottleneck or stride != 1 or in_chs != out_chs)
                    blocks.append(PreActBlock(in_chs, out_chs, stride, bottleneck, project))
                    in_chs = out_chs
                stages.append(Stage(blocks))
            self.stages = nn.Sequential(*stages)
            self.norm = nn.BatchNorm2d(in_chs)
            self.head = nn.Module()
            self.head.fc = nn.Conv2d(in_chs, NUM_CLASSES, 1, bias=True)

        def forward(self, x):
            x = torch.relu(self.norm(self.stages(self.stem(x))))
            return self.head.fc(x.mean((2, 3), keepdim=True)).flatten(1)

    return ResNetV2(**options) if options.get("v2") else ResNet(**options)


def torch_logits(model, state: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    import torch

    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def make_reference(name: str, seed: int) -> dict[str, np.ndarray]:
    source, options = ARCHITECTURES[name]
    model = build_torch_model(options)
    keys = list(model.state_dict())
    shapes = [tuple(v.shape) for v in model.state_dict().values()]
    state = random_state_dict(keys, shapes, seed)
    logits = torch_logits(model, state, reference_input(seed))
    spec = dict(source=source, seed=seed, input_shape=INPUT_SHAPE, keys=keys, shapes=shapes)
    return {f"{name}/spec": np.array(json.dumps(spec)), f"{name}/logits": logits}


def main() -> int:
    import torch

    torch.manual_seed(0)
    arrays = {}
    for seed, name in enumerate(ARCHITECTURES):
        arrays.update(make_reference(name, seed))
        logits = arrays[f"{name}/logits"]
        print(f"{name}: logits {logits.shape}, |max| {np.abs(logits).max():.3f}")
    DATA.parent.mkdir(exist_ok=True)
    np.savez_compressed(DATA, **arrays)
    print(f"wrote {DATA} ({DATA.stat().st_size / 1024:.0f} KB), torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
