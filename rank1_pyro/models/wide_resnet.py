r"""Wide residual networks (Zagoruyko & Komodakis, 2016): WRN-28-10 (rank-1: ``rank1_network("wrn28_10", ...)``).

WRN-d-w has a 3x3 stem of 16 channels, three groups of :math:`n = (d - 4) / 6` pre-activation
blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) of widths 16w, 32w, 64w (strides 1, 2, 2), a final
BN-ReLU, global average pooling and one dense layer. A block that changes width or resolution
adds a 1x1 convolution on its input as the shortcut. This is the layout of the rank-1
reference (uncertainty-baselines' ``wide_resnet_rank1``), where every convolution and the dense
layer are rank-1; WRN-28-10 has 36.5M weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int

__all__ = ["WideBasicBlock", "WideResNet", "wide_resnet_net"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x)``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` (see the module docstring); ``depth`` must be 6n + 4."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        positive_int("depth", depth)
        positive_int("width", width)
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        planes = 16
        for i, (widen, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(planes, widen * width, stride if j == 0 else 1))
                planes = widen * width
            setattr(self, f"group{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():  # He-normal convolutions and dense kernel, as the reference
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def wide_resnet_net(depth: int = 28, width: int = 10, num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """Deterministic WRN-``depth``-``width`` (WRN-10-1 is a tiny one for tests)."""
    return WideResNet(depth, width, num_classes, in_channels)
