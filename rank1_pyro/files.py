r"""Your own data: tables (CSV, Parquet), arrays (``.npz``, ``.npy``) and folders of images.

A config names one of :data:`FILE_DATASETS` as its ``dataset`` and describes the files in its
``data`` table (every key is listed in :data:`DATA_KEYS`)::

    dataset = "csv"                      # or "parquet", "npz", "npy", "image_folder"
    likelihood = "normal"                # regression; "categorical" (the default) classifies
    num_classes = 1                      # one output for regression, the number of classes otherwise
    data = { path = "houses.csv", target = "price", features = ["area", "rooms"], test_fraction = 0.2 }

* ``csv`` / ``parquet``: one row per example; ``target`` names the target column (default: the
  last one), ``features`` the input columns (default: all the others; they must be numeric).
* ``npz``: arrays ``x`` and ``y`` (other names with ``x_key`` / ``y_key``); ``npy``: ``path`` holds
  the inputs and ``y_path`` the targets.
* ``image_folder``: torchvision's ``ImageFolder`` layout, ``path/<class>/<image>``, or
  ``path/train/<class>/...`` with ``path/test/<class>/...`` (or ``val``); images are resized to
  ``image_size`` (default ``[32, 32]``), in colour unless ``grayscale = true``.

A test split comes from ``test_path`` when given, otherwise ``test_fraction`` (default 0.2) of
the examples are held out at random (seeded by the config's ``seed``, stratified by class for
classification). Relative paths are taken from ``--data-root`` (``root``) when it is given, else
from the current directory.

Inputs are standardised with the mean and standard deviation of the *training* split (per
feature, per channel for images), and regression targets likewise; class labels are mapped to
``0 .. C-1`` in sorted order. These statistics are a :class:`Preprocessing`, saved as
``data.json`` in the run directory, so :meth:`Preprocessing.inputs` turns new raw inputs into
what the network saw, and predictions are mapped back to the target's units.

One concept, one module (hence over 400 lines): the user's own data files: reading tables, arrays and image folders, and the preprocessing stored with a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write  # noqa: F401 - re-exported: the user-data files are written with it

__all__ = [
    "FILE_DATASETS",
    "DATA_KEYS",
    "Preprocessing",
    "load_file_data",
    "read_inputs",
    "PREPROCESSING_FILE",
    "atomic_write",
]

#: the ``dataset`` names that read the user's files (described by the config's ``data`` table)
FILE_DATASETS = ("csv", "parquet", "npz", "npy", "image_folder")
#: the keys of the config's ``data`` table, with their defaults (``None``: absent unless given)
DATA_KEYS = {
    "path": None,
    "test_path": None,
    "test_fraction": 0.2,
    "target": None,
    "features": None,
    "x_key": "x",
    "y_key": "y",
    "y_path": None,
    "test_y_path": None,
    "image_size": [32, 32],
    "grayscale": False,
    "standardize": True,
}
#: the run-directory file holding the :class:`Preprocessing` of a run trained on files
PREPROCESSING_FILE = "data.json"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_data_table(dataset: str, data) -> dict:
    """The ``data`` table with its defaults filled in; raises :class:`ValueError` on unknown keys
    or missing required ones."""
    if not isinstance(data, dict):
        raise ValueError(f"data must be a table, got {data!r}")
    if dataset not in FILE_DATASETS:
        if data:
            raise ValueError(f"the data table describes files; dataset {dataset!r} is built in and takes none")
        return {}
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"unknown data key(s) {unknown}; valid keys: {list(DATA_KEYS)}")
    values = {**DATA_KEYS, **data}
    if not isinstance(values["path"], str) or not values["path"]:
        raise ValueError(f"dataset {dataset!r} needs data.path (the file or folder of the training data)")
    if dataset == "npy" and not values["y_path"]:
        raise ValueError("dataset 'npy' needs data.y_path (the .npy file of the targets) next to data.path")
    fraction = values["test_fraction"]
    if values["test_path"] is None and not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"data.test_fraction must be in (0, 1), got {fraction!r}")
    size = values["image_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"data.image_size must be [height, width], got {size!r}")
    if values["features"] is not None and not (
        isinstance(values["features"], list)
        and values["features"]
        and all(isinstance(c, str) for c in values["features"])
    ):
        raise ValueError(f"data.features must be a list of column names, got {values['features']!r}")
    return values


@dataclass
class Preprocessing:
    """How a run's inputs and targets were prepared (saved as ``data.json`` in the run).

    ``x_mean``/``x_std``: per-feature (tables, arrays) or per-channel (images) statistics of the
    training inputs; ``y_mean``/``y_std``: of the regression targets (0 and 1 when not
    standardised); ``classes``: the class names, index = label.
    """

    dataset: str
    likelihood: str
    input_shape: list
    num_train: int
    features: list | None = None
    target: str | None = None
    classes: list | None = None
    x_mean: list | None = None
    x_std: list | None = None
    y_mean: float = 0.0
    y_std: float = 1.0
    image_size: list | None = None
    grayscale: bool = False

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def save(self, run_dir) -> Path:
        from .runs import write_json

        path = Path(run_dir) / PREPROCESSING_FILE
        write_json(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, run_dir) -> Preprocessing | None:
        path = Path(run_dir) / PREPROCESSING_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None

    # -- transforms ---------------------------------------------------------------------------
    def _stats(self):
        import torch

        if self.x_mean is None:
            return None, None
        mean = torch.tensor(self.x_mean, dtype=torch.float32)
        std = torch.tensor(self.x_std, dtype=torch.float32)
        if len(self.input_shape) == 3:  # images: per channel
            return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        return mean.view(1, *self.input_shape), std.view(1, *self.input_shape)

    def inputs(self, x):
        """Raw inputs (N, *input_shape) -> what the network saw in training (standardised float32)."""
        import torch

        if not torch.is_tensor(x):
            x = np.asarray(x, dtype=np.float32)
            x = torch.as_tensor(x if x.flags.writeable else x.copy())
        else:
            x = x.float()
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            if x.dim() >= 2 and math.prod(x.shape[1:]) == math.prod(self.input_shape):
                x = x.reshape(x.shape[0], *self.input_shape)
            else:
                raise ValueError(
                    f"inputs of shape {tuple(x.shape[1:])} per example; the run was trained on "
                    f"{tuple(self.input_shape)}"
                )
        mean, std = self._stats()
        return x if mean is None else (x - mean) / std

    def targets(self, y):
        """Raw targets -> training targets: class indices, or standardised regression values."""
        import torch

        if self.likelihood == "categorical":
            index = {c: i for i, c in enumerate(self.classes)}
            try:
                return torch.tensor([index[_label(v)] for v in np.asarray(y).tolist()], dtype=torch.int64)
            except KeyError as e:
                raise ValueError(f"label {e.args[0]!r} is not among the training classes {self.classes}") from None
        return (torch.as_tensor(np.asarray(y, dtype=np.float32)) - self.y_mean) / self.y_std

    def original_units(self, test: dict) -> dict:
        """Regression metrics of standardised targets in the target's own units (RMSE × σ_y,
        Gaussian NLL + log σ_y: exact, the map is affine)."""
        if self.likelihood != "normal" or self.y_std == 1.0:
            return dict(test)
        out = dict(test)
        if "rmse" in out:
            out["rmse"] = out["rmse"] * self.y_std
        if "nll" in out:
            out["nll"] = out["nll"] + math.log(self.y_std)
        return out


def _label(value) -> str:
    """Class labels as strings (``3`` and ``3.0`` from a float column are both ``"3"``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _resolve(path, root) -> Path:
    path = Path(path).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root).expanduser() / path
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found"
            + ("" if root is not None else " (relative paths are taken from --data-root, or the current directory)")
        )
    return path


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
def _read_table(path: Path):
    import pandas as pd

    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except ImportError as e:
            raise ImportError(f"reading {path} needs a Parquet engine: pip install pyarrow ({e})") from None
    return pd.read_csv(path)


def _table_arrays(frame, features, target, path) -> tuple[np.ndarray, np.ndarray | None]:
    missing = [c for c in [*(features or []), *([target] if target else [])] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the columns are {list(frame.columns)}")
    x = frame[features]
    bad = [c for c in features if not np.issubdtype(x[c].dtype, np.number) and x[c].dtype != bool]
    if bad:
        raise ValueError(
            f"{path}: feature column(s) {bad} are not numeric; encode them or leave them out of data.features"
        )
    x = x.to_numpy(dtype=np.float32, copy=True)  # writable (pandas may hand out read-only views)
    if not np.isfinite(x).all():
        rows = np.where(~np.isfinite(x).all(axis=1))[0][:5].tolist()
        raise ValueError(f"{path}: missing or infinite feature values (rows {rows}, counting from 0)")
    return x, (frame[target].to_numpy() if target else None)


def _read_arrays(dataset: str, path: Path, y_path, values, root) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "npz":
        with np.load(path, allow_pickle=False) as arrays:
            for key in (values["x_key"], values["y_key"]):
                if key not in arrays:
                    raise ValueError(
                        f"{path}: no array {key!r}; it holds {sorted(arrays)} (set data.x_key / data.y_key)"
                    )
            return arrays[values["x_key"]], arrays[values["y_key"]]
    return np.load(path, allow_pickle=False), np.load(_resolve(y_path, root), allow_pickle=False)


def _split_indices(n: int, fraction: float, seed: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices; stratified by ``labels`` when given (every class keeps a training example)."""
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n)
        n_test = min(max(1, round(fraction * n)), n - 1)
        return np.sort(order[n_test:]), np.sort(order[:n_test])
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.where(labels == c)[0])
        n_test = min(round(fraction * len(members)), len(members) - 1)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    if not test:
        raise ValueError("the test split is empty: give more examples, a larger test_fraction or a test_path")
    return np.sort(np.array(train)), np.sort(np.array(test))


def _labels_and_classes(y_train, y_test, likelihood: str, num_classes: int, where):
    if likelihood == "normal":
        y_train = np.asarray(y_train, dtype=np.float64)
        if y_train.ndim != 1:
            raise ValueError(f"{where}: regression needs one target per example, got target shape {y_train.shape}")
        return None
    classes = sorted({_label(v) for v in np.asarray(y_train).tolist()}, key=_sort_key)
    if len(classes) != num_classes:
        raise ValueError(
            f"{where}: the training targets hold {len(classes)} classes {classes[:12]}, but num_classes = {num_classes}"
        )
    return classes


def _sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def load_file_data(cfg, root=None):
    """``(train_set, test_set, preprocessing)`` of a config whose ``dataset`` is one of :data:`FILE_DATASETS`."""
    import torch
    from torch.utils.data import TensorDataset

    values = check_data_table(cfg.dataset, cfg.data)
    if cfg.dataset == "image_folder":
        return _image_folder(cfg, values, root)
    path = _resolve(values["path"], root)
    test_path = _resolve(values["test_path"], root) if values["test_path"] else None
    features, target = values["features"], values["target"]
    if cfg.dataset in ("csv", "parquet"):
        frame = _read_table(path)
        if frame.shape[1] < 2 and features is None:
            raise ValueError(f"{path}: a table needs at least a feature column and a target column")
        target = target or str(frame.columns[-1])
        features = features or [str(c) for c in frame.columns if c != target]
        x, y = _table_arrays(frame, features, target, path)
        if test_path is not None:
            x_test, y_test = _table_arrays(_read_table(test_path), features, target, test_path)
    else:
        x, y = _read_arrays(cfg.dataset, path, values["y_path"], values, root)
        if test_path is not None:
            x_test, y_test = _read_arrays(cfg.dataset, test_path, values["test_y_path"], values, root)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} inputs but {len(y)} targets")
    if test_path is None:
        idx_train, idx_test = _split_indices(
            len(x),
            values["test_fraction"],
            cfg.seed,
            labels=np.array([_label(v) for v in np.asarray(y).tolist()]) if cfg.likelihood == "categorical" else None,
        )
        x, y, x_test, y_test = x[idx_train], y[idx_train], x[idx_test], y[idx_test]
    x = np.asarray(x, dtype=np.float32)
    x_test = np.asarray(x_test, dtype=np.float32)
    if x.ndim == 1:
        x, x_test = x[:, None], x_test[:, None]
    classes = _labels_and_classes(y, y_test, cfg.likelihood, cfg.num_classes, path)
    prep = Preprocessing(
        dataset=cfg.dataset,
        likelihood=cfg.likelihood,
        input_shape=list(x.shape[1:]),
        num_train=len(x),
        features=features,
        target=target,
        classes=classes,
    )
    if values["standardize"]:
        std = x.std(axis=0)
        prep.x_mean = x.mean(axis=0).tolist()
        prep.x_std = np.where(std < 1e-8, 1.0, std).tolist()  # a constant input is only centred
        if cfg.likelihood == "normal":
            y64 = np.asarray(y, dtype=np.float64)
            prep.y_mean, prep.y_std = float(y64.mean()), float(y64.std()) if y64.std() > 1e-12 else 1.0
    train_set = TensorDataset(prep.inputs(torch.from_numpy(x)), prep.targets(y))
    test_set = TensorDataset(prep.inputs(torch.from_numpy(x_test)), prep.targets(y_test))
    return train_set, test_set, prep


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------
def _image_transform(size, grayscale: bool, mean=None, std=None):
    from torchvision import transforms as T

    steps = [T.Grayscale(1)] if grayscale else [T.Lambda(lambda im: im.convert("RGB"))]
    steps += [T.Resize(tuple(size)), T.ToTensor()]
    if mean is not None:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def _class_folder(path: Path):
    import torchvision

    if not path.is_dir() or not any(p.is_dir() for p in path.iterdir()):
        raise FileNotFoundError(
            f"{path}: expected one sub-folder of images per class (torchvision's ImageFolder layout)"
        )
    return torchvision.datasets.ImageFolder(str(path))


def _image_folder(cfg, values, root):
    import torch
    from torch.utils.data import DataLoader, Subset

    if cfg.likelihood != "categorical":
        raise ValueError(
            "dataset 'image_folder' classifies (the class is the sub-folder): likelihood must be 'categorical'"
        )
    path = _resolve(values["path"], root)
    test_dir = (
        _resolve(values["test_path"], root)
        if values["test_path"]
        else next(
            (path / name for name in ("test", "val") if (path / "train").is_dir() and (path / name).is_dir()), None
        )
    )
    train_dir = path / "train" if test_dir is not None and (path / "train").is_dir() else path
    folder = _class_folder(train_dir)
    classes = list(folder.classes)
    if len(classes) != cfg.num_classes:
        raise ValueError(
            f"{train_dir}: {len(classes)} class folders {classes[:12]}, but num_classes = {cfg.num_classes}"
        )
    size, gray = values["image_size"], bool(values["grayscale"])
    if test_dir is not None:
        test_folder = _class_folder(test_dir)
        if test_folder.classes != classes:
            raise ValueError(f"{test_dir}: class folders {test_folder.classes} differ from the training ones {classes}")
        idx_train, idx_test = np.arange(len(folder)), None
    else:
        test_folder = folder
        idx_train, idx_test = _split_indices(
            len(folder), values["test_fraction"], cfg.seed, labels=np.array(folder.targets)
        )
    # statistics of the training images, per channel, at the training size
    folder.transform = _image_transform(size, gray)
    plain = Subset(folder, idx_train.tolist())
    total, total_sq, count = 0.0, 0.0, 0
    for xb, _ in DataLoader(plain, batch_size=256):
        total = total + xb.double().sum(dim=(0, 2, 3))
        total_sq = total_sq + (xb.double() ** 2).sum(dim=(0, 2, 3))
        count += xb.shape[0] * xb.shape[2] * xb.shape[3]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    std = torch.where(std < 1e-8, torch.ones_like(std), std)
    prep = Preprocessing(
        dataset="image_folder",
        likelihood="categorical",
        input_shape=[1 if gray else 3, size[0], size[1]],
        num_train=len(idx_train),
        classes=classes,
        x_mean=mean.tolist(),
        x_std=std.tolist(),
        image_size=list(size),
        grayscale=gray,
    )
    if not values["standardize"]:
        prep.x_mean = prep.x_std = None
    transform = _image_transform(size, gray, prep.x_mean, prep.x_std)
    folder.transform = transform
    train_set = Subset(folder, idx_train.tolist())
    if test_dir is not None:
        test_folder.transform = transform
        test_set = Subset(test_folder, list(range(len(test_folder))))
    else:
        test_set = Subset(folder, idx_test.tolist())
    return train_set, test_set, prep


# ------------------------------------------------------------------------------------------
# New inputs, for prediction
# ------------------------------------------------------------------------------------------
def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no image files ({', '.join(_IMAGE_SUFFIXES)})")
    return files


def read_inputs(path, prep: Preprocessing | None, input_shape):
    """New raw inputs from a file or folder, prepared as in training.

    Returns ``(x, ids)``: the network's inputs ``(N, *input_shape)`` and one identifier per
    example (the row number of a table or array, the file path of an image).

    * ``.csv`` / ``.parquet``: the run's feature columns by name (other columns, e.g. the
      target, are ignored); a run on built-in data takes every column, in order.
    * ``.npy`` / ``.npz`` (array ``x``, or the only array): ``(N, *input_shape)`` or flattened.
    * an image file, or a folder of images (searched recursively), for image runs.
    """
    import torch
    from PIL import Image

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"INPUT {path} not found")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in _IMAGE_SUFFIXES:
        if prep is None or prep.image_size is None:
            raise ValueError(
                f"{path}: images are inputs of runs trained on an image folder; this run takes "
                f"arrays of shape {tuple(input_shape)} (a .npy, .npz or .csv file)"
            )
        files = _image_files(path)
        transform = _image_transform(prep.image_size, prep.grayscale)
        with torch.no_grad():
            x = torch.stack([transform(Image.open(f)) for f in files])
        return prep.inputs(x), [str(f) for f in files]
    if suffix in (".csv", ".parquet", ".pq"):
        frame = _read_table(path)
        features = prep.features if prep is not None and prep.features else [str(c) for c in frame.columns]
        x, _ = _table_arrays(frame, features, None, path)
    elif suffix in (".npy", ".npz"):
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as arrays:
                key = "x" if "x" in arrays else (list(arrays)[0] if len(arrays) == 1 else None)
                if key is None:
                    raise ValueError(f"{path}: holds {sorted(arrays)}; name the inputs 'x'")
                x = arrays[key]
    else:
        raise ValueError(
            f"INPUT {path}: unknown kind; give a .csv, .parquet, .npy, .npz file, an image or a folder of images"
        )
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None] if len(input_shape) == 1 and input_shape[0] == 1 else x[None]
    ids = list(range(len(x)))
    if prep is not None:
        return prep.inputs(x), ids
    x = torch.from_numpy(x)
    if tuple(x.shape[1:]) != tuple(input_shape):
        if math.prod(x.shape[1:]) != math.prod(input_shape):
            raise ValueError(
                f"{path}: inputs of shape {tuple(x.shape[1:])} per example; the run takes {tuple(input_shape)}"
            )
        x = x.reshape(len(x), *input_shape)
    return x, ids
