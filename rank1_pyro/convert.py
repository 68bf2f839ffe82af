r"""``rank1ize``: turn any torch network into a rank-1 Bayesian model.

:func:`rank1ize` deep-copies a network (a torchvision model, your own ``nn.Module``) and swaps
its weight layers for their rank-1 counterparts, keeping the pretrained weights as the shared
point estimate :math:`W`:

================================================  =========================================
torch layer                                       becomes
================================================  =========================================
``nn.Linear``                                     :class:`Rank1LinearDropIn` (a
                                                  :class:`~rank1_pyro.layers.Rank1Linear`)
``nn.Conv2d`` (``padding_mode="zeros"``)          :class:`~rank1_pyro.layers.Rank1Conv2d`
``nn.LSTM`` (one layer, batch first,              :class:`Rank1LSTMDropIn` (a
unidirectional, no projection)                    :class:`~rank1_pyro.layers.Rank1LSTM`)
``nn.BatchNorm*d``                                unchanged (``batchnorm="shared"``) or
                                                  :class:`MemberBatchNorm` (``"per_member"``)
================================================  =========================================

A bias :math:`b` is copied into every member's row of the per-member bias ``(K, out)``
(an LSTM's ``bias_ih_l0 + bias_hh_l0``), so with all factors at 1 member k computes exactly
the original network: :math:`((x \circ 1) W^\top) \circ 1 + b`.

The result is ``Rank1Model(net, K, flat_batch=True)``: the network receives its usual
``(N, ...)`` input with the members (and any sample plates) folded into the batch, so
forwards written for a fixed input rank (``torch.flatten(x, 1)``, ``BatchNorm2d``, pooling)
run unchanged.

Selection. ``include`` / ``exclude`` are shell-style (``fnmatch``) patterns over module paths
as :meth:`torch.nn.Module.named_modules` names them (``"layer1.0.conv1"``, ``"fc"``); a pattern
that matches a module also covers everything inside it, so ``exclude=["layer4"]`` keeps that
whole stage deterministic. A pattern that matches no module raises (a typo would silently do
nothing). Selected torch layers with weights but no rank-1 counterpart (``Conv1d``,
``Embedding``, ``MultiheadAttention``, a multi-layer ``LSTM``, ...) and raw parameters a custom
module holds itself (named ``<module path>.<parameter>``, e.g. a learned class token) raise one
:class:`ValueError` that lists every offending path and why; exclude them (by that path) to
keep them deterministic. Normalisation layers
(BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm) and ``PReLU`` are deterministic by
design and never raise.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ._checks import positive_int
from .layers import Rank1Conv2d, Rank1Layer, Rank1Linear, Rank1LSTM
from .models.base import Rank1Model, _sample_plate_shape, set_prior

__all__ = ["rank1ize", "conversion_plan", "Rank1LinearDropIn", "Rank1LSTMDropIn", "MemberBatchNorm", "BATCHNORM_MODES"]

BATCHNORM_MODES = ("shared", "per_member")

#: layers with parameters that stay deterministic by design (never reported as unsupported)
_DETERMINISTIC = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.PReLU,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


# --------------------------------------------------------------------------------------
# Drop-in modules
# --------------------------------------------------------------------------------------
class Rank1LinearDropIn(Rank1Linear):
    """A :class:`~rank1_pyro.layers.Rank1Linear` that, like :class:`torch.nn.Linear`, takes ``(N, *, in)``.

    In the flat layout row n of the batch belongs to one member; extra middle dims (sequence
    positions, tokens) are folded into the rows, ``(N, M, in) -> (N·M, in)``, which keeps the
    rows ordered ``(S, K, B·M)`` outermost first, so every position of a row gets its member's
    factors. Only for networks run with ``flat_batch=True`` (what :func:`rank1ize` builds), and
    with one factor draw per member (the per-example estimator draws ``(K, B)`` factors, which
    do not broadcast over ``B·M`` rows; 2-D inputs work with either estimator).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return super().forward(x)
        out = super().forward(x.reshape(-1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class Rank1LSTMDropIn(Rank1LSTM):
    """A :class:`~rank1_pyro.layers.Rank1LSTM` with :class:`torch.nn.LSTM`'s return shapes.

    ``nn.LSTM(batch_first=True)`` returns ``(output, (h_n, c_n))`` with ``h_n, c_n`` of shape
    ``(num_layers, N, H) = (1, N, H)``; :class:`Rank1LSTM` returns ``(N, H)``. This subclass
    adds the leading layer dim (in front of the batch dims), so code such as
    ``_, (h, _) = self.lstm(x); self.head(h[-1])`` runs unchanged. An initial state ``hx`` is
    not supported (the rank-1 LSTM starts from zeros); packed sequences neither.
    """

    def forward(self, x: torch.Tensor, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError("Rank1LSTMDropIn: PackedSequence input is not supported; pad the sequences")
        if hx is not None:
            raise ValueError("Rank1LSTMDropIn: an initial state hx is not supported (the state starts at zero)")
        output, (h, c) = super().forward(x)
        return output, (h.unsqueeze(-3), c.unsqueeze(-3))


class MemberBatchNorm(nn.Module):
    r"""One copy of a BatchNorm layer per ensemble member (``batchnorm="per_member"``).

    In the flat layout the rows of a batch are ordered ``(S, K, B)``, outermost first (S any
    sample plates, see :meth:`~rank1_pyro.models.Rank1Model.outputs`); member k's rows
    :math:`x_{s,k,b}` are normalised by copy k alone, with its own batch statistics in
    training and its own running statistics in evaluation:

    .. math:: y_{s,k,b} = \gamma_k \frac{x_{s,k,b} - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}} + \beta_k .

    Args:
        bn: the BatchNorm layer to copy (its affine parameters and running statistics are
            copied into every member).
        ensemble_size: K.
    """

    def __init__(self, bn: _BatchNorm, ensemble_size: int):
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"MemberBatchNorm: expected a BatchNorm layer, got {type(bn).__name__}")
        self.ensemble_size = positive_int("ensemble_size", ensemble_size)
        self.members = nn.ModuleList(copy.deepcopy(bn) for _ in range(ensemble_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = math.prod(_sample_plate_shape()) * self.ensemble_size
        if x.dim() < 2 or x.shape[0] % lead:
            raise ValueError(
                f"MemberBatchNorm: expected a flat batch (N, C, ...) with N a multiple of "
                f"{lead} (samples x K members), got shape {tuple(x.shape)}"
            )
        rows = x.reshape(-1, self.ensemble_size, x.shape[0] // lead, *x.shape[1:])  # (S, K, B, ...)
        out = [
            bn(rows[:, k].reshape(-1, *x.shape[1:])).reshape(rows.shape[0], -1, *x.shape[1:])
            for k, bn in enumerate(self.members)
        ]
        return torch.stack(out, dim=1).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"ensemble_size={self.ensemble_size}"


# --------------------------------------------------------------------------------------
# Planning: which module becomes what
# --------------------------------------------------------------------------------------
def _patterns(name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a name pattern (str) or a list of them, got {value!r}")
    return tuple(value)


def _covered(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` or one of its ancestors matches one of ``patterns``."""
    parts = path.split(".") if path else []
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] or [""]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def _overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def _lstm_problems(m: nn.LSTM) -> list[str]:
    problems = []
    if not m.batch_first:
        problems.append("batch_first=False")
    if m.num_layers != 1:
        problems.append(f"num_layers={m.num_layers}")
    if m.bidirectional:
        problems.append("bidirectional=True")
    if m.proj_size:
        problems.append(f"proj_size={m.proj_size}")
    return problems


def _classify(module: nn.Module) -> tuple[str, str]:
    """``(kind, reason)``: "linear", "conv2d", "lstm", "batchnorm", "unsupported", "raw" or "other".

    "unsupported": a torch layer with weights and no rank-1 counterpart (reported whole, its
    inside not visited). "raw": a user module with parameters of its own (each reported as
    ``<path>.<name>``; its submodules are visited as usual).
    """
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "unsupported", "uninitialized lazy module (run one forward pass first)"
    if isinstance(module, nn.Linear) and not _overrides_forward(module, nn.Linear):
        return "linear", ""
    if isinstance(module, nn.Conv2d) and not _overrides_forward(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return "unsupported", f"padding_mode={module.padding_mode!r} (only 'zeros' has a rank-1 counterpart)"
        return "conv2d", ""
    if isinstance(module, nn.LSTM) and not _overrides_forward(module, nn.LSTM):
        problems = _lstm_problems(module)
        if problems:
            return "unsupported", ", ".join(problems) + " (Rank1LSTM: one layer, batch_first=True, unidirectional)"
        return "lstm", ""
    if isinstance(module, _BatchNorm):
        return "batchnorm", ""
    if isinstance(module, (Rank1Layer, *_DETERMINISTIC)) or not _own_parameters(module):  # rank-1 already, or kept
        return "other", ""
    if type(module).__module__.startswith("torch."):
        return "unsupported", "no rank-1 counterpart"
    return "raw", ""  # a user module holding raw parameters next to its submodules


def _own_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in module._parameters.items() if p is not None]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def conversion_plan(module: nn.Module, include=None, exclude=None, batchnorm: str = "shared") -> dict[str, str]:
    """What :func:`rank1ize` would do to ``module``: ``{path: "linear" | "conv2d" | "lstm" | "batchnorm"}``.

    Only modules that change are listed (``"batchnorm"`` only with ``batchnorm="per_member"``).
    Raises :class:`ValueError` for a pattern that matches nothing and, listing all of them, for
    selected modules without a rank-1 counterpart. Arguments as :func:`rank1ize`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm: unknown mode {batchnorm!r}; valid: {list(BATCHNORM_MODES)}")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    paths = [path for path, _ in module.named_modules()]
    paths += [
        _join(path, p) for path, m in module.named_modules() if _classify(m)[0] == "raw" for p in _own_parameters(m)
    ]
    for name, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                shown = ", ".join(paths[1:31]) + (f", ... ({len(paths) - 31} more)" if len(paths) > 31 else "")
                raise ValueError(f"{name} pattern {pattern!r} matches no module; module paths are: {shown or '<root>'}")

    def selected(path: str) -> bool:
        return (include is None or _covered(path, include)) and not (exclude and _covered(path, exclude))

    plan: dict[str, str] = {}
    problems: list[str] = []
    done: list[str] = []  # converted or offending modules: their insides are not visited
    for path, m in module.named_modules():
        if any(path.startswith(d + ".") or d == "" for d in done) or not selected(path):
            continue
        kind, reason = _classify(m)
        if kind == "raw":
            problems += [
                f"{_join(path, p)} (a parameter of {type(m).__name__}: no rank-1 counterpart)"
                for p in _own_parameters(m)
                if selected(_join(path, p))
            ]
        elif kind == "unsupported":
            problems.append(f"{path or '<root>'} ({type(m).__name__}: {reason})")
            done.append(path)
        elif kind in ("linear", "conv2d", "lstm"):
            plan[path] = kind
            done.append(path)
        elif kind == "batchnorm" and batchnorm == "per_member":
            plan[path] = kind
            done.append(path)
    if problems:
        raise ValueError(
            f"rank1ize: {len(problems)} layer(s) or parameter(s) have no rank-1 counterpart: "
            + "; ".join(problems)
            + ". Keep them deterministic with exclude=[...] (or convert them yourself)."
        )
    return plan


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------
def _empty(cls, *args, like: torch.Tensor, **kwargs) -> Rank1Layer:
    """Build a rank-1 layer without initialising it (its weights are copied right after)."""
    with torch.device("meta"):
        layer = cls(*args, **kwargs)
    return layer.to_empty(device=like.device).to(dtype=like.dtype)


@torch.no_grad()
def _copy(dst: nn.Parameter | None, *srcs: torch.Tensor) -> None:
    """``dst ← sum(srcs)`` broadcast to its shape; ``dst`` is trainable when any source is."""
    if dst is None:
        return
    dst.copy_(sum(srcs).expand_as(dst))
    dst.requires_grad_(any(src.requires_grad for src in srcs))


def _convert(m: nn.Module, kind: str, ensemble_size: int, prior) -> nn.Module:
    k = ensemble_size
    if kind == "linear":
        new = _empty(Rank1LinearDropIn, m.in_features, m.out_features, k, m.bias is not None, prior, like=m.weight)
        _copy(new.weight, m.weight)
        _copy(new.bias, m.bias)
    elif kind == "conv2d":
        new = _empty(
            Rank1Conv2d,
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            m.bias is not None,
            k,
            prior,
            like=m.weight,
        )
        _copy(new.weight, m.weight)
        _copy(new.bias, m.bias)
    elif kind == "lstm":
        new = _empty(Rank1LSTMDropIn, m.input_size, m.hidden_size, k, m.bias, prior, like=m.weight_ih_l0)
        _copy(new.weight_ih, m.weight_ih_l0)
        _copy(new.weight_hh, m.weight_hh_l0)
        if m.bias:
            _copy(new.bias, m.bias_ih_l0, m.bias_hh_l0)
    else:  # batchnorm
        new = MemberBatchNorm(m, k)
    new.train(m.training)
    return new


def _replace(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if not path:
        return new
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path), name, new)
    return root


def rank1ize(
    module: nn.Module,
    ensemble_size: int = 4,
    prior=None,
    include=None,
    exclude=None,
    batchnorm: str = "shared",
    likelihood: str = "categorical",
    num_data: int | None = None,
) -> Rank1Model:
    r"""A rank-1 Bayesian model from any torch network (see the module docstring).

    Args:
        module: the network, e.g. ``torchvision.models.resnet50(weights=...)``; it is deep-copied
            and never modified.
        ensemble_size: K, the number of members (mixture components).
        prior: a prior spec or :class:`~rank1_pyro.priors.PriorMap` for every factor (default
            N(1, 0.1²)); override patterns are checked against the model's site names
            (``"net.<module path>.r"``).
        include: name pattern(s) of the modules to convert (default: all).
        exclude: name pattern(s) of modules to leave deterministic.
        batchnorm: ``"shared"`` (one BatchNorm over all K·B rows, the reference) or
            ``"per_member"`` (:class:`MemberBatchNorm`).
        likelihood, num_data: as :class:`~rank1_pyro.models.Rank1Model`.

    Returns:
        ``Rank1Model(net, ensemble_size, likelihood, num_data, flat_batch=True)``.
    """
    ensemble_size = positive_int("ensemble_size", ensemble_size)
    plan = conversion_plan(module, include, exclude, batchnorm)
    if not any(kind != "batchnorm" for kind in plan.values()):
        raise ValueError(
            f"rank1ize: no Linear, Conv2d or LSTM layer selected in {type(module).__name__}; check include/exclude"
        )
    net = copy.deepcopy(module)
    for path, kind in plan.items():
        net = _replace(net, path, _convert(net.get_submodule(path), kind, ensemble_size, prior))
    model = Rank1Model(net, ensemble_size, likelihood=likelihood, num_data=num_data, flat_batch=True)
    if prior is not None:
        set_prior(model, prior)  # checks PriorMap override patterns against the full site names
    return model
