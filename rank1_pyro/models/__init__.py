"""Rank-1 Bayesian models: the Pyro model wrapper and the model zoo."""

from .base import LIKELIHOODS, Rank1Model, set_prior
from .mlp import mlp, rank1_mlp
from .lenet import lenet5, lenet5_net
from .lstm import LSTMClassifier, lstm_classifier, lstm_net
from .resnet import (
    CifarResNet,
    resnet18_cifar,
    resnet18_cifar_net,
    resnet20_cifar,
    resnet20_cifar_net,
    resnet50_imagenet,
    resnet50_net,
)
from .wide_resnet import WideResNet, wide_resnet28_10, wide_resnet_net
from .params import ParameterCounts, parameter_counts, parameter_table
from .configs import RunConfig, load_config

__all__ = [
    "Rank1Model",
    "set_prior",
    "LIKELIHOODS",
    "mlp",
    "rank1_mlp",
    "lenet5",
    "lenet5_net",
    "resnet18_cifar",
    "resnet18_cifar_net",
    "resnet20_cifar",
    "resnet20_cifar_net",
    "resnet50_imagenet",
    "resnet50_net",
    "CifarResNet",
    "wide_resnet28_10",
    "wide_resnet_net",
    "WideResNet",
    "lstm_classifier",
    "lstm_net",
    "LSTMClassifier",
    "ParameterCounts",
    "parameter_counts",
    "parameter_table",
    "RunConfig",
    "load_config",
]
