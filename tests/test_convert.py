"""rank1ize: equivalence at r = s = 1, what gets converted, per-member BatchNorm, errors."""

import copy

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pyro.nn import PyroModule
from torch import nn

from rank1_pyro.convert import MemberBatchNorm, Rank1LSTMDropIn, conversion_plan, rank1ize
from rank1_pyro.inference import DeltaGuide
from rank1_pyro.layers import Rank1Conv2d, Rank1Layer, Rank1Linear, factor_sites, rank1_layers
from rank1_pyro.priors import Cauchy, Gaussian, PriorMap


def identity_factors(model):
    """Factor values r = s = 1 for every site, from the DeltaGuide (BatchEnsemble at its identity)."""
    with torch.no_grad():
        return DeltaGuide(model, init_sign_prob=None, init_loc_std=0.0)()


def random_factors(model, sample_shape=()):
    """Random factor values ``(*sample_shape, K, 1, size)`` for every site."""
    return {
        s.name: 1.0 + 0.3 * torch.randn(*sample_shape, s.layer.ensemble_size, 1, s.size) for s in factor_sites(model)
    }


def state_snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm running statistics and affine parameters
        net.train()
        for _ in range(2):
            net(torch.randn(4, 3, 32, 32))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def weight_layers(module):
    return [name for name, m in module.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


@pytest.mark.parametrize("K", [1, 2])
def test_resnet18_at_identity_factors_equals_original(resnet18, K):
    before = state_snapshot(resnet18)
    model = rank1ize(resnet18, ensemble_size=K).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = poutine.condition(model.outputs, data=identity_factors(model))(x)
        expected = resnet18(x)
    assert out.shape == (K, 3, 10)
    for k in range(K):
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-5)
    # every Linear / Conv2d was converted, and nothing else
    converted = [name.removeprefix("net.") for name, _ in rank1_layers(model)]
    assert sorted(converted) == sorted(weight_layers(resnet18))
    assert len(converted) == 21  # 20 convolutions (3 of them 1x1 shortcuts) + fc
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.net.modules())
    # the user's module is untouched: same parameters, buffers, and plain torch classes
    after = resnet18.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(resnet18) is torchvision.models.ResNet and type(resnet18.fc) is nn.Linear
    assert not any(isinstance(m, PyroModule) for m in resnet18.modules())


def test_shared_batchnorm_in_training_mode_equals_original(resnet18):
    """Identical members duplicate the rows, so the shared batch statistics are the original's."""
    net = copy.deepcopy(resnet18).train()
    model = rank1ize(net, ensemble_size=2).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = poutine.condition(model.outputs, data=identity_factors(model))(x)
        expected = net(x)
    torch.testing.assert_close(out, expected.expand(2, -1, -1), rtol=1e-4, atol=1e-4)


def test_weights_and_biases_are_copied():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2, bias=False))
    net[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    model = rank1ize(net, ensemble_size=3)
    first, last = model.net[0], model.net[2]
    assert isinstance(first, Rank1Linear) and isinstance(last, Rank1Linear)
    assert torch.equal(first.weight, net[0].weight) and first.weight.data_ptr() != net[0].weight.data_ptr()
    assert first.bias.shape == (3, 5) and all(torch.equal(first.bias[k], net[0].bias) for k in range(3))
    assert last.bias is None
    assert not first.weight.requires_grad and first.bias.requires_grad and last.weight.requires_grad


def test_conv_with_string_padding_and_random_factors():
    """padding="same" (with dilation) survives conversion; the output is the explicit per-member kernel's."""
    conv = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
    model = rank1ize(nn.Sequential(conv), ensemble_size=2)
    layer = model.net[0]
    assert isinstance(layer, Rank1Conv2d) and layer.padding == "same"
    x = torch.randn(2, 3, 7, 6)
    factors = random_factors(model)
    with torch.no_grad():
        out = poutine.condition(model.outputs, data=factors)(x)
    assert out.shape == (2, 2, 4, 7, 6)
    r, s = factors["net.0.r"][:, 0], factors["net.0.s"][:, 0]
    for k in range(2):
        kernel = conv.weight * s[k][:, None, None, None] * r[k][None, :, None, None]
        expected = F.conv2d(x, kernel, conv.bias, padding="same", dilation=2)
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-5)


def test_linear_on_sequences_gets_each_rows_member_factors():
    """nn.Linear accepts (N, *, in); the converted layer must give every position its row's member."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Flatten())
    model = rank1ize(net, ensemble_size=2)
    x = torch.randn(5, 6, 3)  # B = 5 sequences of 6 positions
    factors = random_factors(model, (2,))  # S = 2 samples
    with torch.no_grad(), pyro.plate("samples", 2, dim=-3):
        out = poutine.condition(model.outputs, data=factors)(x)
    assert out.shape == (2, 2, 5, 24)
    r, s, b, w = factors["net.0.r"], factors["net.0.s"], model.net[0].bias, model.net[0].weight
    for i in range(2):
        for k in range(2):
            expected = F.linear(x, w * s[i, k, 0][:, None] * r[i, k, 0][None, :], b[k])
            torch.testing.assert_close(out[i, k], expected.reshape(5, 24), rtol=1e-5, atol=1e-5)


def test_lstm_drop_in_shapes_and_values():
    lstm = nn.LSTM(3, 5, batch_first=True)
    model = rank1ize(nn.Sequential(lstm), ensemble_size=2)
    layer = model.net[0]
    assert isinstance(layer, Rank1LSTMDropIn)
    torch.testing.assert_close(layer.bias, (lstm.bias_ih_l0 + lstm.bias_hh_l0).expand(2, -1))
    x = torch.randn(4, 6, 3)
    with torch.no_grad(), poutine.condition(data=identity_factors(model)):
        out, (h, c) = layer(x.repeat(2, 1, 1))
        ref_out, (ref_h, ref_c) = lstm(x)
    assert h.shape == c.shape == (1, 8, 5) and ref_h.shape == (1, 4, 5)
    torch.testing.assert_close(out, ref_out.repeat(2, 1, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h.repeat(1, 2, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, ref_c.repeat(1, 2, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="initial state"):
        layer(x, (h, c))
    # without biases, and with a frozen one: the per-member bias follows
    assert rank1ize(nn.Sequential(nn.LSTM(3, 5, batch_first=True, bias=False))).net[0].bias is None
    lstm.bias_hh_l0.requires_grad_(False)
    assert rank1ize(nn.Sequential(lstm)).net[0].bias.requires_grad
    lstm.bias_ih_l0.requires_grad_(False)
    assert not rank1ize(nn.Sequential(lstm)).net[0].bias.requires_grad


class Zoo(nn.Module):
    """A module with one of every unsupported weight layer, plus convertible ones."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv1d = nn.Conv1d(3, 4, 3)
        self.conv3d = nn.Conv3d(3, 4, 3)
        self.deconv = nn.ConvTranspose2d(3, 4, 3)
        self.reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.embed = nn.Embedding(10, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.seq_first = nn.LSTM(3, 4)
        self.deep = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.bi = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
        self.proj = nn.LSTM(3, 4, batch_first=True, proj_size=2)
        self.lazy = nn.LazyLinear(4)
        self.scale = nn.Parameter(torch.ones(()))
        self.block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.PReLU(), Gain())


class Gain(nn.Module):
    """A custom module with a raw parameter next to a convertible submodule."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))
        self.inner = nn.Linear(4, 4)


UNSUPPORTED = {
    "conv1d": "Conv1d",
    "conv3d": "Conv3d",
    "deconv": "ConvTranspose2d",
    "reflect": "padding_mode='reflect'",
    "embed": "Embedding",
    "attn": "MultiheadAttention",
    "seq_first": "batch_first=False",
    "deep": "num_layers=2",
    "bi": "bidirectional=True",
    "proj": "proj_size=2",
    "lazy": "uninitialized lazy module",
    "scale": "a parameter of Zoo",  # a raw nn.Parameter of a custom module
    "block.4.gain": "a parameter of Gain",
}


def test_unsupported_layers_are_all_listed_in_one_error():
    zoo = Zoo()
    with pytest.raises(ValueError) as info:
        rank1ize(zoo)
    message = str(info.value)
    assert f"{len(UNSUPPORTED)} layer(s) or parameter(s)" in message
    for path, what in UNSUPPORTED.items():
        assert f"{path} (" in message and what in message, (path, what)
    assert "attn.out_proj" not in message  # the inside of an offending module is not reported again
    assert "block.1" not in message and "block.2" not in message and "block.3" not in message  # norms, PReLU
    # excluded by pattern, the converted layers remain
    plan = conversion_plan(zoo, exclude=[p for p in UNSUPPORTED if p != "scale"] + ["sc*"])
    assert plan == {"conv": "conv2d", "block.0": "linear", "block.4.inner": "linear"}
    assert conversion_plan(zoo, include=["conv", "block"], exclude="*.gain") == plan
    assert conversion_plan(zoo, include="block.4.inner") == {"block.4.inner": "linear"}


def test_include_and_exclude_patterns(resnet18):
    all_layers = set(weight_layers(resnet18))
    assert set(conversion_plan(resnet18)) == all_layers
    assert set(conversion_plan(resnet18, include="fc")) == {"fc"}
    # a pattern covers the whole subtree of the module it matches
    plan = conversion_plan(resnet18, exclude=["layer4", "fc"])
    assert set(plan) == {p for p in all_layers if not p.startswith("layer4.") and p != "fc"}
    plan = conversion_plan(resnet18, include=["layer*.0.downsample"])
    assert set(plan) == {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}
    plan = conversion_plan(resnet18, include="*conv1", exclude="layer1*")
    assert set(plan) == {p for p in all_layers if p.endswith("conv1") and not p.startswith("layer1")}
    model = rank1ize(resnet18, ensemble_size=2, include=["layer4", "fc"])
    converted = {name.removeprefix("net.") for name, _ in rank1_layers(model)}
    assert converted == {p for p in all_layers if p.startswith("layer4.") or p == "fc"}
    assert type(model.net.conv1) is not Rank1Conv2d
    with pytest.raises(ValueError, match="'layer9' matches no module"):
        conversion_plan(resnet18, exclude=["layer9"])
    with pytest.raises(ValueError, match="no Linear, Conv2d or LSTM layer selected"):
        rank1ize(resnet18, exclude="*")


def test_per_member_batchnorm_uses_each_members_statistics():
    K, B, C = 3, 5, 4
    net = nn.Sequential(nn.Linear(2, C), nn.BatchNorm1d(C))
    model = rank1ize(net, ensemble_size=K, batchnorm="per_member")
    bn = model.net[1]
    assert isinstance(bn, MemberBatchNorm) and len(bn.members) == K
    with torch.no_grad():
        for m in bn.members:
            m.weight.uniform_(0.5, 2.0)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(B, 2)
    S = 2
    factors = random_factors(model, (S,))
    r, s, b, w = factors["net.0.r"], factors["net.0.s"], model.net[0].bias, model.net[0].weight

    def hidden():  # the rank-1 dense layer by hand: (S, K, B, C)
        return ((x * r) @ w.T) * s + b[:, None, :]

    def run():
        with torch.no_grad(), pyro.plate("samples", S, dim=-3):
            return poutine.condition(model.outputs, data=factors)(x)

    # evaluation: member k's running statistics and affine parameters
    model.eval()
    h = hidden()
    out = run()
    for k, m in enumerate(bn.members):
        expected = (h[:, k] - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias
        torch.testing.assert_close(out[:, k], expected, rtol=1e-5, atol=1e-5)
    # training: member k's batch statistics over its S*B rows, and its own running statistics move
    model.train()
    old_means = [m.running_mean.clone() for m in bn.members]
    out = run()
    for k, m in enumerate(bn.members):
        rows = h[:, k].reshape(-1, C)
        mean, var = rows.mean(0), rows.var(0, unbiased=False)
        expected = (h[:, k] - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias
        torch.testing.assert_close(out[:, k], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.running_mean, (1 - m.momentum) * old_means[k] + m.momentum * mean)
    # shared BatchNorm normalises all members together: a different result
    shared = rank1ize(net, ensemble_size=K).train()
    with torch.no_grad(), pyro.plate("samples", S, dim=-3):
        out_shared = poutine.condition(shared.outputs, data=factors)(x)
    assert not torch.allclose(out_shared, out, atol=1e-3)


def test_prior_and_argument_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    prior = PriorMap(Gaussian(1.0, 0.1), {"net.2.*": Cauchy(1.0, 0.2)})
    model = rank1ize(net, ensemble_size=2, prior=prior)
    trace = poutine.trace(model).get_trace(torch.randn(5, 3))
    assert isinstance(trace.nodes["net.2.r"]["fn"].base_dist, pyro.distributions.Cauchy)
    assert isinstance(trace.nodes["net.0.s"]["fn"].base_dist, pyro.distributions.Normal)
    with pytest.raises(ValueError, match="matches no factor site"):
        rank1ize(net, prior=PriorMap(Gaussian(), {"fc.*": Cauchy()}))
    with pytest.raises(ValueError, match="batchnorm"):
        rank1ize(net, batchnorm="per_layer")
    with pytest.raises(ValueError, match="ensemble_size"):
        rank1ize(net, ensemble_size=0)
    with pytest.raises(ValueError, match="include"):
        rank1ize(net, include=[3])
    with pytest.raises(TypeError, match="nn.Module"):
        rank1ize(lambda x: x)
    # a bare layer is a network too
    single = rank1ize(nn.Linear(3, 2), ensemble_size=2)
    assert isinstance(single.net, Rank1Layer) and [s.name for s in factor_sites(single)] == ["net.r", "net.s"]


# --------------------------------------------------------------------------------------
# Mutation-tested behaviour (issue #21): exact messages, edge patterns, model arguments
# --------------------------------------------------------------------------------------
class Offenders(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.lazy = nn.LazyLinear(2)
        self.bi = nn.LSTM(3, 4, bidirectional=True)
        self.emb = nn.Embedding(3, 2)
        self.fc = nn.Linear(2, 2)


def test_unsupported_message_is_exact():
    expected = (
        "rank1ize: 4 layer(s) or parameter(s) have no rank-1 counterpart: "
        "scale (a parameter of Offenders: no rank-1 counterpart); "
        "lazy (LazyLinear: uninitialized lazy module (run one forward pass first)); "
        "bi (LSTM: batch_first=False, bidirectional=True (Rank1LSTM: one layer, batch_first=True, unidirectional)); "
        "emb (Embedding: no rank-1 counterpart). "
        "Keep them deterministic with exclude=[...] (or convert them yourself)."
    )
    with pytest.raises(ValueError) as info:
        conversion_plan(Offenders())
    assert str(info.value) == expected
    with pytest.raises(ValueError) as info:
        rank1ize(nn.Embedding(3, 2))  # the root itself
    assert "no rank-1 counterpart: <root> (Embedding: no rank-1 counterpart). Keep" in str(info.value)


class OwnLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class OwnConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class OwnLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(x, hx)


def test_subclasses_with_their_own_forward_are_not_converted():
    """A subclass that overrides forward may compute anything: its parameters are reported, never swapped."""
    net = nn.Sequential(OwnLinear(2, 2), OwnConv(1, 1, 1), OwnLSTM(3, 3, batch_first=True), nn.Linear(2, 2))
    with pytest.raises(ValueError) as info:
        conversion_plan(net)
    message = str(info.value)
    assert "0.weight (a parameter of OwnLinear" in message and "1.bias (a parameter of OwnConv" in message
    assert "2.weight_ih_l0 (a parameter of OwnLSTM" in message
    assert conversion_plan(net, exclude=["0", "1", "2"]) == {"3": "linear"}


class Gated(nn.Linear):
    """A Linear (its own forward) holding a submodule: converted whole, its inside never visited."""

    def __init__(self):
        super().__init__(3, 3)
        self.gate = nn.Linear(3, 3)


def test_the_inside_of_a_converted_module_is_not_visited():
    assert conversion_plan(nn.Sequential(Gated(), nn.ReLU(), nn.Linear(3, 2))) == {"0": "linear", "2": "linear"}
    assert conversion_plan(Gated()) == {"": "linear"}


def test_per_member_batchnorm_is_planned_and_needs_a_weight_layer():
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert conversion_plan(net, batchnorm="per_member") == {"0": "linear", "1": "batchnorm", "2": "linear"}
    assert conversion_plan(net) == {"0": "linear", "2": "linear"}  # shared: BatchNorm unchanged
    with pytest.raises(ValueError, match=r"^rank1ize: no Linear, Conv2d or LSTM layer selected in Sequential; check"):
        rank1ize(net, include="1", batchnorm="per_member")


def test_the_root_module_matches_the_empty_pattern():
    assert conversion_plan(nn.Linear(3, 2), include="") == {"": "linear"}
    assert conversion_plan(nn.Linear(3, 2), exclude="") == {}


@pytest.mark.parametrize("children, shown", [(30, "0, ..., 29"), (31, "0, ..., 29, ... (1 more)")])
def test_unmatched_pattern_lists_at_most_30_module_paths(children, shown):
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(children)])
    listing = ", ".join(str(i) for i in range(30)) + (", ... (1 more)" if children == 31 else "")
    with pytest.raises(ValueError) as info:
        conversion_plan(net, include="fc*")
    assert str(info.value) == f"include pattern 'fc*' matches no module; module paths are: {listing}"
    with pytest.raises(ValueError, match=r"^exclude pattern 'x' matches no module; module paths are: <root>$"):
        conversion_plan(nn.Linear(2, 2), exclude="x")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: conversion_plan("net"), TypeError, r"^module must be a torch.nn.Module, got str$"),
        (lambda: conversion_plan(nn.Linear(2, 2), include=[3]), ValueError, r"^include must be a name pattern"),
        (lambda: conversion_plan(nn.Linear(2, 2), exclude=[3]), ValueError, r"^exclude must be a name pattern \(str\)"),
        (lambda: rank1ize(nn.Linear(2, 2), ensemble_size=0), ValueError, r"^ensemble_size must be an integer >= 1"),
        (
            lambda: MemberBatchNorm(nn.LayerNorm(3), 2),
            TypeError,
            r"^MemberBatchNorm: expected a BatchNorm layer, got LayerNorm$",
        ),
        (lambda: MemberBatchNorm(nn.BatchNorm1d(3), 0), ValueError, r"^ensemble_size must be an integer >= 1, got 0$"),
        (
            lambda: MemberBatchNorm(nn.BatchNorm1d(4), 2)(torch.randn(5, 4)),
            ValueError,
            r"^MemberBatchNorm: expected a flat batch \(N, C, ...\) with N a multiple of 2 \(samples x K members\), "
            r"got shape \(5, 4\)$",
        ),
    ],
)
def test_argument_errors_are_exact(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_lstm_drop_in_refuses_packed_sequences_and_initial_states():
    layer = rank1ize(nn.Sequential(nn.LSTM(3, 4, batch_first=True)), ensemble_size=2).net[0]
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    with pytest.raises(TypeError, match=r"^Rank1LSTMDropIn: PackedSequence input is not supported; pad the sequences$"):
        layer(packed)
    with pytest.raises(ValueError, match=r"^Rank1LSTMDropIn: an initial state hx is not supported \(the state starts"):
        layer(torch.randn(2, 5, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))


def test_model_arguments_and_dtype_follow_the_network():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    model = rank1ize(net, likelihood="normal", num_data=50)
    assert model.ensemble_size == 4 and model.likelihood == "normal" and model.num_data == 50
    assert model.net[0].weight.dtype == torch.float64 and model.net[0].bias.dtype == torch.float64
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        out = poutine.condition(model.outputs, data=identity_factors(model))(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, net(x).expand(4, -1, -1))


def test_member_batchnorm_repr_names_the_ensemble_size():
    assert repr(MemberBatchNorm(nn.BatchNorm1d(4), 3)).startswith("MemberBatchNorm(\n  ensemble_size=3\n")
