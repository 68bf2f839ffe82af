"""Model zoo, parameter arithmetic, the ``params`` command, ready configurations and their data."""

import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from rank1_pyro import cli
from rank1_pyro.config import CONFIGS, RunConfig, load_config
from rank1_pyro.inference import AveragedELBO, MixtureELBO, MixtureGuide
from rank1_pyro.layers import factor_sites, rank1_layers
from rank1_pyro.models import (
    Rank1Model,
    lenet5_net,
    lstm_net,
    network,
    parameter_counts,
    rank1_network,
    resnet18_cifar_net,
    resnet20_cifar_net,
    resnet50_net,
    wide_resnet_net,
    zoo,
)

K = 2
ZOO = {
    # name: (rank-1 builder, deterministic builder, input shape of a batch of 2)
    "lenet5": (lambda: rank1_network("lenet5", 10, K), lambda: lenet5_net(10, 1), (2, 1, 16, 16)),
    "resnet18_cifar": (lambda: rank1_network("resnet18_cifar", 10, K), lambda: resnet18_cifar_net(10), (2, 3, 8, 8)),
    "resnet20_cifar": (lambda: rank1_network("resnet20_cifar", 10, K), lambda: resnet20_cifar_net(10), (2, 3, 8, 8)),
    "wrn10_1": (
        lambda: rank1_network("wrn28_10", 10, K, depth=10, width=1),
        lambda: wide_resnet_net(10, 1, 10),
        (2, 3, 8, 8),
    ),
    "resnet50": (lambda: rank1_network("resnet50", 10, K), lambda: resnet50_net(10), (2, 3, 16, 16)),
    "lstm": (
        lambda: rank1_network("lstm", 10, K, input_shape=(5, 3), hidden_size=8, dense_hidden=[6]),
        lambda: lstm_net(3, 8, 10, dense_hidden=[6]),
        (2, 5, 3),
    ),
}


def one_step(model, guide, x, y, lr=0.01, momentum=0.0, nesterov=False):
    """One MixtureELBO step with a torch optimizer; returns the loss and the parameters before it."""
    params = [p for p in list(model.parameters()) + list(guide.parameters()) if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)
    opt.zero_grad()
    loss = MixtureELBO().differentiable_loss(model, guide, x, y) / x.shape[0]
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, params))
    return loss, changed, len(params)


def weight_layer_count(net):
    return sum(isinstance(m, (nn.Linear, nn.Conv2d, nn.LSTM)) for m in net.modules())


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_forward_and_one_training_step(name):
    build, build_net, shape = ZOO[name]
    model = build()
    assert isinstance(model, Rank1Model) and model.ensemble_size == K and model.flat_batch
    net = build_net()
    # every convolution (stem and 1x1 shortcuts included), dense layer and LSTM is rank-1
    assert len(list(rank1_layers(model))) == weight_layer_count(net)
    assert not any(type(m) in (nn.Linear, nn.Conv2d, nn.LSTM) for m in model.net.modules())
    x, y = torch.randn(shape), torch.tensor([1, 7])
    assert net(x).shape == (2, 10)
    model.num_data = 2
    guide = MixtureGuide(model)
    out = model(x, y)
    assert out.shape == (K, 2, 10) and torch.isfinite(out).all()
    loss, changed, total = one_step(model, guide, x, y)
    assert torch.isfinite(loss)
    assert changed >= total - 2, f"only {changed} of {total} parameters moved"  # (a few may get zero gradient)


def test_wrn28_10_and_resnet50_parameter_counts():
    """The real networks, built but not run; counts checked against the architecture arithmetic."""
    wrn = wide_resnet_net(28, 10, 10)
    count = 3 * 16 * 9  # stem
    c_in = 16
    for width in (160, 320, 640):
        for _ in range(4):  # (28 - 4) / 6 blocks per group
            count += (
                2 * c_in + c_in * width * 9 + 2 * width + width * width * 9 + (c_in * width if c_in != width else 0)
            )
            c_in = width
    count += 2 * 640 + 640 * 10 + 10  # final BatchNorm, dense layer
    assert sum(p.numel() for p in wrn.parameters()) == count == 36_479_194
    assert sum(p.numel() for p in resnet50_net().parameters()) == 25_557_032


@pytest.fixture(scope="module")
def resnet50_counts():
    net = resnet50_net()
    return net, parameter_counts(net, ensemble_size=4)


def test_resnet50_parameter_arithmetic(resnet50_counts):
    net, counts = resnet50_counts
    assert counts.deterministic == 25_557_032
    # rank-1 factor sizes: in + out channels of every convolution, in + out features of fc
    sizes = sum(m.in_channels + m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))
    sizes += net.fc.in_features + net.fc.out_features
    assert counts.factor_size == sizes == 52_139
    assert counts.component == 104_278 and round(counts.percent(counts.component), 2) == 0.41
    assert counts.member_extras == 3 * 1000  # K - 1 more copies of the dense layer's bias
    assert counts.rank1 == 25_557_032 + 3_000 + 4 * 104_278 == 25_977_144
    assert round(counts.rank1 / 1e6, 2) == 25.98
    assert counts.deep_ensemble == 102_228_128 and round(counts.deep_ensemble / 1e6, 1) == 102.2
    assert counts.overhead == counts.rank1 - counts.deterministic


def test_parameter_counts_match_the_built_model_and_guide():
    """The arithmetic equals what a rank-1 model and its mixture guide really hold."""
    net = resnet20_cifar_net(10)
    for batchnorm in ("shared", "per_member"):
        counts = parameter_counts(net, ensemble_size=3, batchnorm=batchnorm)
        model = rank1_network("resnet20_cifar", 10, 3, batchnorm=batchnorm)
        guide = MixtureGuide(model)
        real = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in guide.parameters())
        assert counts.rank1 == real
        assert sum(p.numel() for p in guide.parameters()) == 3 * counts.component
    bn = sum(p.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert counts.member_extras == 2 * (bn + 10)  # K - 1 copies of every BatchNorm and of the fc bias


def test_params_command(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["params"])
    assert cli.main(["params", "resnet50", "--ensemble-size", "4"]) == 0
    out = capsys.readouterr().out
    for number in ("25,557,032", "52,139", "104,278", "0.41%", "25,977,144", "25.98M", "102,228,128", "102.2M"):
        assert number in out, number
    assert cli.main(["params", "vgg16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'vgg16'" in err[0]
    assert "lenet5, resnet18_cifar, resnet20_cifar, wrn28_10, resnet50, lstm" in err[0]


def test_lstm_reuses_one_factor_sample_per_sequence():
    model = rank1_network("lstm", 2, K, input_shape=(6, 3), hidden_size=4)
    guide = MixtureGuide(model)
    latent = {}
    for T in (2, 6):
        trace = poutine.trace(model).get_trace(torch.randn(3, T, 3))
        latent[T] = sorted(n for n, s in trace.nodes.items() if s["type"] == "sample" and n.startswith("net."))
    expected = ["net.head.0.r", "net.head.0.s", "net.lstm.r_hh", "net.lstm.r_ih", "net.lstm.s_hh", "net.lstm.s_ih"]
    assert latent[2] == latent[6] == expected
    assert trace.nodes["net.lstm.r_ih"]["value"].shape == (K, 1, 3)  # one draw per member, not per step
    # the output equals a hand loop with explicitly formed per-member weights W ∘ (s rᵀ)
    x = torch.randn(3, 5, 3)
    factors = {k: v.detach() for k, v in guide().items()}
    with torch.no_grad():
        out = poutine.condition(model.outputs, data=factors)(x)
    lstm, head = model.net.lstm, model.net.head[0]

    for k in range(K):
        w_ih = lstm.weight_ih * factors["net.lstm.s_ih"][k, 0][:, None] * factors["net.lstm.r_ih"][k, 0][None, :]
        w_hh = lstm.weight_hh * factors["net.lstm.s_hh"][k, 0][:, None] * factors["net.lstm.r_hh"][k, 0][None, :]
        h = c = torch.zeros(3, 4)
        for t in range(5):
            i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + lstm.bias[k]).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        w_out = head.weight * factors["net.head.0.s"][k, 0][:, None] * factors["net.head.0.r"][k, 0][None, :]
        torch.testing.assert_close(out[k], h @ w_out.T + head.bias[k], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Ready configurations and their data
# ------------------------------------------------------------------------------------------
def test_shipped_configs_hold_the_reference_settings():
    assert set(CONFIGS) >= {"cifar10_wrn28_10", "cifar100_wrn28_10", "imagenet_resnet50"}
    for name, classes in (("cifar10_wrn28_10", 10), ("cifar100_wrn28_10", 100)):
        cfg = load_config(name)
        assert (cfg.dataset, cfg.model, cfg.num_classes, cfg.ensemble_size) == (
            name.split("_")[0],
            "wrn28_10",
            classes,
            4,
        )
        assert cfg.model_args == {"depth": 28, "width": 10}
        prior = cfg.prior_spec()
        assert (type(prior).__name__, prior.loc, prior.scale) == ("Gaussian", 1.0, 0.1)
        assert cfg.init_sign_prob == 0.5 and cfg.epochs == 250 and cfg.kl_annealing_epochs == 200
        assert cfg.decay_epochs == (100, 200, 225) and cfg.decay_rate == 0.1 and cfg.momentum == 0.9 and cfg.nesterov
        assert cfg.per_core_batch_size == 64 and cfg.l2 == 1e-4
        assert cfg.batch_size == 64 // 4 * 8 == 128 and cfg.learning_rate == pytest.approx(0.1 * 128 / 128)
    cfg = load_config("imagenet_resnet50")
    prior = cfg.prior_spec()
    assert (cfg.model, cfg.num_classes, prior.scale, cfg.init_sign_prob) == ("resnet50", 1000, 0.05, 0.75)
    assert cfg.epochs == 135 and cfg.decay_epochs == (45, 90, 120) and cfg.kl_annealing_epochs == 90
    assert cfg.learning_rate == pytest.approx(0.1 * cfg.batch_size / 256)
    # the schedule is the training loop's TrainConfig; L2 l2*sum(w^2) is weight decay 2*l2
    schedule = cfg.train_config(device="cpu")
    assert schedule.weight_decay == pytest.approx(2e-4) and schedule.optimizer == "sgd" and schedule.nesterov
    assert schedule.lr == pytest.approx(cfg.learning_rate) and schedule.batch_size == cfg.batch_size
    assert (
        schedule.decay_epochs == (45, 90, 120)
        and schedule.kl_annealing_epochs == 90
        and schedule.warmup_epochs == cfg.warmup_epochs
    )
    assert schedule.seed == cfg.seed and schedule.device == "cpu" and schedule.precision == "fp32"
    assert type(schedule.objective).__name__ == "AveragedELBO"


def test_config_rejects_unknown_and_bad_values(tmp_path):
    values = {"name": "x", "dataset": "cifar10", "model": "resnet20_cifar", "num_classes": 10}
    assert RunConfig.from_dict(values).model == "resnet20_cifar"
    with pytest.raises(
        ValueError, match=r"unknown config key\(s\) \['learning_rat'\]; valid keys: .*base_learning_rate"
    ):
        RunConfig.from_dict({**values, "learning_rat": 0.1})
    with pytest.raises(ValueError, match="missing config key"):
        RunConfig.from_dict({"name": "x"})
    for bad, match in (
        ({"model": "vgg"}, "model: unknown name 'vgg'"),
        ({"num_classes": 100}, "cifar10 has 10 classes"),
        ({"ensemble_size": 0}, "ensemble_size must be an integer >= 1, got 0"),
        ({"init_scale": 0.0}, r"init_scale must be > 0, got 0\.0"),
        ({"base_learning_rate": float("inf")}, "base_learning_rate must be a finite number, got inf"),
        ({"l2": -1e-4}, "l2 must be >= 0, got -0.0001"),
        ({"seed": 1.5}, r"seed must be a finite integer, got 1\.5"),
        ({"decay_epochs": [20, 10]}, "decay_epochs"),
        ({"prior": {"family": "laplace"}}, "prior family"),
        ({"prior": {"scal": 0.1}}, "prior must be a table"),
        ({"init_sign_prob": 1.5}, "init_sign_prob"),
    ):
        with pytest.raises(ValueError, match=match):
            RunConfig.from_dict({**values, **bad})
    path = tmp_path / "mine.toml"
    path.write_text(
        'name = "mine"\ndataset = "cifar10"\nmodel = "resnet20_cifar"\nnum_classes = 10\nepochs = 3\nwarmup = 1\n'
    )
    with pytest.raises(ValueError, match=r"mine.toml: unknown config key\(s\) \['warmup'\]"):
        load_config(path)
    path.write_text('name = "mine"\ndataset = "cifar10"\nmodel = "resnet20_cifar"\nnum_classes = 10\nepochs = 3\n')
    assert load_config(path).epochs == 3
    with pytest.raises(FileNotFoundError, match="cifar10_wrn28_10"):
        load_config("cifar10_wrn28_11")
    with pytest.raises(ValueError, match="model_args"):
        load_config("cifar10_wrn28_10").replace(model_args={"depht": 10}).build_model()


@pytest.mark.parametrize(
    "name, changes, shape",
    [
        ("cifar10_wrn28_10", {"model_args": {"depth": 10, "width": 1}}, (2, 3, 8, 8)),  # WRN-10-1
        ("imagenet_resnet50", {"num_classes": 10}, (2, 3, 16, 16)),
    ],
)
def test_config_builds_and_runs_one_training_step(name, changes, shape):
    cfg = load_config(name).replace(ensemble_size=2, **changes)
    model, guide = cfg.build(num_data=100)
    assert isinstance(guide, MixtureGuide) and model.num_data == 100
    assert all(s.prior.scale == cfg.prior["scale"] for s in factor_sites(model))
    loc = guide.loc[next(iter(guide.loc.keys()))]
    assert set(loc.unique().tolist()) <= {-1.0, 1.0}  # random-sign initialisation
    x, y = torch.randn(shape), torch.tensor([0, 3])
    loss, changed, total = one_step(model, guide, x, y, cfg.learning_rate, cfg.momentum, cfg.nesterov)
    assert torch.isfinite(loss) and changed >= total - 2
    assert isinstance(cfg.build_objective(), AveragedELBO)  # the reference loss


def test_missing_data_names_the_paths_checked(tmp_path):
    cifar = load_config("cifar10_wrn28_10")
    with pytest.raises(FileNotFoundError) as info:
        cifar.datasets(tmp_path)
    message = str(info.value)
    assert (
        str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message and "never downloads" in message
    )
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python \(missing: test, meta\)"):
        load_config("cifar100_wrn28_10").datasets(tmp_path)
    imagenet = load_config("imagenet_resnet50")
    with pytest.raises(FileNotFoundError) as info:
        imagenet.datasets(tmp_path)
    assert str(tmp_path / "train") in str(info.value) and str(tmp_path / "val") in str(info.value)
    with pytest.raises(ValueError, match="data root"):
        imagenet.datasets(None)


def test_imagenet_folder_loads(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("n01", "n02"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), color=(10, 200, 30)).save(folder / "a.png")
    train_set, val_set = load_config("imagenet_resnet50").datasets(tmp_path)
    assert train_set.classes == ["n01", "n02"] and len(val_set) == 2
    image, label = val_set[1]
    assert image.shape == (3, 224, 224) and label == 1 and 0.0 <= image.min() <= image.max() <= 1.0
    train_loader, _ = load_config("imagenet_resnet50").data_loaders(tmp_path, batch_size=2)
    x, y = next(iter(train_loader))
    assert x.shape == (2, 3, 224, 224) and sorted(y.tolist()) == [0, 1]


def test_one_registry_builds_every_network_deterministic_and_rank1():
    """Every zoo name gives a deterministic net and a rank-1 model whose members all run; the
    rank-1 model's W are the deterministic net's weights' shapes (one registry, no wrappers)."""
    shapes = {"mlp": (7,), "lenet5": (1, 16, 16), "lstm": (5, 3)}
    small = {"wrn28_10": {"depth": 10, "width": 1}, "mlp": {"hidden": [5]}, "lstm": {"hidden_size": 4}}
    for name in zoo.ZOO:
        if name == "resnet50":
            continue  # covered by the parametrised test above; too slow twice
        shape = shapes.get(name, (3, 8, 8))
        net = network(name, 3, input_shape=shape, **small.get(name, {}))
        model = rank1_network(name, 3, 2, input_shape=shape, **small.get(name, {}))
        w_net = sorted(tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1)
        w_r1 = sorted(tuple(p.shape) for n, p in model.net.named_parameters() if n.endswith("weight") and p.dim() > 1)
        assert w_net == w_r1, name
        out = poutine.trace(model).get_trace(torch.randn(2, *shape)).nodes["obs"]["fn"].logits
        assert out.shape[-1] == 3 and torch.isfinite(out).all(), name


def test_zoo_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg16'; valid: lenet5, resnet18_cifar"):
        network("vgg16")
    with pytest.raises(ValueError, match="needs the input shape"):
        rank1_network("mlp", 10)
    with pytest.raises(ValueError, match="do not fit model 'lenet5'"):
        rank1_network("lenet5", 10, hidden=[3])


def test_config_models_are_the_zoo():
    """A config's model is validated against the same registry the Python API builds from."""
    with pytest.raises(ValueError, match="model"):
        RunConfig.from_dict({"name": "x", "dataset": "digits", "model": "vgg16", "num_classes": 10})
    cfg = load_config("digits_mlp")
    model = cfg.build_model(num_data=100, input_shape=(1, 8, 8))
    direct = rank1_network("mlp", 10, cfg.ensemble_size, cfg.prior_spec(), input_shape=(1, 8, 8), num_data=100)
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in direct.parameters()]
