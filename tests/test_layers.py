"""Rank-1 layers equal a dense computation with an explicit W ∘ (s rᵀ) per member."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rank1_pyro import Cauchy, Gaussian, HalfCauchy, PriorMap, Rank1Conv2d, Rank1Linear, Rank1LSTM, members
from rank1_pyro import layers as layers_module
from rank1_pyro.layers import FACTOR_CLIP, Rank1Layer, factor_sites, member_plate

K, B = 3, 5


def draw(layer, sizes):
    """Random factor values for every site of ``layer`` (as a stand-alone module, sites are 'r', 's', ...)."""
    return {name: 1.0 + 0.5 * torch.randn(K, 1, n) for name, n in sizes.items()}


def run(layer, x, values):
    return poutine.condition(layer, data=values)(x)


def test_linear_equals_dense_per_member_weights():
    layer = Rank1Linear(4, 6, ensemble_size=K)
    values = draw(layer, layer.factor_sizes)
    x = torch.randn(K, B, 4)
    out = run(layer, x, values)
    for k in range(K):
        w_k = layer.weight * torch.outer(values["s"][k, 0], values["r"][k, 0])
        torch.testing.assert_close(out[k], x[k] @ w_k.T + layer.bias[k])


def test_no_per_member_weight_is_allocated():
    layer = Rank1Conv2d(3, 8, 3, ensemble_size=K)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"weight": (8, 3, 3, 3), "bias": (K, 8)}
    assert list(layer.buffers()) == []
    lin = Rank1Linear(4, 6, ensemble_size=K)
    assert {n: tuple(p.shape) for n, p in lin.named_parameters()} == {"weight": (6, 4), "bias": (K, 6)}
    lstm = Rank1LSTM(4, 5, ensemble_size=K)
    assert {n: tuple(p.shape) for n, p in lstm.named_parameters()} == {
        "weight_ih": (20, 4),
        "weight_hh": (20, 5),
        "bias": (K, 20),
    }


@pytest.mark.parametrize("groups,padding", [(1, 1), (2, 0), (1, "same")])
def test_conv_equals_dense_per_member_kernels(groups, padding):
    layer = Rank1Conv2d(4, 6, 3, stride=1, padding=padding, groups=groups, ensemble_size=K)
    values = draw(layer, layer.factor_sizes)
    x = torch.randn(K, B, 4, 7, 7)
    out = run(layer, x, values)
    for k in range(K):
        r, s = values["r"][k, 0], values["s"][k, 0]
        # W_k[o, i] = W[o, i] s_o r_{group(o) * C_in/groups + i}
        in_per_group = 4 // groups
        group_of_out = torch.arange(6) // (6 // groups)
        r_idx = group_of_out[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
        w_k = layer.weight * s[:, None, None, None] * r[r_idx][:, :, None, None]
        expected = F.conv2d(x[k], w_k, layer.bias[k], padding=padding, groups=groups)
        torch.testing.assert_close(out[k], expected, rtol=1e-4, atol=1e-5)


def test_lstm_equals_hand_loop_and_reuses_one_sample_per_sequence():
    layer = Rank1LSTM(3, 4, ensemble_size=K)
    values = draw(layer, layer.factor_sizes)
    T = 6
    x = torch.randn(K, B, T, 3)
    trace = poutine.trace(poutine.condition(layer, data=values)).get_trace(x)
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert sorted(sites) == ["r_hh", "r_ih", "s_hh", "s_ih"]  # one site per factor, whatever T is
    out, (h_n, c_n) = trace.nodes["_RETURN"]["value"]
    for k in range(K):
        w_ih = layer.weight_ih * torch.outer(values["s_ih"][k, 0], values["r_ih"][k, 0])
        w_hh = layer.weight_hh * torch.outer(values["s_hh"][k, 0], values["r_hh"][k, 0])
        h = torch.zeros(B, 4)
        c = torch.zeros(B, 4)
        for t in range(T):
            i, f, g, o = (x[k, :, t] @ w_ih.T + h @ w_hh.T + layer.bias[k]).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            torch.testing.assert_close(out[k, :, t], h)
        torch.testing.assert_close(h_n[k], h)
        torch.testing.assert_close(c_n[k], c)


def test_leading_particle_dims_broadcast():
    layer = Rank1Linear(4, 6, ensemble_size=K)
    x = torch.randn(K, B, 4)
    with pyro.plate("particles", 7, dim=-3):
        trace = poutine.trace(layer).get_trace(x)
    out = trace.nodes["_RETURN"]["value"]
    r, s = trace.nodes["r"]["value"], trace.nodes["s"]["value"]
    assert r.shape == (7, K, 1, 4) and out.shape == (7, K, B, 6)
    for p in (0, 6):
        torch.testing.assert_close(out[p], run(layer, x, {"r": r[p], "s": s[p]}))


def test_flat_layout_equals_structured_layout():
    layer = Rank1Conv2d(2, 3, 3, padding=1, ensemble_size=K)
    values = draw(layer, layer.factor_sizes)
    x = torch.randn(K, B, 2, 5, 5)
    structured = run(layer, x, values)
    flat = run(layer, x.reshape(K * B, 2, 5, 5), values)
    torch.testing.assert_close(flat, structured.reshape(K * B, 3, 5, 5))


def test_factors_are_clipped():
    layer = Rank1Linear(2, 2, ensemble_size=1, bias=False)
    values = {"r": torch.full((1, 1, 2), 1e6), "s": torch.ones(1, 1, 2)}
    x = torch.ones(1, 1, 2)
    torch.testing.assert_close(run(layer, x, values), FACTOR_CLIP * x @ layer.weight.T)


def test_factor_sites_follow_module_paths():
    net = pyro.nn.PyroModule[nn.Sequential](
        Rank1Linear(2, 3, ensemble_size=2), nn.ReLU(), Rank1Linear(3, 1, ensemble_size=2)
    )
    assert [s.name for s in factor_sites(net)] == ["0.r", "0.s", "2.r", "2.s"]
    trace = poutine.trace(net).get_trace(torch.randn(2, 4, 2))
    assert {"0.r", "0.s", "2.r", "2.s"} <= set(trace.nodes)


@pytest.mark.parametrize(
    "make, x, error, match",
    [
        (lambda: Rank1Linear(4, 2, ensemble_size=K), torch.randn(K, B, 5), ValueError, "in_features=4"),
        (lambda: Rank1Linear(4, 2, ensemble_size=K), torch.randn(2, B, 4), ValueError, "member dim"),
        (lambda: Rank1Linear(4, 2, ensemble_size=K), torch.ones(K, B, 4, dtype=torch.long), TypeError, "floating"),
        (lambda: Rank1Conv2d(3, 2, 3, ensemble_size=K), torch.randn(K, B, 4, 5, 5), ValueError, "C_in=3"),
        (lambda: Rank1Linear(4, 2, ensemble_size=K), torch.randn(K * B + 1, 4), ValueError, "not a tiling"),
    ],
)
def test_bad_input_raises_clear_error(make, x, error, match):
    with pytest.raises(error, match=match):
        make()(x)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_ensemble_size(k):
    with pytest.raises(ValueError, match="ensemble_size"):
        Rank1Linear(2, 2, ensemble_size=k)


def test_extra_repr_names_the_configuration():
    text = repr(Rank1Linear(4, 2, ensemble_size=3, prior=Gaussian(1.0, 0.05)))
    assert "in_features=4" in text and "ensemble_size=3" in text and "scale=0.05" in text


# --------------------------------------------------------------------------------------
# Mutation-tested behaviour (issue #21): every path against a dense computation or torch's own layers
# --------------------------------------------------------------------------------------
def dense_conv(x, weight, r, s, bias, groups=1, **kwargs):
    """``F.conv2d`` with the explicit kernel W[o, i] s_o r_(group(o) C_in/groups + i)."""
    out_channels, in_per_group = weight.shape[:2]
    group_of_out = torch.arange(out_channels) // (out_channels // groups)
    r_idx = group_of_out[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
    kernel = weight * s[:, None, None, None] * r[r_idx][:, :, None, None]
    return F.conv2d(x, kernel, bias, groups=groups, **kwargs)


def factors(layer, *lead):
    return {name: 1.0 + 0.5 * torch.randn(*lead, n) for name, n in layer.factor_sizes.items()}


def spy_paths(layer):
    """Record which of the conv's two paths (folded kernels, scaled activations) each forward takes."""
    calls = []
    for name in ("_folded", "_scaled"):
        method = getattr(layer, name)
        setattr(layer, name, lambda *args, _m=method, _n=name: (calls.append(_n), _m(*args))[1])
    return calls


CONV = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)


@pytest.mark.parametrize("member_dim", [2, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fold", [True, False])
def test_conv_both_paths_equal_the_dense_kernel(fold, bias, member_dim):
    layer = Rank1Conv2d(4, 6, (3, 2), bias=bias, ensemble_size=2, **CONV)
    layer.fold = fold
    calls = spy_paths(layer)
    values = factors(layer, 2, 1)
    x = torch.randn(member_dim, B, 4, 7, 8)  # member dim 1: one input shared by both members
    out = run(layer, x, values)
    assert calls == ["_folded" if fold else "_scaled"]
    assert out.shape == (2, B, 6, 4, 6)
    for k in range(2):
        bias_k = layer.bias[k] if bias else None
        expected = dense_conv(x[k % member_dim], layer.weight, values["r"][k, 0], values["s"][k, 0], bias_k, **CONV)
        torch.testing.assert_close(out[k], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_conv_sample_draws_broadcast_against_the_input(fold):
    layer = Rank1Conv2d(2, 3, 3, padding=1, ensemble_size=2)
    layer.fold = fold
    S = 3
    values = factors(layer, S, 2, 1)
    x = torch.randn(2, B, 2, 5, 5)  # factors with a sample dim, input without
    with pyro.plate("samples", S, dim=-3):
        out = run(layer, x, values)
    assert out.shape == (S, 2, B, 3, 5, 5)
    for i in range(S):
        for k in range(2):
            expected = dense_conv(
                x[k], layer.weight, values["r"][i, k, 0], values["s"][i, k, 0], layer.bias[k], padding=1
            )
            torch.testing.assert_close(out[i, k], expected, rtol=1e-4, atol=1e-5)
    x = torch.randn(S, 2, B, 2, 5, 5)  # input with a sample dim, factors without
    one = {n: v[0] for n, v in values.items()}
    out = run(layer, x, one)
    assert out.shape == (S, 2, B, 3, 5, 5)
    for i in range(S):
        for k in range(2):
            expected = dense_conv(x[i, k], layer.weight, one["r"][k, 0], one["s"][k, 0], layer.bias[k], padding=1)
            torch.testing.assert_close(out[i, k], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_conv_input_with_two_sample_dims(fold):
    layer = Rank1Conv2d(2, 3, 3, padding=1, ensemble_size=2)
    layer.fold = fold
    values = factors(layer, 2, 1)
    x = torch.randn(2, 3, 2, B, 2, 4, 4)  # (S1, S2, K, B, C, H, W): the factors broadcast over both
    out = run(layer, x, values)
    assert out.shape == (2, 3, 2, B, 3, 4, 4)
    for i, j, k in ((0, 0, 0), (1, 2, 1), (0, 2, 1), (1, 1, 0)):
        expected = dense_conv(x[i, j, k], layer.weight, values["r"][k, 0], values["s"][k, 0], layer.bias[k], padding=1)
        torch.testing.assert_close(out[i, j, k], expected, rtol=1e-4, atol=1e-5)


def test_conv_per_example_factors_scale_each_example():
    layer = Rank1Conv2d(2, 3, 3, padding=1, ensemble_size=2)
    layer.fold = True  # per-example factors have no per-member kernel: scaled anyway
    calls = spy_paths(layer)
    values = factors(layer, 2, B)
    x = torch.randn(2, B, 2, 5, 5)
    out = run(layer, x, values)
    assert calls == ["_scaled"]
    for k in range(2):
        for b in range(B):
            r, s = values["r"][k, b], values["s"][k, b]
            expected = dense_conv(x[k, b : b + 1], layer.weight, r, s, layer.bias[k], padding=1)[0]
            torch.testing.assert_close(out[k, b], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel, padding, path", [((2, 18), (1, 9), "_scaled"), ((5, 7), (2, 3), "_folded")])
def test_without_gradients_a_conv_folds_when_its_kernel_is_smaller_than_the_activations(kernel, padding, path):
    # input (K=2, B=3, C_in=1, H=3, W=2), C_out=1: one member's activations B (C_in + C_out) H W = 36 entries,
    # against kernels of 36 entries (not smaller: scale) and 35 (fold)
    layer = Rank1Conv2d(1, 1, kernel, padding=padding, ensemble_size=2)
    calls = spy_paths(layer)
    x = torch.randn(2, 3, 1, 3, 2)
    with torch.no_grad():
        trace = poutine.trace(layer).get_trace(x)
    assert calls == [path]
    r, s, out = trace.nodes["r"]["value"], trace.nodes["s"]["value"], trace.nodes["_RETURN"]["value"]
    for k in range(2):
        expected = dense_conv(x[k], layer.weight, r[k, 0], s[k, 0], layer.bias[k], padding=padding)
        torch.testing.assert_close(out[k], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "k, where, samples, path",
    [
        (2, "factors", 32, "_folded"),  # 64 draws x members: still folded
        (2, "factors", 33, "_scaled"),  # 66: past 64 small convolutions
        (5, "factors", 13, "_scaled"),  # 65
        (2, "input", 32, "_folded"),
        (2, "input", 33, "_scaled"),
    ],
)
def test_past_64_draws_a_conv_scales_the_activations(k, where, samples, path):
    layer = Rank1Conv2d(2, 3, 1, ensemble_size=k)
    layer.fold = True
    calls = spy_paths(layer)
    with torch.no_grad():
        if where == "factors":
            with pyro.plate("samples", samples, dim=-3):
                out = layer(torch.randn(k, 2, 2, 3, 3))
        else:
            out = layer(torch.randn(samples, k, 2, 2, 3, 3))
    assert calls == [path] and out.shape == (samples, k, 2, 3, 3, 3)


def test_the_cost_model_without_trainable_parameters_or_without_gradients():
    layer = Rank1Conv2d(5, 4, 1, ensemble_size=3)  # 20 kernel entries
    x = members(3).tile(torch.randn(5, 5, 1, 1))
    r = torch.ones(3, 1, 5)
    layer.requires_grad_(False)  # frozen: the kernel size decides, even with gradients on
    assert layer._fold(x, r, 21) and not layer._fold(x, r, 20)
    layer.requires_grad_(True)
    with torch.no_grad():  # no gradients: the kernel size decides, whatever the input needs
        assert layer._fold(x.clone().requires_grad_(), r, 21)
    layer.fold = False
    assert not layer._fold(x, r, 10**9)
    layer.fold = True
    assert layer._fold(x.clone().requires_grad_(), r, 1) and not layer._fold(x, torch.ones(3, 5, 5), 10**9)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fold", [None, True, False])
def test_linear_paths_equal_the_dense_weights(fold, bias):
    layer = Rank1Linear(4, 6, ensemble_size=3, bias=bias)
    layer.fold = fold
    values = factors(layer, 2, 3, 1)
    x = torch.randn(3, B, 4)
    with pyro.plate("samples", 2, dim=-3):
        out = run(layer, x, values)
    # dense layers scale the activations by default (folding measured slower); fold=True builds the
    # per-member weights W ∘ (s rᵀ): the last autograd node tells which
    scaled = out.grad_fn.name() in ("AddcmulBackward0", "MulBackward0")
    assert scaled == (fold is not True), out.grad_fn.name()
    for i in range(2):
        for k in range(3):
            w_k = layer.weight * torch.outer(values["s"][i, k, 0], values["r"][i, k, 0])
            expected = x[k] @ w_k.T + (layer.bias[k] if bias else 0.0)
            torch.testing.assert_close(out[i, k], expected)


def test_linear_fold_needs_per_member_factors():
    layer = Rank1Linear(4, 6, ensemble_size=3)
    layer.fold = True
    values = factors(layer, 3, B)  # per-example factors: no per-member weight, the activations are scaled
    x = torch.randn(3, B, 4)
    out = run(layer, x, values)
    assert out.grad_fn.name() == "AddcmulBackward0"
    for k in range(3):
        for b in range(B):
            w = layer.weight * torch.outer(values["s"][k, b], values["r"][k, b])
            torch.testing.assert_close(out[k, b], w @ x[k, b] + layer.bias[k])


@pytest.mark.parametrize("fold", [True, False])
def test_linear_flat_layout_equals_structured_layout(fold):
    layer = Rank1Linear(4, 6, ensemble_size=3, bias=False)
    layer.fold = fold
    values = factors(layer, 3, 1)
    x = torch.randn(3, B, 4)
    structured = run(layer, x, values)
    assert (structured.grad_fn.name() == "MulBackward0") == (not fold)  # scaled (no bias) unless folded
    flat = run(layer, x.reshape(3 * B, 4), values)
    assert flat.shape == (3 * B, 6)
    torch.testing.assert_close(flat, structured.reshape(3 * B, 6))


def lstm_by_hand(x, layer, f, hidden):
    """One sequence (T, in) through the LSTM with per-sequence factors ``f`` (vectors) and bias row."""
    w_ih = layer.weight_ih * torch.outer(f["s_ih"], f["r_ih"])
    w_hh = layer.weight_hh * torch.outer(f["s_hh"], f["r_hh"])
    h, c, outs = torch.zeros(hidden), torch.zeros(hidden), []
    for t in range(x.shape[0]):
        i, g_f, g, o = (w_ih @ x[t] + w_hh @ h + f["bias"]).chunk(4)
        c = torch.sigmoid(g_f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def test_lstm_sample_draws_and_per_example_factors_equal_hand_loops():
    layer = Rank1LSTM(3, 5, ensemble_size=2)  # 4 * 5 = 20 gate rows
    S, T = 2, 4  # B = 5 sequences of 4 steps
    x = torch.randn(2, B, T, 3)
    values = factors(layer, S, 2, 1)
    with pyro.plate("samples", S, dim=-3):
        out, (h_n, c_n) = run(layer, x, values)
    assert out.shape == (S, 2, B, T, 5) and h_n.shape == c_n.shape == (S, 2, B, 5)
    for i in range(S):
        for k in range(2):
            f = {n: v[i, k, 0] for n, v in values.items()} | {"bias": layer.bias[k]}
            for b in (0, B - 1):
                o, h, c = lstm_by_hand(x[k, b], layer, f, 5)
                torch.testing.assert_close(out[i, k, b], o)
                torch.testing.assert_close(h_n[i, k, b], h)
                torch.testing.assert_close(c_n[i, k, b], c)
    values = factors(layer, S, 2, B)  # per-example factors (S, K, B, n)
    with pyro.plate("samples", S, dim=-3):
        out, (h_n, c_n) = run(layer, x, values)
    for i in range(S):
        for k in range(2):
            for b in range(B):
                f = {n: v[i, k, b] for n, v in values.items()} | {"bias": layer.bias[k]}
                o, h, c = lstm_by_hand(x[k, b], layer, f, 5)
                torch.testing.assert_close(out[i, k, b], o)
                torch.testing.assert_close(c_n[i, k, b], c)


def test_lstm_flat_layout_and_no_bias():
    layer = Rank1LSTM(3, 5, ensemble_size=2, bias=False)
    assert layer.bias is None and "bias=False" in repr(layer)
    values = factors(layer, 2, 1)
    x = torch.randn(2, B, 4, 3)
    out, (h, c) = run(layer, x, values)
    flat_out, (flat_h, flat_c) = run(layer, x.reshape(2 * B, 4, 3), values)
    assert flat_out.shape == (2 * B, 4, 5) and flat_h.shape == flat_c.shape == (2 * B, 5)
    torch.testing.assert_close(flat_out, out.reshape(2 * B, 4, 5))
    torch.testing.assert_close(flat_h, h.reshape(2 * B, 5))
    torch.testing.assert_close(flat_c, c.reshape(2 * B, 5))
    f = {n: v[1, 0] for n, v in values.items()} | {"bias": torch.zeros(20)}
    o, h_ref, c_ref = lstm_by_hand(x[1, 2], layer, f, 5)
    torch.testing.assert_close(out[1, 2], o)


def test_initialisation_and_defaults_follow_the_torch_layers():
    def pair(make_ref, make_rank1):
        torch.manual_seed(3)
        ref = make_ref()
        torch.manual_seed(3)
        return ref, make_rank1()

    for ref, layer in (
        pair(lambda: nn.Linear(4, 6), lambda: Rank1Linear(4, 6, ensemble_size=1)),
        pair(lambda: nn.Linear(1, 3), lambda: Rank1Linear(1, 3, ensemble_size=1)),  # fan_in 1
        pair(lambda: nn.Conv2d(2, 1, (3, 2)), lambda: Rank1Conv2d(2, 1, (3, 2), ensemble_size=1)),
        pair(lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: Rank1Conv2d(4, 6, 3, groups=2, ensemble_size=1)),
    ):
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias[0], ref.bias)
    ref, layer = pair(lambda: nn.LSTM(3, 5, batch_first=True), lambda: Rank1LSTM(3, 5, ensemble_size=1))
    assert torch.equal(layer.weight_ih, ref.weight_ih_l0) and torch.equal(layer.weight_hh, ref.weight_hh_l0)
    bias = layer.bias.detach()
    assert float(bias.abs().max()) <= 1 / 5**0.5 and float(bias.min()) < 0 < float(bias.max())
    # with r = s = 1 and one member, the default convolution is nn.Conv2d's (stride 1, padding 0, dilation 1)
    torch.manual_seed(4)
    ref = nn.Conv2d(2, 3, 3)
    torch.manual_seed(4)
    conv = Rank1Conv2d(2, 3, 3, ensemble_size=1)
    x = torch.randn(1, B, 2, 6, 5)
    ones = {n: torch.ones(1, 1, c) for n, c in conv.factor_sizes.items()}
    torch.testing.assert_close(run(conv, x, ones)[0], ref(x[0]))
    assert (conv.stride, conv.padding, conv.dilation) == (ref.stride, ref.padding, ref.dilation)
    assert Rank1Conv2d(2, 3, 3, padding=1).padding == nn.Conv2d(2, 3, 3, padding=1).padding == (1, 1)
    assert Rank1Linear(2, 3).ensemble_size == Rank1Conv2d(2, 3, 1).ensemble_size == Rank1LSTM(2, 3).ensemble_size == 4
    assert Rank1Layer().ensemble_size == 4 and Rank1Layer().prior.default == Gaussian()
    assert Rank1Conv2d(2, 4, 1, bias=False).bias is None


@pytest.mark.parametrize(
    "make",
    [
        lambda p: Rank1Linear(3, 4, ensemble_size=2, prior=p),
        lambda p: Rank1Conv2d(3, 4, 1, ensemble_size=2, prior=p),
        lambda p: Rank1LSTM(3, 4, ensemble_size=2, prior=p),
    ],
)
def test_the_prior_reaches_every_factor_site(make):
    layer = make(PriorMap(Cauchy(1.0, 0.2), {"s*": Gaussian(1.0, 0.3)}))
    x = torch.randn(2, B, 3) if isinstance(layer, Rank1Linear) else None
    x = torch.randn(2, B, 3, 2, 2) if isinstance(layer, Rank1Conv2d) else x
    x = torch.randn(2, B, 4, 3) if isinstance(layer, Rank1LSTM) else x
    trace = poutine.trace(layer).get_trace(x)
    for name in layer.factor_sizes:
        fn = trace.nodes[name]["fn"].base_dist
        family, scale = (torch.distributions.Normal, 0.3) if name.startswith("s") else (torch.distributions.Cauchy, 0.2)
        assert isinstance(fn, family) and float(fn.scale.max()) == pytest.approx(scale), name


def test_hierarchical_scale_site_and_clipping_at_both_ends():
    layer = Rank1Linear(3, 2, ensemble_size=2, prior=Gaussian(0.5, HalfCauchy(0.3)))
    trace = poutine.trace(layer).get_trace(torch.randn(2, B, 3))
    sigma, r = trace.nodes["r_scale"]["value"], trace.nodes["r"]["value"]
    expected = torch.distributions.Normal(0.5, sigma).log_prob(r).sum(-1)
    torch.testing.assert_close(trace.nodes["r"]["fn"].log_prob(r), expected)
    assert "s_scale" in trace.nodes and [f.name for f in trace.nodes["r"]["cond_indep_stack"]] == ["members"]
    clipped = Rank1Linear(2, 2, ensemble_size=1, bias=False)
    values = {"r": torch.tensor([[[-1e6, 1e6]]]), "s": torch.ones(1, 1, 2)}
    x = torch.ones(1, 1, 2)
    expected = (torch.tensor([-FACTOR_CLIP, FACTOR_CLIP]) * x) @ clipped.weight.T
    torch.testing.assert_close(run(clipped, x, values), expected)


def test_a_layer_inside_a_members_plate_samples_in_that_plate():
    layer = Rank1Linear(4, 2, ensemble_size=3)
    x = torch.randn(B, 4)

    def model(k):
        m = members(k)
        with m:
            return layer(m.tile(x) if k == 3 else x.unsqueeze(0))

    trace = poutine.trace(model).get_trace(3)
    r = trace.nodes["r"]
    assert [(f.name, f.dim, f.size) for f in r["cond_indep_stack"]] == [("members", -2, 3)]
    assert r["value"].shape == (3, 1, 4)
    with pytest.raises(
        ValueError, match=r"^Rank1Linear 'r': ensemble_size=3 but it runs inside a members plate of size 2$"
    ):
        model(2)
    hierarchical = Rank1Linear(4, 2, ensemble_size=3, prior=Gaussian(1.0, HalfCauchy(0.1)))
    message = (
        r"^'r': a hierarchical prior's scale is shared by all members and must be sampled outside the members plate; "
        r"call the network outside `members\(K\)` \(tile the input with members\(K\).tile\) and open the plate only "
        r"around the likelihood$"
    )
    with pytest.raises(ValueError, match=message), members(3) as m:
        hierarchical(m.tile(x))


def test_members_tiles_and_opens_one_plate():
    with pytest.raises(ValueError, match=r"^ensemble_size must be an integer >= 1, got 0$"):
        members(0)
    m = members(3)
    x = torch.randn(B, 4)
    tiled = m.tile(x)
    assert torch.equal(tiled, torch.stack([x, x, x])) and tiled.data_ptr() == x.data_ptr()  # a view
    assert m.tile(torch.arange(4.0)).shape == (3, 4)  # a batch of scalars
    with pytest.raises(ValueError, match=r"^members.tile: expected a batch tensor \(B, ...\), got <class 'list'>$"):
        m.tile([1.0])
    with pytest.raises(ValueError, match=r"^members.tile: expected a batch tensor \(B, ...\), got torch.Size\(\[\]\)$"):
        m.tile(torch.tensor(1.0))

    def model():
        with m:
            pyro.sample("a", dist.Normal(0.0, 1.0))
        with m:  # re-entered: the same plate
            pyro.sample("b", dist.Normal(0.0, 1.0))
        with m, pytest.raises(ValueError, match=r"^members\(K\): already inside a members plate; do not nest them$"):
            with members(3):
                pass

    trace = poutine.trace(model).get_trace()
    for name in ("a", "b"):
        assert [(f.name, f.dim, f.size) for f in trace.nodes[name]["cond_indep_stack"]] == [("members", -2, 3)]
        assert trace.nodes[name]["value"].shape == (3, 1)


def test_member_plate_is_built_once_per_size_outside_any_trace(monkeypatch):
    monkeypatch.setattr(layers_module, "_MEMBER_PLATES", {})  # as in a fresh process
    trace = poutine.trace(lambda: member_plate(7)).get_trace()
    plate = trace.nodes["_RETURN"]["value"]
    assert "members" not in trace.nodes  # its subsample site is not recorded
    assert (plate.name, plate.size, plate.dim) == ("members", 7, -2)
    assert member_plate(7) is plate and member_plate(2) is not plate


def test_factor_sites_of_a_bare_layer_and_their_fields():
    layer = Rank1Linear(2, 3, ensemble_size=2, prior=Gaussian(1.0, HalfCauchy(0.2)))
    sites = factor_sites(layer)
    assert [(s.name, s.layer, s.factor, s.size) for s in sites] == [("r", layer, "r", 2), ("s", layer, "s", 3)]
    assert sites[0].scale_site == "r_scale" and sites[1].prior == Gaussian(1.0, HalfCauchy(0.2))


@pytest.mark.parametrize(
    "make, x, error, match",
    [
        (
            lambda: Rank1Linear(4, 2, ensemble_size=K),
            torch.randn(4),
            ValueError,
            r"^Rank1Linear: expected input of shape \(..., K, B, in_features\) or \(N, in_features\) with "
            r"in_features=4, got \(4,\)$",
        ),
        (
            lambda: Rank1Conv2d(3, 2, 3, ensemble_size=K),
            torch.randn(K, B, 4, 5, 5),
            ValueError,
            r"^Rank1Conv2d: expected input of shape \(..., K, B, C_in, H, W\) or \(N, C_in, H, W\) with C_in=3",
        ),
        (
            lambda: Rank1LSTM(3, 2, ensemble_size=K),
            torch.randn(K, B, 6, 4),
            ValueError,
            r"^Rank1LSTM: expected input of shape \(..., K, B, T, input_size\) or \(N, T, input_size\) with input_size=3",
        ),
        (
            lambda: Rank1Linear(4, 2, ensemble_size=K),
            torch.randn(2, B, 4),
            ValueError,
            r"^Rank1Linear: dim -3 of the input must be the member dim \(size 1 or K=3\), got shape \(2, 5, 4\); "
            r"tile the batch as \(K, B, ...\) first, e.g. with Rank1Model$",
        ),
        (
            lambda: Rank1Conv2d(3, 2, 3, ensemble_size=K),
            torch.randn(2, B, 3, 5, 5),
            ValueError,
            r"^Rank1Conv2d: dim -5 of the input",
        ),
        (
            lambda: Rank1Linear(4, 2, ensemble_size=K),
            torch.ones(K, B, 4, dtype=torch.long),
            TypeError,
            r"^Rank1Linear: expected a floating-point tensor, got torch.int64$",
        ),
        (
            lambda: Rank1Linear(4, 2, ensemble_size=K),
            [[1.0] * 4],
            TypeError,
            r"^Rank1Linear: expected a floating-point tensor, got <class 'list'>$",
        ),
        (
            lambda: Rank1Linear(4, 2, ensemble_size=K),
            torch.randn(16, 4),
            ValueError,
            r"^flat input of 16 rows is not a tiling of the factors' leading dims \(3,\); give the layer a "
            r"\(K, B, ...\) batch: `rank1_pyro.members\(K\).tile\(x\)` \(or use Rank1Model\)$",
        ),
    ],
)
def test_bad_input_messages_name_the_layer_and_the_expected_layout(make, x, error, match):
    with pytest.raises(error, match=match):
        make()(x)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Rank1Linear(0, 2), r"^Rank1Linear: in_features must be an integer >= 1, got 0$"),
        (lambda: Rank1Linear(2, 0), r"^Rank1Linear: out_features must be an integer >= 1, got 0$"),
        (lambda: Rank1Conv2d(0, 2, 1), r"^Rank1Conv2d: in_channels must be an integer >= 1, got 0$"),
        (lambda: Rank1Conv2d(2, 0, 1), r"^Rank1Conv2d: out_channels must be an integer >= 1, got 0$"),
        (lambda: Rank1Conv2d(2, 2, 1, groups=0), r"^Rank1Conv2d: groups must be an integer >= 1, got 0$"),
        (
            lambda: Rank1Conv2d(4, 6, 1, groups=4),
            r"^Rank1Conv2d: in_channels and out_channels must be divisible by groups=4$",
        ),
        (lambda: Rank1Conv2d(6, 4, 1, groups=4), "divisible by groups=4"),
        (lambda: Rank1LSTM(0, 2), r"^Rank1LSTM: input_size must be an integer >= 1, got 0$"),
        (lambda: Rank1LSTM(2, 0), r"^Rank1LSTM: hidden_size must be an integer >= 1, got 0$"),
        (lambda: Rank1Linear(2, 2, ensemble_size=0), r"^ensemble_size must be an integer >= 1, got 0$"),
    ],
)
def test_bad_sizes_name_the_layer_and_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_extra_repr_of_every_layer():
    assert "bias=True" in repr(Rank1Linear(4, 2)) and "bias=False" in repr(Rank1Linear(4, 2, bias=False))
    text = repr(Rank1Conv2d(4, 6, 3, padding=1, groups=2, bias=False, ensemble_size=3))
    assert "4, 6, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2" in text
    assert "ensemble_size=3, bias=False" in text
    assert "3, 5, ensemble_size=2, bias=True" in repr(Rank1LSTM(3, 5, ensemble_size=2))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: Rank1Linear(3, 4, ensemble_size=2), (2, B, 3)),
        (lambda: Rank1Conv2d(3, 4, 3, ensemble_size=2), (2, B, 3, 6, 6)),
        (lambda: Rank1LSTM(3, 4, ensemble_size=2), (2, B, 6, 3)),
    ],
)
def test_factors_are_drawn_on_the_input_device(make, shape):
    # the meta device stands in for an accelerator: a factor drawn on the CPU would not mix with the input
    with torch.device("meta"):
        layer = make()
    with pyro.validation_enabled(False):
        trace = poutine.trace(layer).get_trace(torch.empty(*shape, device="meta"))
    assert all(trace.nodes[n]["value"].device.type == "meta" for n in layer.factor_sizes)
