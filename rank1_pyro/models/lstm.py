r"""LSTM sequence classifiers (the rank-1 paper's EHR task family), deterministic and rank-1.

An :class:`LSTMClassifier` reads a batch of sequences ``(B, T, input_size)`` with a one-layer
batch-first :class:`torch.nn.LSTM`, takes the last hidden state :math:`h_T` and maps it through
a dense head (:func:`~rank1_pyro.models.mlp`, optional hidden layers with ReLU) to the class
logits. The rank-1 version (``rank1_network("lstm", ...)``) converts the LSTM (factors on both kernels, one draw per sequence
reused at every step) and every dense layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import positive_int
from .mlp import mlp

__all__ = ["LSTMClassifier", "lstm_net"]


class LSTMClassifier(nn.Module):
    """``head(h_T)`` with ``_, (h, _) = lstm(x)``, ``h_T = h[-1]``."""

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, dense_hidden: Sequence[int] = ()):
        super().__init__()
        positive_int("input_size", input_size)
        positive_int("hidden_size", hidden_size)
        positive_int("num_classes", num_classes)
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.head = mlp(hidden_size, list(dense_hidden), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


def lstm_net(input_size: int, hidden_size: int, num_classes: int, dense_hidden: Sequence[int] = ()) -> LSTMClassifier:
    """The deterministic :class:`LSTMClassifier`."""
    return LSTMClassifier(input_size, hidden_size, num_classes, dense_hidden)
