"""The two ways a rank-1 layer applies its factors give the same outputs and gradients (float64):
scaling the activations, and folding the factors into per-member kernels W o (s_k r_k^T)."""

import pyro
import pytest
import torch

from rank1_pyro import Rank1Conv2d, Rank1Linear, members


def _run(layer, x, fold, sample_plate):
    layer.fold = fold
    layer.zero_grad()
    pyro.set_rng_seed(0)
    if sample_plate:
        with pyro.plate("samples", 3, dim=-3):
            out = layer(x)
    else:
        out = layer(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in layer.parameters()]


LAYERS = {
    "dense": (lambda: Rank1Linear(5, 4, ensemble_size=3), (5,)),
    "conv": (lambda: Rank1Conv2d(4, 6, 3, padding=1, ensemble_size=3), (4, 6, 6)),
    "conv-grouped-strided": (lambda: Rank1Conv2d(4, 6, 3, stride=2, groups=2, ensemble_size=3), (4, 7, 7)),
}


@pytest.mark.parametrize("sample_plate", [False, True])
@pytest.mark.parametrize("name", list(LAYERS))
def test_folded_and_scaled_paths_agree(name, sample_plate):
    torch.set_default_dtype(torch.float64)
    build, shape = LAYERS[name]
    layer = build()
    x = members(3).tile(torch.randn(5, *shape))
    scaled, scaled_grads = _run(layer, x, False, sample_plate)
    folded, folded_grads = _run(layer, x, True, sample_plate)
    torch.testing.assert_close(folded, scaled, rtol=1e-12, atol=1e-12)
    for a, b in zip(folded_grads, scaled_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_cost_model_folds_a_first_layer_in_training_only():
    layer = Rank1Conv2d(5, 4, 1, ensemble_size=3)  # a kernel of 20 entries
    x = members(3).tile(torch.randn(5, 5, 1, 1))
    r = torch.ones(3, 1, 5)
    assert layer._fold(x, r, 10**9)  # the input needs no gradient: folding saves the input-gradient matmul
    assert not layer._fold(x.requires_grad_(), r, 10**9)  # a hidden layer: the gradient is needed anyway
    assert not layer._fold(x, torch.ones(3, 5, 5), 10**9)  # per-example factors have no per-member kernel
    with torch.no_grad():
        assert layer._fold(x, r, 21) and not layer._fold(x, r, 20)  # 20 kernel entries against the activations
