"""LeNet-5 (LeCun et al., 1998); its rank-1 model is ``rank1_network("lenet5", ...)`` (:mod:`.zoo`)."""

from __future__ import annotations

from torch import nn

from .._checks import positive_int

__all__ = ["lenet5_net"]


def lenet5_net(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """The deterministic LeNet-5: two 5x5 convolutions (6, 16 channels) and dense 120-84-classes.

    The first convolution pads by 2, so a 28x28 image reaches the dense layers as 16x5x5 (as
    LeNet-5's 32x32 input does). The second pooling is adaptive to a 5x5 map (identical to
    2x2 max pooling on 28x28 inputs), so any input of at least 12x12 pixels works.
    """
    positive_int("num_classes", num_classes)
    positive_int("in_channels", in_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(5),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )
