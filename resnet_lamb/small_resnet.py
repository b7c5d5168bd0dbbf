"""``model.arch: small_resnet``: a tiny CIFAR-style ResNet for the CPU proxy study, built from
torchvision's own :class:`~torchvision.models.resnet.BasicBlock`: a 3x3 stride-2 stem (the ImageNet
ResNet's stem downsampling without its max-pool: a quarter of the FLOPs of a stride-1 stem), three stages
of one BasicBlock each (widths 16 / 32 / 64, strides 1 / 2 / 2, BatchNorm after every convolution),
global average pooling and a linear head.  It has BatchNorm, which the proxy's MLP lacks and which the
paper's ResNet-50 claim is about; torchvision's resnet18 is far too slow on a 2-core CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

WIDTHS = (16, 32, 64)


class SmallResNet(nn.Module):
    """3-channel images of any size >= 8 px -> ``num_classes`` logits; ``norm_layer`` as torchvision's
    (e.g. ghost BatchNorm); weights initialised as torchvision's ResNet does."""

    def __init__(
        self,
        num_classes: int = 10,
        zero_init_residual: bool = False,
        norm_layer: Callable[[int], nn.Module] | None = None,
        widths: tuple[int, ...] = WIDTHS,
    ):
        super().__init__()
        norm = norm_layer or nn.BatchNorm2d
        stem = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.stem = nn.Sequential(stem, norm(widths[0]), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        width = widths[0]
        for i, out in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or width != out:
                down = nn.Sequential(conv1x1(width, out, stride), norm(out))
            blocks.append(BasicBlock(width, out, stride, down, norm_layer=norm))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))
