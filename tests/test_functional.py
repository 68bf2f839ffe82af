"""FlatFunctional: Jacobian products against a dense Jacobian; the rank-1 point network."""

import pyro
import pytest
import torch
from torch import nn

from rank1_pyro import DeltaGuide, rank1_mlp
from rank1_pyro.laplace import FlatFunctional, rank1_point_network


@pytest.fixture
def net():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def test_jvp_vjp_match_dense_jacobian(net):
    f = FlatFunctional(net)
    x = torch.randn(4, 3)
    J = f.jacobian(x).reshape(8, -1)
    assert J.shape == (8, f.num_params) and f.num_params == sum(p.numel() for p in net.parameters())
    v, u = torch.randn(f.num_params), torch.randn(4, 2)
    out, jv = f.jvp(x, v)
    torch.testing.assert_close(out, net(x))
    torch.testing.assert_close(jv.reshape(-1), J @ v)
    torch.testing.assert_close(f.vjp(x, u), J.T @ u.reshape(-1))


def test_restrict_gives_the_jacobian_columns(net):
    f = FlatFunctional(net)
    idx = torch.tensor([0, 7, 20, 31])
    sub = f.restrict(idx)
    x = torch.randn(4, 3)
    torch.testing.assert_close(sub.jacobian(x), f.jacobian(x)[..., idx])
    torch.testing.assert_close(sub(sub.theta_map, x), net(x))


def test_param_names_and_errors(net):
    f = FlatFunctional(net, ["2.weight"])
    assert f.num_params == 10
    with pytest.raises(ValueError, match="unknown parameters"):
        FlatFunctional(net, ["nope"])
    with pytest.raises(ValueError, match="indices must lie"):
        f.restrict(torch.tensor([10]))
    with pytest.raises(ValueError, match="distinct"):
        f.restrict(torch.tensor([1, 1]))


def test_rank1_point_network_equals_model_at_factor_means():
    model = rank1_mlp(3, [6], 2, ensemble_size=3)
    guide = DeltaGuide(model, init_loc_std=0.3)
    net = rank1_point_network(model, guide)
    x = torch.randn(5, 3)
    tr = pyro.poutine.trace(guide).get_trace(x)
    expected = pyro.poutine.replay(model.outputs, trace=tr)(x)  # (K, B, C)
    torch.testing.assert_close(net(x), expected.reshape(-1, 2))
    names = dict(net.named_parameters())
    assert "factors.net__0__r" in names and "model.net.0.weight" in names
    f = FlatFunctional(net, [n for n in names if n.startswith("factors.")])
    assert f.num_params == 3 * (3 + 6 + 6 + 2)
    _, jv = f.jvp(x, torch.randn(f.num_params))
    assert jv.shape == (15, 2)
