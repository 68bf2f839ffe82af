"""Rank-1 layers equal a dense computation with an explicit W ∘ (s rᵀ) per member."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rank1_pyro import Gaussian, Rank1Conv2d, Rank1Linear, Rank1LSTM
from rank1_pyro.layers import FACTOR_CLIP, factor_sites

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
    net = pyro.nn.PyroModule[nn.Sequential](Rank1Linear(2, 3, ensemble_size=2), nn.ReLU(), Rank1Linear(3, 1, ensemble_size=2))
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
