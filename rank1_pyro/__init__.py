"""rank1_pyro: scalable Bayesian deep learning in Pyro.

Rank-1 Bayesian neural networks (Dusenberry et al., 2020), subnetwork linearized Laplace
(Daxberger et al., 2021) and the null-space projected posterior (Miani et al., 2025).
"""

import importlib

# The public names are imported lazily (PEP 562), on first use: ``import rank1_pyro`` (and the
# ``rank1-pyro`` command's start, ``--help``) does not pay for torch and Pyro until they are needed.
_LAZY = {
    **dict.fromkeys(
        ["AveragedELBO", "CauchyGuide", "DeltaGuide", "MixtureELBO", "MixtureGuide", "TrainConfig"], ".inference"
    ),
    **dict.fromkeys(["Rank1Conv2d", "Rank1Linear", "Rank1LSTM", "members"], ".layers"),
    **dict.fromkeys(["Rank1Model", "mlp", "network", "rank1_mlp", "rank1_network", "set_prior"], ".models"),
    **dict.fromkeys(["RunConfig", "load_config"], ".config"),
    **dict.fromkeys(["run_hmc"], ".inference.hmc"),
    **dict.fromkeys(
        [
            "Cauchy",
            "Gaussian",
            "HalfCauchy",
            "HalfNormal",
            "InverseGammaVariance",
            "LogNormalScale",
            "PriorMap",
            "make_prior",
        ],
        ".priors",
    ),
    **dict.fromkeys(["load_run"], ".runs"),
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule, e.g. ``rank1_pyro.metrics`` after a bare ``import rank1_pyro``
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "TrainConfig",
    "Rank1Linear",
    "Rank1Conv2d",
    "Rank1LSTM",
    "members",
    "Rank1Model",
    "rank1_mlp",
    "mlp",
    "network",
    "rank1_network",
    "RunConfig",
    "load_config",
    "set_prior",
    "Gaussian",
    "Cauchy",
    "HalfCauchy",
    "HalfNormal",
    "LogNormalScale",
    "InverseGammaVariance",
    "PriorMap",
    "make_prior",
    "MixtureGuide",
    "DeltaGuide",
    "CauchyGuide",
    "AveragedELBO",
    "MixtureELBO",
    "load_run",
]
