r"""Residual networks: CIFAR ResNet-18/20 and ImageNet ResNet-50, deterministic (their rank-1
models: ``rank1_network(name, ...)`` of :mod:`.zoo`).

The CIFAR networks (He et al., 2016) use a 3x3 stride-1 stem without max pooling, stages of
torchvision's :class:`~torchvision.models.resnet.BasicBlock`, global average pooling and one
dense layer; a block that changes resolution or width has a projection shortcut (1x1
convolution + BatchNorm). ResNet-50 is torchvision's. The rank-1 models convert *every*
convolution (stem and 1x1 shortcuts included) and the dense layer, as the reference does;
BatchNorm stays deterministic (shared over members by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from .._checks import positive_int

__all__ = [
    "CifarResNet",
    "resnet18_cifar_net",
    "resnet20_cifar_net",
    "resnet50_net",
]


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet of :class:`~torchvision.models.resnet.BasicBlock` stages.

    Args:
        num_blocks: blocks per stage, e.g. ``(3, 3, 3)`` (ResNet-20) or ``(2, 2, 2, 2)`` (ResNet-18).
        widths: channels per stage, e.g. ``(16, 32, 64)`` or ``(64, 128, 256, 512)``; every
            stage after the first halves the resolution.
        num_classes, in_channels: output classes, input image channels.

    Module names follow torchvision's ResNet (``conv1, bn1, layer1.., avgpool, fc``).
    """

    def __init__(self, num_blocks: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        num_blocks, widths = list(num_blocks), list(widths)
        if not num_blocks or len(num_blocks) != len(widths):
            raise ValueError(f"num_blocks and widths must be non-empty and of equal length, got {num_blocks}, {widths}")
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            positive_int(f"num_blocks[{i}]", n)
            positive_int(f"widths[{i}]", w)
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        planes = widths[0]
        for i, (n, width) in enumerate(zip(num_blocks, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                downsample = None
                if j == 0 and (stride != 1 or planes != width):
                    downsample = nn.Sequential(
                        nn.Conv2d(planes, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
                    )
                blocks.append(BasicBlock(planes, width, stride if j == 0 else 1, downsample))
                planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar_net(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Deterministic CIFAR ResNet-18: stages (2, 2, 2, 2) of widths 64-128-256-512 (11.2M weights)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


def resnet20_cifar_net(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Deterministic CIFAR ResNet-20: stages (3, 3, 3) of widths 16-32-64, projection shortcuts."""
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels)


def resnet50_net(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50, randomly initialised (``weights=None``; nothing is downloaded)."""
    positive_int("num_classes", num_classes)
    return torchvision.models.resnet50(weights=None, num_classes=num_classes)
