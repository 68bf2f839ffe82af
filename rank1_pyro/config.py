r"""Run configurations: one experiment declaratively, and the paper's runs ready to use.

A :class:`RunConfig` is a declarative description of one experiment (data set, network, prior,
guide, objective, optimisation schedule). The paper's runs ship as TOML files under
``rank1_pyro/configs/``:

* ``cifar10_wrn28_10`` / ``cifar100_wrn28_10``: WRN-28-10, K = 4, prior N(1, 0.1²), random-sign
  init P(+1) = 0.5, 250 epochs of SGD-Nesterov (momentum 0.9), learning rate 0.1 × batch / 128
  with one warm-up epoch and ×0.1 at epochs 100, 200, 225, KL annealing over 200 epochs, L2 1e-4.
* ``imagenet_resnet50``: ResNet-50, prior N(1, 0.05²), sign init 0.75, 135 epochs, learning rate
  0.1 × batch / 256, ×0.1 at epochs 45, 90, 120, KL annealing over 90 epochs.

Batch size as in the reference: ``per_core_batch_size`` counts the *tiled* rows a device sees,
so every step reads ``per_core_batch_size // ensemble_size × num_cores`` new examples
(CIFAR: 64 / 4 × 8 = 128; ImageNet: 128 / 4 × 32 = 1024) and the learning rate is
``base_learning_rate × batch_size / lr_reference_batch``. The reference L2 term is
``l2 · Σ w²`` over W, biases and BatchNorm (never the factors), i.e. SGD weight decay ``2 · l2``
on the model's parameters (:meth:`RunConfig.train_config`).

::

    cfg = load_config("cifar10_wrn28_10")
    model, guide = cfg.build(num_data=50_000)
    train_set, test_set = cfg.datasets("~/data")       # never downloads
    history = train(model, guide, DataLoader(train_set, cfg.batch_size, shuffle=True), cfg.train_config())

One concept, one module (hence over 400 lines): one experiment's declarative description (:class:`RunConfig`: its keys, their validation and defaults table, and how it builds model, guide, objective, schedule and data).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal

from . import convert
from ._checks import number, one_of, positive_int
from .inference.guides import CauchyGuide, DeltaGuide, MixtureGuide
from .inference.objectives import ESTIMATORS, OBJECTIVES
from .inference.train_config import PRECISIONS, TrainConfig
from .models.base import Rank1Model
from .models.zoo import ZOO, rank1_network
from .priors import FactorPrior, make_prior

__all__ = [
    "RunConfig",
    "load_config",
    "CONFIGS",
    "OFFLINE_DATASETS",
    "CONFIG_DIR",
    "DATASETS",
    "GUIDES",
    "FILE_DATASETS",
    "LIKELIHOODS",
    "CONFIG_HELP",
    "defaults_table",
]


#: the directory of the shipped TOML configurations
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Pyro autoguides a config may name (they run on the same model: the factors are ordinary sites)
AUTOGUIDES = {"autonormal": AutoNormal, "autolowrank": AutoLowRankMultivariateNormal}
GUIDES = {"mixture": MixtureGuide, "delta": DeltaGuide, "cauchy": CauchyGuide, **AUTOGUIDES}
#: data set name -> number of classes
DATASETS = {"digits": 10, "fashion_mnist": 10, "mnist1d": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}
#: the data sets this machine can load offline (:mod:`rank1_pyro.data`), as tensors
OFFLINE_DATASETS = ("digits", "fashion_mnist", "mnist1d")
#: the user's own files (:mod:`rank1_pyro.files`), described by the config's ``data`` table
FILE_DATASETS = ("csv", "parquet", "npz", "npy", "image_folder")
#: the observation models a config may name: classification (``categorical``) or regression (``normal``)
LIKELIHOODS = ("categorical", "normal")
_PRIOR_KEYS = ("family", "loc", "scale")


#: one line per :class:`RunConfig` key: what it means (the docs' table of defaults, :func:`defaults_table`)
CONFIG_HELP = {
    "name": "the run's name (the default run directory is `runs/<name>-<time>`)",
    "dataset": "digits, fashion_mnist, mnist1d, cifar10, cifar100, imagenet, or your files: csv, parquet, npz, npy, image_folder",
    "model": "a network of the model zoo: " + ", ".join(ZOO),
    "num_classes": "number of classes (1 for regression)",
    "model_args": "extra arguments of the model builder, e.g. `{ hidden = [128, 128] }` for mlp",
    "likelihood": "categorical (classification) or normal (regression, your own files only)",
    "data": "how to read your files (path, target, ...; see the how-to on your own data); empty for built-in data",
    "ensemble_size": "K, the mixture components / ensemble members",
    "prior": "prior of the factors r, s: family gaussian or cauchy, loc, scale (a number or a table: hierarchical)",
    "guide": "mixture (the paper's), delta (BatchEnsemble), cauchy, autonormal, autolowrank",
    "init_sign_prob": "P(+1) of the random-sign init of the factors' posterior means (omit for all +1)",
    "init_scale": "initial posterior stddev of the factors",
    "objective": "averaged (mean of the members' ELBOs) or mixture (log of the mixture likelihood)",
    "kl_weight": "multiplies the KL term (1 = the ELBO)",
    "estimator": "member (one factor draw per member and step), example (one per example) or split (averaged objective only: each member its own batch / K examples)",
    "precision": "fp32, or bf16 autocast of the forward pass",
    "batchnorm": "shared, or per_member BatchNorm statistics",
    "epochs": "passes over the training data",
    "per_core_batch_size": "tiled rows per device per step: per_core_batch_size / K new examples",
    "num_cores": "devices the reference used: batch = per_core_batch_size / K × num_cores",
    "base_learning_rate": "learning rate = base_learning_rate × batch / lr_reference_batch",
    "lr_reference_batch": "the batch size at which the learning rate is base_learning_rate",
    "factor_lr": "the factors' variational parameters train with learning rate × factor_lr",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum (SGD)",
    "warmup_epochs": "linear learning-rate warm-up, in epochs",
    "decay_epochs": "epochs at which the learning rate is multiplied by decay_rate",
    "decay_rate": "the step-decay factor",
    "kl_annealing_epochs": "the KL weight grows linearly from 0 to 1 over these epochs",
    "l2": "L2 penalty l2 · Σ w² on W, biases and BatchNorm (weight decay 2 · l2), never on the factors",
    "optimizer": "sgd (Nesterov momentum, warm-up, step decay) or adam",
    "seed": "seeds the weights, the data order, the factor draws and the test evaluation",
}


def _toml(value) -> str:
    """A default as it would be written in a TOML file."""
    if value is dataclasses.MISSING:
        return "*required*"
    if value is None:
        return "*omitted*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, dict):
        if not value:
            return "`{}`"
        return "`{ " + ", ".join(f"{k} = {_toml(v).strip('`')}" for k, v in value.items()) + " }`"
    return f"`{value!r}`"


def defaults_table() -> str:
    """The Markdown table of every :class:`RunConfig` key, its default and its meaning (the docs'
    copy, in docs/howto/declarative.md, is checked against it by the tests)."""
    defaults = RunConfig.defaults()
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | {_toml(v)} | {CONFIG_HELP[k]} |" for k, v in defaults.items()]
    return "\n".join(lines) + "\n"


def _shipped() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


#: names of the shipped configurations
CONFIGS = _shipped()


@dataclass(frozen=True)
class RunConfig:
    """One experiment, declaratively (see the module docstring for the fields' meaning)."""

    name: str
    dataset: str
    model: str
    num_classes: int
    model_args: dict = field(default_factory=dict)
    likelihood: str = "categorical"
    data: dict = field(default_factory=dict)
    ensemble_size: int = 4
    prior: dict = field(default_factory=lambda: {"family": "gaussian", "loc": 1.0, "scale": 0.1})
    guide: str = "mixture"
    init_sign_prob: float | None = 0.5
    init_scale: float = 0.0316
    objective: str = "averaged"
    kl_weight: float = 1.0
    estimator: str = "member"
    precision: str = "fp32"
    batchnorm: str = "shared"
    epochs: int = 250
    per_core_batch_size: int = 64
    num_cores: int = 8
    base_learning_rate: float = 0.1
    lr_reference_batch: int = 128
    factor_lr: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: float = 1.0
    decay_epochs: tuple = (100, 200, 225)
    decay_rate: float = 0.1
    kl_annealing_epochs: float = 200.0
    l2: float = 1e-4
    optimizer: str = "sgd"
    seed: int = 0

    # -- construction and validation --------------------------------------------------------
    @classmethod
    def defaults(cls) -> dict:
        """Every key's default (``dataclasses.MISSING`` for the required keys)."""
        return {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
        }

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """A config from plain values; unknown keys raise :class:`ValueError` listing the valid ones."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a table of keys, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {cls.keys()}")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ValueError(f"missing config key(s) {missing}; valid keys: {cls.keys()}")
        values = dict(values)
        if "decay_epochs" in values and isinstance(values["decay_epochs"], list):
            values["decay_epochs"] = tuple(values["decay_epochs"])
        return cls(**values)

    def replace(self, **changes) -> RunConfig:
        """A copy with some fields changed (validated like :meth:`from_dict`)."""
        return type(self).from_dict({**dataclasses.asdict(self), **changes})

    def __post_init__(self):
        def choice(name, options):
            one_of(name, getattr(self, name), sorted(options))

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        one_of("dataset", self.dataset, sorted(DATASETS) + list(FILE_DATASETS))
        choice("likelihood", LIKELIHOODS)
        choice("model", ZOO)
        choice("guide", GUIDES)
        choice("objective", OBJECTIVES)
        choice("estimator", ESTIMATORS)
        if self.estimator == "split" and self.objective != "averaged":
            raise ValueError(
                f"estimator 'split' gives each member different examples; objective {self.objective!r} needs every "
                "member on every example: use objective = 'averaged' with it, or another estimator"
            )
        choice("precision", PRECISIONS)
        choice("batchnorm", convert.BATCHNORM_MODES)
        choice("optimizer", ("sgd", "adam"))
        number("seed", self.seed, integer=True)
        for name in (
            "num_classes",
            "ensemble_size",
            "epochs",
            "per_core_batch_size",
            "num_cores",
            "lr_reference_batch",
        ):
            positive_int(name, getattr(self, name))
        for name in ("init_scale", "base_learning_rate", "decay_rate", "factor_lr"):
            number(name, getattr(self, name), strict=True)
        for name in ("momentum", "warmup_epochs", "kl_annealing_epochs", "l2", "kl_weight"):
            number(name, getattr(self, name))
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")
        if self.init_sign_prob is not None and not (
            isinstance(self.init_sign_prob, (int, float)) and 0 <= self.init_sign_prob <= 1
        ):
            raise ValueError(f"init_sign_prob must be in [0, 1] or absent, got {self.init_sign_prob!r}")
        if self.per_core_batch_size < self.ensemble_size:
            raise ValueError(
                f"per_core_batch_size ({self.per_core_batch_size}) counts tiled rows and must be >= "
                f"ensemble_size ({self.ensemble_size})"
            )
        from .files import check_data_table

        check_data_table(self.dataset, self.data)
        if self.likelihood == "normal":
            if self.dataset not in FILE_DATASETS or self.dataset == "image_folder":
                raise ValueError(
                    f"likelihood 'normal' (regression) needs a table or arrays of your own "
                    f"(dataset one of {list(FILE_DATASETS[:4])}); {self.dataset!r} is classification"
                )
            if self.num_classes != 1:
                raise ValueError(
                    f"likelihood 'normal' (regression) has one output: num_classes must be 1, got {self.num_classes}"
                )
        elif (
            self.dataset in DATASETS and self.dataset != "imagenet" and self.num_classes != DATASETS[self.dataset]
        ):  # ImageNet folders may be subsets
            raise ValueError(f"num_classes={self.num_classes} but {self.dataset} has {DATASETS[self.dataset]} classes")
        epochs = list(self.decay_epochs) if isinstance(self.decay_epochs, (tuple, list)) else None
        if (
            epochs is None
            or any(isinstance(e, bool) or not isinstance(e, (int, float)) or e < 0 for e in epochs)
            or epochs != sorted(epochs)
        ):
            raise ValueError(f"decay_epochs must be an increasing list of epochs, got {self.decay_epochs!r}")
        if not isinstance(self.model_args, dict):
            raise ValueError(f"model_args must be a table, got {self.model_args!r}")
        if not isinstance(self.prior, dict) or set(self.prior) - set(_PRIOR_KEYS):
            raise ValueError(f"prior must be a table with keys among {list(_PRIOR_KEYS)}, got {self.prior!r}")
        self.prior_spec()  # validates family and scale

    # -- derived values ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """New examples per step: ``per_core_batch_size // ensemble_size × num_cores``."""
        return self.per_core_batch_size // self.ensemble_size * self.num_cores

    @property
    def learning_rate(self) -> float:
        """``base_learning_rate × batch_size / lr_reference_batch``."""
        return self.base_learning_rate * self.batch_size / self.lr_reference_batch

    def prior_spec(self) -> FactorPrior:
        """The factor prior (:func:`~rank1_pyro.priors.make_prior` of the ``prior`` table)."""
        return make_prior(**self.prior)

    # -- building ---------------------------------------------------------------------------
    def build_model(self, num_data: int | None = None, input_shape: tuple[int, ...] | None = None) -> Rank1Model:
        """The rank-1 network of this config (``model_args`` passed to the zoo builder).

        ``input_shape`` (one example's shape) is needed by models sized by their data (``mlp``,
        ``lenet5``'s input channels).
        """
        model = rank1_network(
            self.model,
            self.num_classes,
            self.ensemble_size,
            self.prior_spec(),
            input_shape=input_shape,
            batchnorm=self.batchnorm,
            num_data=num_data,
            **self.model_args,
        )
        if self.likelihood != model.likelihood:  # regression: the same network, a Gaussian observation (noise learned)
            model = Rank1Model(
                model.net,
                model.ensemble_size,
                likelihood=self.likelihood,
                num_data=num_data,
                flat_batch=model.flat_batch,
            )
        return model

    def build_guide(self, model: Rank1Model, input_shape: tuple[int, ...] | None = None):
        """The guide (``MixtureGuide`` etc.) at the reference initialisation.

        Pyro autoguides (``"autonormal"``, ``"autolowrank"``) start at the prior medians
        (``init_loc_fn=init_to_median``: r = s = 1, not Pyro's default 0, where the network outputs
        only its biases) with stddev ``init_scale``; ``init_sign_prob`` does not apply to them. They
        create their parameters on a first call: with ``input_shape`` it is made here (on a dummy
        batch, without touching the random state), so a checkpoint's guide state can be loaded.
        """
        if self.guide in AUTOGUIDES:
            import pyro.poutine as poutine
            import torch
            from pyro.infer.autoguide import init_to_median

            guide = AUTOGUIDES[self.guide](model, init_loc_fn=init_to_median, init_scale=self.init_scale)
            if input_shape is not None:
                with torch.random.fork_rng(), poutine.block():
                    guide(torch.zeros(1, *input_shape), torch.zeros(1, dtype=torch.long))
            return guide
        if self.guide == "delta":
            return DeltaGuide(model, init_sign_prob=self.init_sign_prob)
        return GUIDES[self.guide](model, init_sign_prob=self.init_sign_prob, init_scale=self.init_scale)

    def build(self, num_data: int | None = None, input_shape: tuple[int, ...] | None = None, seed: int | None = None):
        """``(model, guide)``; with ``seed``, the random state (torch, python, numpy) is seeded first,
        so the initial weights and factor signs are a function of the seed (``seed=cfg.seed`` makes
        a run reproducible from its very first draw)."""
        if seed is not None:
            import pyro

            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
            pyro.set_rng_seed(seed)
        model = self.build_model(num_data, input_shape)
        return model, self.build_guide(model, input_shape)

    def build_objective(self, **kwargs):
        """A fresh objective (``AveragedELBO`` / ``MixtureELBO``) with this config's ``kl_weight`` and
        ``estimator``; ``kwargs`` go to its constructor and take precedence."""
        return OBJECTIVES[self.objective](**{"kl_weight": self.kl_weight, "estimator": self.estimator, **kwargs})

    def train_config(self, **changes) -> TrainConfig:
        """How :func:`~rank1_pyro.inference.train.train` trains this config: the optimiser and
        schedule as a :class:`~rank1_pyro.inference.train_config.TrainConfig` (the seed included),
        with ``changes`` (other :class:`TrainConfig` fields: device, checkpoints, progress, ...)."""
        settings = dict(
            objective=self.build_objective(),
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.learning_rate,
            factor_lr=self.factor_lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=2.0 * self.l2,
            warmup_epochs=self.warmup_epochs,
            decay_epochs=tuple(self.decay_epochs),
            decay_rate=self.decay_rate,
            kl_annealing_epochs=self.kl_annealing_epochs,
            precision=self.precision,
            seed=self.seed,
        )
        return TrainConfig(**{**settings, **changes})

    # -- data -------------------------------------------------------------------------------
    def load_data(self, root=None):
        """``(train, test, preprocessing)``: :meth:`datasets` and, for the user's files
        (:data:`FILE_DATASETS`), their :class:`~rank1_pyro.files.Preprocessing` (training-split
        statistics, class names; ``None`` for the built-in data sets)."""
        if self.dataset in FILE_DATASETS:
            from .files import load_file_data

            return load_file_data(self, root)
        return (*self.datasets(root), None)

    def datasets(self, root):
        """``(train, test)`` data sets of this config from ``root`` (never downloaded).

        The offline data sets (:data:`OFFLINE_DATASETS`) come from :mod:`rank1_pyro.data` as
        :class:`~torch.utils.data.TensorDataset` s (``root`` is used by Fashion-MNIST only);
        CIFAR and ImageNet are torchvision data sets; the user's files (:data:`FILE_DATASETS`)
        are read by :mod:`rank1_pyro.files` (relative paths from ``root``). Raises
        :class:`FileNotFoundError` naming every path checked when the data is not there.
        """
        if self.dataset in FILE_DATASETS:
            return self.load_data(root)[:2]
        if self.dataset in OFFLINE_DATASETS:
            from torch.utils.data import TensorDataset

            from .data import load_dataset

            kwargs = {"root": root} if self.dataset == "fashion_mnist" else {}
            split = load_dataset(self.dataset, **kwargs)
            return TensorDataset(split.x_train, split.y_train), TensorDataset(split.x_test, split.y_test)
        from .data import cifar_datasets, imagenet_datasets

        if self.dataset == "imagenet":
            return imagenet_datasets(root)
        return cifar_datasets(self.dataset, root)

    def data_loaders(self, root, batch_size: int | None = None, num_workers: int = 0):
        """``(train, test)`` DataLoaders over :meth:`datasets` (train shuffled, batch :attr:`batch_size`)."""
        from torch.utils.data import DataLoader

        batch_size = self.batch_size if batch_size is None else batch_size
        train, test = self.datasets(root)
        return (
            DataLoader(train, batch_size, shuffle=True, num_workers=num_workers, drop_last=True),
            DataLoader(test, batch_size, shuffle=False, num_workers=num_workers),
        )


def load_config(name_or_path) -> RunConfig:
    """A shipped config by name (see :data:`CONFIGS`) or a TOML file by path."""
    path = Path(name_or_path).expanduser()
    if not path.suffix and str(name_or_path) in CONFIGS:
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no config {str(name_or_path)!r}: not a file, and the shipped configs are {CONFIGS}")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config {path}: invalid TOML: {e}") from None
    try:
        return RunConfig.from_dict(values)
    except ValueError as e:
        raise ValueError(f"config {path}: {e}") from None
