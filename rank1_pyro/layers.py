r"""Rank-1 Bayesian layers (Dusenberry et al., ICML 2020) as Pyro modules.

Every layer keeps one shared weight ``W`` (a point estimate) and, for ensemble member
``k = 1..K``, perturbs it elementwise by the outer product of two *rank-1 factors*:

.. math::

    W_k = W \circ (s_k r_k^\top), \qquad y_k = \big((x \circ r_k) W^\top\big) \circ s_k + b_k ,

where :math:`r_k` has the input size (input channels for a convolution) and :math:`s_k`
the output size. ``W_k`` is never formed: the layer computes two elementwise products around
one shared matmul / convolution, so its cost is the deterministic layer's on ``K·B`` rows.

``r`` and ``s`` are ordinary Pyro sample sites named ``"<module path>.r"`` / ``".s"``,
drawn inside ``pyro.plate("members", K, dim=-2)``: a factor has shape ``(..., K, 1, size)``
and broadcasts against activations laid out as ``(..., K, B, features)``, where ``...`` is
any number of leading sample dims (vectorized ELBO particles, a Monte Carlo predictive
plate at dim -3). A hierarchical prior adds one global site ``"<path>.r_scale"`` sampled
outside the member plate. Guides and objectives see nothing but these sites, so any guide
(including Pyro's autoguides) and any ELBO apply.

One concept, one module (hence over 400 lines): the rank-1 layers and the members plate they share.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, get_plates
from torch import nn

from ._checks import positive_int
from .priors import FactorPrior, Gaussian, PriorMap

__all__ = [
    "Rank1Layer",
    "Rank1Linear",
    "Rank1Conv2d",
    "Rank1LSTM",
    "FactorSite",
    "factor_sites",
    "rank1_layers",
    "member_plate",
    "members",
    "SplitBatch",
    "split_batch",
    "MEMBER_DIM",
    "MEMBERS",
    "FACTOR_CLIP",
]

#: the plate dim of the ensemble members; the data plate uses dim -1.
MEMBER_DIM = -2
#: the name of the members plate (objectives, guides and diagnostics find member sites by it)
MEMBERS = "members"
#: factors are clipped to [-FACTOR_CLIP, FACTOR_CLIP] before use, as in the reference code,
#: so a heavy-tailed (Cauchy) draw cannot blow up the activations.
FACTOR_CLIP = 10.0


_MEMBER_PLATES: dict[int, pyro.plate] = {}


def member_plate(ensemble_size: int) -> pyro.plate:
    """The ``pyro.plate("members", K, dim=-2)`` shared by every layer, guide and likelihood.

    A plate constructor records a subsample site, so a plate re-created under the same name
    twice in one trace is an error; one reusable plate object per K avoids that, and entering
    it any number of times in a trace is allowed. (:class:`~rank1_pyro.models.Rank1Model`
    opens one fresh "members" plate per call around its likelihood, so the trace records the
    plate once, as autoguides expect.)
    """
    if ensemble_size not in _MEMBER_PLATES:
        with poutine.block():  # built outside any trace: its subsample site must not be recorded
            _MEMBER_PLATES[ensemble_size] = pyro.plate(MEMBERS, ensemble_size, dim=MEMBER_DIM)
    return _MEMBER_PLATES[ensemble_size]


def _active_members():
    """The frame of the ``members`` plate the caller runs in, or ``None``."""
    return next((f for f in get_plates() if f.name == MEMBERS), None)


class members:
    """Write a rank-1 model in plain Pyro: tile inputs over the K members and open the members plate.

    ``m.tile(x)`` views a batch ``(B, ...)`` as ``(K, B, ...)`` (an ``expand``, no copy); the
    rank-1 layers sample their factors in the members plate by themselves. Open ``with m:``
    around the sites that carry one value per member (the observations), so that their batch
    shape has the member dim at -2, as the objectives expect::

        def model(x, y=None):
            m = members(4)
            mean = net(m.tile(x)).squeeze(-1)                       # (K, B)
            with m, pyro.plate("data", N, subsample=torch.arange(len(x)), dim=-1):
                pyro.sample("obs", dist.Normal(mean, 0.1), obs=y)

    The network may also run inside ``with m:`` (layers then use this plate instead of opening
    one), unless a prior is hierarchical: its scale is global and is sampled outside the plate.
    The plate is recorded once per trace, as autoguides expect.
    :class:`~rank1_pyro.models.Rank1Model` is this pattern for a categorical or Normal likelihood.
    """

    def __init__(self, ensemble_size: int):
        self.ensemble_size = positive_int("ensemble_size", ensemble_size)
        self._plate = None

    def tile(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of shape ``(B, ...)`` viewed as ``(K, B, ...)``."""
        if not torch.is_tensor(x) or x.dim() < 1:
            raise ValueError(f"members.tile: expected a batch tensor (B, ...), got {getattr(x, 'shape', type(x))}")
        return x.unsqueeze(0).expand(self.ensemble_size, *x.shape)

    def __enter__(self) -> members:
        if _active_members() is not None:
            raise ValueError("members(K): already inside a members plate; do not nest them")
        if self._plate is None:  # built on first use, inside the caller's trace; re-entered after that
            self._plate = pyro.plate(MEMBERS, self.ensemble_size, dim=MEMBER_DIM)
        self._plate.__enter__()
        return self

    def __exit__(self, *exc):
        return self._plate.__exit__(*exc)


class SplitBatch(Messenger):
    r"""Give each member its own rows of the batch instead of the whole batch (an estimator).

    Under this handler :class:`~rank1_pyro.models.Rank1Model` views a batch ``(B, ...)`` as
    ``(K, m, ...)`` with :math:`m = \lfloor B / K \rfloor` (member k gets rows
    :math:`km, \dots, (k+1)m - 1`; the last ``B mod K`` rows are left out) instead of tiling it to
    ``(K, B, ...)``, so the network runs on about B rows instead of K·B. The data plate then
    scales by N / m, and the averaged log-likelihood

    .. math:: \frac1K \sum_k \frac{N}{m} \sum_{i \in S_k} \log p(y_i \mid x_i, \theta_k)

    is, over a random split of the data, an unbiased estimate of the averaged ELBO's
    :math:`\frac1K \sum_k \sum_n \ell_{nk}`, with more variance than tiling. The mixture
    likelihood needs every member on every example, so only the averaged ELBO accepts it
    (``AveragedELBO(estimator="split")`` applies it to the model).
    """

    def __init__(self):
        super().__init__()
        self.used = False

    def rows(self, x: torch.Tensor, ensemble_size: int) -> torch.Tensor:
        """``x`` of shape ``(B, ...)`` as ``(K, B // K, ...)``: member k's rows (a view, no copy)."""
        m = x.shape[0] // ensemble_size
        if m == 0:
            raise ValueError(
                f"estimator='split' gives each of the K={ensemble_size} members B // K rows of the batch; "
                f"a batch of {x.shape[0]} is too small (use a batch of at least K examples)"
            )
        self.used = True
        return x[: m * ensemble_size].reshape(ensemble_size, m, *x.shape[1:])


def split_batch() -> SplitBatch | None:
    """The innermost active :class:`SplitBatch` handler, or ``None`` (the batch is tiled)."""
    return next((h for h in reversed(_PYRO_STACK) if isinstance(h, SplitBatch)), None)


class Rank1Layer(PyroModule):
    """Base class: holds ``ensemble_size`` and the prior, and samples the factor sites.

    Subclasses declare their factors in ``factor_sizes`` (site suffix -> vector size).
    """

    factor_sizes: dict[str, int]

    def __init__(self, ensemble_size: int = 4, prior: FactorPrior | PriorMap | None = None):
        super().__init__()
        self.ensemble_size = positive_int("ensemble_size", ensemble_size)
        self.prior = PriorMap.coerce(Gaussian() if prior is None else prior)

    def factor_site(self, name: str) -> str:
        """The Pyro site name of factor ``name`` (``"r"``, ``"s"``, ...)."""
        return self._pyro_get_fullname(name)

    def sample_factor(self, name: str, device=None) -> torch.Tensor:
        """Draw factor ``name`` for all K members: shape ``(..., K, 1, size)``."""
        site = self.factor_site(name)
        spec = self.prior.for_site(site)
        active = _active_members()
        if active is not None and active.size != self.ensemble_size:
            raise ValueError(
                f"{type(self).__name__} {site!r}: ensemble_size={self.ensemble_size} but it runs inside a members "
                f"plate of size {active.size}"
            )
        # a hierarchical scale is global: sampled outside the members plate (it cannot leave an open one)
        if spec.hierarchical and active is not None:
            raise ValueError(
                f"{site!r}: a hierarchical prior's scale is shared by all members and must be sampled outside the "
                "members plate; call the network outside `members(K)` (tile the input with members(K).tile) "
                "and open the plate only around the likelihood"
            )
        scale = spec.sample_scale(site + "_scale")
        with contextlib.nullcontext() if active is not None else member_plate(self.ensemble_size):
            value = pyro.sample(site, spec.distribution(self.factor_sizes[name], scale, device))
        return value.clamp(-FACTOR_CLIP, FACTOR_CLIP)

    def _check_input(self, x: torch.Tensor, what: tuple[str, ...], feature: str, features: int) -> None:
        """Check ``x`` is ``(..., K, B, *what)`` or flat ``(N, *what)`` with ``features`` in dim ``feature``."""
        name = type(self).__name__
        feature_dims = len(what)
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        axis = what.index(feature) - feature_dims
        if x.dim() < feature_dims + 1 or x.shape[axis] != features:
            dims = ", ".join(what)
            raise ValueError(
                f"{name}: expected input of shape (..., K, B, {dims}) or (N, {dims}) with "
                f"{feature}={features}, got {tuple(x.shape)}"
            )
        if x.dim() > feature_dims + 1 and x.shape[-feature_dims - 2] not in (1, self.ensemble_size):
            raise ValueError(
                f"{name}: dim -{feature_dims + 2} of the input must be the member dim "
                f"(size 1 or K={self.ensemble_size}), got shape {tuple(x.shape)}; "
                "tile the batch as (K, B, ...) first, e.g. with Rank1Model"
            )

    #: how the factors enter: ``True`` folds them into per-member kernels :math:`W \circ s_k r_k^\top`,
    #: ``False`` scales the activations, ``None`` (default) lets the layer choose (convolutions:
    #: :meth:`Rank1Conv2d._fold`; dense layers scale, folding measured slower there)
    fold: bool | None = None

    @staticmethod
    def _structured(x: torch.Tensor, factor: torch.Tensor, feature_dims: int) -> tuple[torch.Tensor, bool]:
        """View a flat batch ``(N, *features)`` as ``(*sample dims, K, B, *features)``.

        The flat layout (used inside networks written for 4-D images, e.g. torchvision's) folds
        the factor's leading dims (sample dims and K) into the batch, outermost first, as
        :meth:`~rank1_pyro.models.Rank1Model.outputs` tiles it. Structured input passes through.
        """
        if x.dim() > feature_dims + 1:
            return x, False
        lead = factor.shape[:-2]
        n = math.prod(lead)
        if x.shape[0] % n:
            raise ValueError(
                f"flat input of {x.shape[0]} rows is not a tiling of the factors' leading dims {tuple(lead)}; "
                "give the layer a (K, B, ...) batch: `rank1_pyro.members(K).tile(x)` (or use Rank1Model)"
            )
        return x.reshape(*lead, x.shape[0] // n, *x.shape[1:]), True

    @staticmethod
    def _restore(out: torch.Tensor, flat: bool, feature_dims: int) -> torch.Tensor:
        return out.reshape(-1, *out.shape[-feature_dims:]) if flat else out

    def _reset_bias(self, bias: torch.Tensor | None, fan_in: int) -> None:
        if bias is not None and fan_in > 0:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(bias, -bound, bound)


class Rank1Linear(Rank1Layer):
    r"""Rank-1 dense layer: :math:`y_k = ((x \circ r_k) W^\top) \circ s_k + b_k`.

    Args:
        in_features, out_features: as :class:`torch.nn.Linear`.
        ensemble_size: K, the number of members (mixture components).
        bias: learn one bias vector per member, shape ``(K, out_features)``.
        prior: a prior spec (:class:`~rank1_pyro.priors.Gaussian`, ...) or a
            :class:`~rank1_pyro.priors.PriorMap`; the default is N(1, 0.1²).

    Input ``(..., K, B, in_features)`` (member dim may be 1), output ``(..., K, B, out_features)``;
    or the flat layout ``(N, in_features)`` -> ``(N, out_features)`` (see :meth:`Rank1Layer._structured`).
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int = 4, bias: bool = True, prior=None):
        super().__init__(ensemble_size, prior)
        positive_int("in_features", in_features, "Rank1Linear")
        positive_int("out_features", out_features, "Rank1Linear")
        self.in_features, self.out_features = in_features, out_features
        self.factor_sizes = {"r": in_features, "s": out_features}
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # same as nn.Linear
        self._reset_bias(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, ("in_features",), "in_features", self.in_features)
        r, s = self.sample_factor("r", x.device), self.sample_factor("s", x.device)
        x, flat = self._structured(x, r, 1)
        bias = None if self.bias is None else self.bias.unsqueeze(-2)
        # per-member kernels W ∘ (s_k r_kᵀ) only on request: for dense layers the batched matmul was slower on
        # every shape measured (784-512, 400-120, 120-84, 64-128, B = 64-128: 1.16-1.64x the scaled path, CPU)
        if self.fold and r.shape[-2] == 1:
            out = torch.matmul(x, (self.weight * (s.transpose(-1, -2) * r)).transpose(-1, -2))
            out = out if bias is None else out + bias
        else:  # scale the activations
            out = F.linear(x * r, self.weight)
            out = out * s if bias is None else torch.addcmul(bias, out, s)
        return self._restore(out, flat, 1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ensemble_size={self.ensemble_size}, bias={self.bias is not None}, prior={self.prior}"
        )


class Rank1Conv2d(Rank1Layer):
    r"""Rank-1 2-D convolution: r scales the input channels, s the output channels.

    :math:`y_k = \mathrm{conv}(x \circ r_k, W) \circ s_k + b_k`, equal to a convolution with
    kernel :math:`W_k[o, i, :, :] = W[o, i, :, :]\, s_{k,o}\, r_{k,i}` (also for ``groups > 1``).
    Input ``(..., K, B, C_in, H, W)``; all leading dims are flattened into one conv batch and back.
    Arguments as :class:`torch.nn.Conv2d` (``padding_mode="zeros"``) plus ``ensemble_size`` and ``prior``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        ensemble_size: int = 4,
        prior=None,
    ):
        super().__init__(ensemble_size, prior)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            positive_int(name, value, "Rank1Conv2d")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Rank1Conv2d: in_channels and out_channels must be divisible by groups={groups}")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.groups = groups
        self.factor_sizes = {"r": in_channels, "s": out_channels}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(ensemble_size, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # same as nn.Conv2d
        self._reset_bias(self.bias, self.weight[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, ("C_in", "H", "W"), "C_in", self.in_channels)
        r, s = self.sample_factor("r", x.device), self.sample_factor("s", x.device)
        x, flat = self._structured(x, r, 3)
        activations = (
            x.shape[-4] * x.shape[-2] * x.shape[-1] * (x.shape[-3] + self.out_channels)
        )  # B (C_in + C_out) H W
        draws = math.prod(torch.broadcast_shapes(x.shape[:-5], r.shape[:-3])) * r.shape[-3]
        fold = draws <= 64 and self._fold(x, r, activations)  # past 64 small convolutions, overhead wins
        out = self._folded(x, r, s) if fold else self._scaled(x, r, s)
        return self._restore(out, flat, 3)

    def _fold(self, x: torch.Tensor, r: torch.Tensor, activations: int) -> bool:
        """Whether to fold the factors into per-member kernels rather than scale the activations.

        Same result either way (tested in float64). Folding costs one kernel product per member;
        scaling costs passes over the input and output activations and, while training, the
        gradient of the input (to reach r), which a first layer otherwise never computes. So:
        never for per-example factors (no per-member kernel); in training, fold exactly when the
        input needs no gradient (a first layer: one convolution fewer, measured 1.7x faster
        for LeNet-5's first convolution); without gradients, fold when the kernel is smaller than
        one member's input and output activations (``activations``).
        """
        if r.shape[-2] != 1:
            return False
        if self.fold is not None:
            return bool(self.fold)
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.parameters()):
            return not x.requires_grad
        return self.weight.numel() < activations

    def _scaled(self, x, r, s):
        """Scale the feature maps: conv(x ∘ r) ∘ s + b, one convolution over every leading row."""
        x = x * r[..., None, None]
        lead = x.shape[:-3]
        out = F.conv2d(
            x.reshape(-1, *x.shape[-3:]), self.weight, None, self.stride, self.padding, self.dilation, self.groups
        )
        out = out.reshape(*lead, *out.shape[-3:])
        if self.bias is None:
            return out * s[..., None, None]
        return torch.addcmul(self.bias[:, None, :, None, None], out, s[..., None, None])

    def _folded(self, x, r, s):
        r"""Scale the kernel instead: one convolution per draw and member with
        :math:`W_k = W \circ (s_k r_k^\top)` and its bias; no pass over the feature maps but the output's."""
        lead = torch.broadcast_shapes(x.shape[:-5], r.shape[:-3])  # sample dims
        k = r.shape[-3]
        x = x.expand(*lead, *x.shape[-5:]).reshape(-1, *x.shape[-5:])  # (draws, K|1, B, C, H, W)
        r = r.expand(*lead, *r.shape[-3:]).reshape(-1, k, r.shape[-1])  # (draws, K, C_in)
        s = s.expand(*lead, *s.shape[-3:]).reshape(-1, k, s.shape[-1])  # (draws, K, C_out)
        groups_in = self.in_channels // self.groups
        r = r.unflatten(-1, (self.groups, groups_in)).repeat_interleave(self.out_channels // self.groups, dim=-2)
        kernels = self.weight * s[..., None, None, None] * r[..., None, None]  # (draws, K, O, I/g, kh, kw)
        outs = [
            F.conv2d(
                x[d, m if x.shape[1] > 1 else 0],
                kernels[d, m],
                None if self.bias is None else self.bias[m],
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
            )
            for d in range(kernels.shape[0])
            for m in range(k)
        ]
        out = torch.stack(outs)
        return out.reshape(*lead, k, *out.shape[-4:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"ensemble_size={self.ensemble_size}, bias={self.bias is not None}, prior={self.prior}"
        )


class Rank1LSTM(Rank1Layer):
    r"""Single-layer rank-1 LSTM (batch first), as edward2's ``LSTMCellRank1``.

    Both kernels are rank-1 perturbed, with factors ``r_ih, s_ih`` on the input kernel and
    ``r_hh, s_hh`` on the recurrent kernel:

    .. math::

        g_t = ((x_t \circ r^{ih}_k) W_{ih}^\top) \circ s^{ih}_k + ((h_{t-1} \circ r^{hh}_k) W_{hh}^\top) \circ s^{hh}_k + b_k ,

    with the usual gates ``i, f, g, o = split(g_t)``. One draw of the factors per sequence is
    reused at every time step. Input ``(..., K, B, T, input_size)``; returns
    ``(output, (h_n, c_n))`` like :class:`torch.nn.LSTM` with ``batch_first=True``, output
    ``(..., K, B, T, hidden_size)`` and ``h_n, c_n`` of shape ``(..., K, B, hidden_size)``.
    """

    def __init__(self, input_size: int, hidden_size: int, ensemble_size: int = 4, bias: bool = True, prior=None):
        super().__init__(ensemble_size, prior)
        positive_int("input_size", input_size, "Rank1LSTM")
        positive_int("hidden_size", hidden_size, "Rank1LSTM")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.factor_sizes = {"r_ih": input_size, "s_ih": 4 * hidden_size, "r_hh": hidden_size, "s_hh": 4 * hidden_size}
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 4 * hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # same as nn.LSTM
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor):
        self._check_input(x, ("T", "input_size"), "input_size", self.input_size)
        r_ih, s_ih, r_hh, s_hh = (self.sample_factor(n, x.device) for n in ("r_ih", "s_ih", "r_hh", "s_hh"))
        x, flat = self._structured(x, r_ih, 2)
        # input projection for all steps at once; factors gain a time dim: (..., K, 1|B, 1, n)
        gates_x = F.linear(x * r_ih.unsqueeze(-2), self.weight_ih) * s_ih.unsqueeze(-2)
        if self.bias is not None:
            gates_x = gates_x + self.bias[:, None, None, :]
        h = gates_x.new_zeros(gates_x.shape[:-2] + (self.hidden_size,))
        c = torch.zeros_like(h)
        outputs = []
        for t in range(gates_x.shape[-2]):
            gates = gates_x[..., t, :] + F.linear(h * r_hh, self.weight_hh) * s_hh
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return self._restore(torch.stack(outputs, dim=-2), flat, 2), (
            self._restore(h, flat, 1),
            self._restore(c, flat, 1),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, ensemble_size={self.ensemble_size}, "
            f"bias={self.bias is not None}, prior={self.prior}"
        )


def rank1_layers(module: nn.Module):
    """Yield ``(name, layer)`` for every :class:`Rank1Layer` inside ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, Rank1Layer):
            yield name, m


@dataclass(frozen=True)
class FactorSite:
    """One rank-1 factor sample site of a model: its Pyro name, layer, and vector size."""

    name: str
    layer: Rank1Layer
    factor: str
    size: int

    @property
    def prior(self) -> FactorPrior:
        return self.layer.prior.for_site(self.name)

    @property
    def scale_site(self) -> str:
        """Name of the hierarchical scale site (only sampled when ``prior.hierarchical``)."""
        return self.name + "_scale"


def factor_sites(module: nn.Module) -> list[FactorSite]:
    """All rank-1 factor sites of ``module`` in execution-independent (module) order.

    Site names follow module paths, e.g. ``"net.0.r"``; they equal the names the layers give
    their ``pyro.sample`` statements when every container is a PyroModule (as
    :class:`~rank1_pyro.models.Rank1Model` ensures).
    """
    return [
        FactorSite(f"{path}.{f}" if path else f, layer, f, size)
        for path, layer in rank1_layers(module)
        for f, size in layer.factor_sizes.items()
    ]
