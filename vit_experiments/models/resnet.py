"""ResNet: the convolutional teacher for DeiT's distillation.

He et al. 2016, "Deep Residual Learning for Image Recognition" (https://arxiv.org/abs/1512.03385), with the
stride on the 3x3 convolution of the bottleneck block ("ResNet v1.5", as most code bases train it) and the last
BatchNorm of every residual branch optionally zero-initialised (Goyal et al. 2017, "Accurate, Large Minibatch
SGD"), so each block starts as the identity. DeiT (Touvron et al. 2021) found a convolutional teacher gives the
best students, because its inductive bias reaches the transformer through the distillation token.

Parameter and buffer names follow the common ResNet layout (conv1, bn1, layer1.0.conv1, layer1.0.bn1, ...,
layer2.0.downsample.0/1, fc), so a ResNet state dict written in that layout by other code loads by name.

The "cifar" stem (a 3x3 stride-1 convolution and no max-pool) keeps a 32-px image at 32x32 through layer1,
where the ImageNet stem (7x7 stride-2 convolution and a max-pool) would shrink it to 8x8 at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# depth -> (block type, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("imagenet", "cifar")


@dataclass
class ResNetConfig:
    """Everything needed to build a ResNet. The fields are plain types so a task can save them in a checkpoint."""

    depth: int = 18
    """18 | 34 (basic blocks), 50 | 101 | 152 (bottleneck blocks)"""
    num_classes: Optional[int] = None
    """size of the label set; 0 gives no classifier (pooled features only). None: `vitx fit` takes it from the data
    (classes.json); a network built with None has ImageNet's 1000 outputs"""
    image_size: int = 224
    """the resolution the network is trained and evaluated at; the network accepts any size, but a teacher is fed at
    this one (DeiT: "the teacher sees the image at its own resolution")"""
    stem: str = "imagenet"
    """"imagenet": 7x7/2 convolution + 3x3/2 max-pool (224-px images); "cifar": 3x3/1 convolution, no pool (32 px)"""
    base_width: int = 64
    """channels of the first stage (64 in the paper); stages double it. Smaller values give a CPU-sized teacher with
    the same parameter names"""
    in_chans: int = 3
    zero_init_residual: bool = True
    """start every residual branch at zero (its last BatchNorm's scale), so the network starts as a shallow one"""

    def __post_init__(self):
        if self.depth not in DEPTHS:
            raise ValueError(f"unknown ResNet depth {self.depth}; choose one of {', '.join(map(str, DEPTHS))}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        for f in ("image_size", "base_width", "in_chans"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)}")
        if self.num_classes is None:
            self.num_classes = 1000
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {self.num_classes}")

    @property
    def block(self) -> str:
        return DEPTHS[self.depth][0]

    @property
    def num_features(self) -> int:
        """Channels of the pooled feature vector: 8x the base width, 4x more for bottleneck blocks."""
        return self.base_width * 8 * (4 if self.block == "bottleneck" else 1)


@contextlib.contextmanager
def _frozen_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` keep their running statistics (momentum 0) inside the block: the recomputation
    of a checkpointed stage in the backward pass must not count its batch a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)  # BN follows: no bias


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions on the residual branch (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, width, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand by 4 on the residual branch (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # v1.5: stride here, not on conv1, keeps more information
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, 4*width, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4*width, H/s, W/s)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """stem -> layer1..layer4 (stages at widths w, 2w, 4w, 8w; stride 2 from layer2 on) -> global average -> fc."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.base_width
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_chans, w, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(cfg.in_chans, w)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = w
        blocks = DEPTHS[cfg.depth][1]
        self.layer1 = self._make_stage(block, w, blocks[0], stride=1)
        self.layer2 = self._make_stage(block, 2 * w, blocks[1], stride=2)
        self.layer3 = self._make_stage(block, 4 * w, blocks[2], stride=2)
        self.layer4 = self._make_stage(block, 8 * w, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False  # set_grad_checkpointing
        self.init_weights()

    def _make_stage(self, block, width: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            # the shortcut must match the branch's shape: a strided 1x1 projection (option B of the paper)
            downsample = nn.Sequential(
                conv1x1(self.inplanes, width * block.expansion, stride), nn.BatchNorm2d(width * block.expansion)
            )
        layers = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def init_weights(self):
        """He (fan-out) initialisation for convolutions, BatchNorm at the identity, optionally zero residuals."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def no_weight_decay(self) -> set:
        """Nothing beyond the 1-D parameters (BatchNorm scales and shifts, biases) that every task skips."""
        return set()

    # ---- scaling hooks (the same API as the ViT's): the residual stages are the units ----------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per residual stage: a stage keeps only its input and recomputes its
        activations in the backward pass, with its BatchNorm statistics frozen during the recomputation."""
        self.grad_checkpointing = enable

    def scaling_units(self) -> list[nn.Module]:
        """The residual stages layer1..layer4: sharded, compiled and checkpointed one by one."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def param_layer(self, name: str) -> int:
        """0 for the stem, i for layer<i>, 5 for the classifier (layer-wise learning-rate decay)."""
        head = name.split(".")[0]
        if head.startswith("layer") and head[5:].isdigit():
            return int(head[5:])
        return self.num_layers() if head == "fc" else 0

    def num_layers(self) -> int:
        return 5

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _frozen_batchnorm_statistics(stage)))
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the last stage's feature map (B, num_features, H/s, W/s), s = 32 or 8 (cifar)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected images of shape (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H/4, W/4), or (B, w, H, W) for cifar
        for stage in self.scaling_units():
            x = self._run_stage(stage, x)  # (B, w_i, H_i, W_i)
        return x  # (B, num_features, h, w)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map (B, F, h, w) -> logits (B, num_classes), or the pooled features (B, F) with pre_logits."""
        x = self.avgpool(features).flatten(1)  # (B, F)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)

    def reset_classifier(self, num_classes: int):
        """A new zero-initialised classifier for another label set (0 = none). Create the optimizer after this."""
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        ref = self.bn1.weight
        fc = nn.Linear(self.cfg.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.fc = fc.to(device=ref.device, dtype=ref.dtype)


def build_resnet(depth: int = 18, **overrides) -> ResNet:
    """build_resnet(50, num_classes=10, stem="cifar", image_size=32) -> ResNet."""
    return ResNet(ResNetConfig(depth=depth, **overrides))
