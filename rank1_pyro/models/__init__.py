"""Rank-1 Bayesian models: the Pyro model wrapper (:class:`Rank1Model`) and the model zoo (:mod:`.zoo`)."""

from .base import LIKELIHOODS, Rank1Model, set_prior
from .lenet import lenet5_net
from .lstm import LSTMClassifier, lstm_net
from .mlp import mlp, rank1_mlp
from .params import ParameterCounts, parameter_counts, parameter_table
from .resnet import (
    CifarResNet,
    resnet18_cifar_net,
    resnet20_cifar_net,
    resnet50_net,
)
from .wide_resnet import WideResNet, wide_resnet_net
from .zoo import ZOO, ZooEntry, network, rank1_network

__all__ = [
    "Rank1Model",
    "set_prior",
    "LIKELIHOODS",
    "mlp",
    "rank1_mlp",
    "lenet5_net",
    "resnet18_cifar_net",
    "resnet20_cifar_net",
    "resnet50_net",
    "CifarResNet",
    "wide_resnet_net",
    "WideResNet",
    "lstm_net",
    "LSTMClassifier",
    "ParameterCounts",
    "parameter_counts",
    "parameter_table",
    "ZOO",
    "ZooEntry",
    "network",
    "rank1_network",
]
