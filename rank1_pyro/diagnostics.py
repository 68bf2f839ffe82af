r"""ArviZ DataTrees of the library's posteriors: Monte Carlo draws evaluated by Pyro, the data of every diagnostic.

This module holds one concept, turning a model and its posterior into draws and their log densities;
what is computed *from* a tree lives in :mod:`rank1_pyro.diagnostics_stats` (see below).

**DataTree** (ArviZ ≥ 1.0). :func:`to_datatree` draws S Monte Carlo samples of every latent site
and evaluates the model on a data set with the *same* draws, giving the groups

* ``posterior``: one variable per latent site, named by its Pyro site (``"net.0.r"``, and
  ``"net.0.r_scale"`` for a hierarchical prior), dims ``(chain, draw, "<site>_dim")``.
  **chain = mixture component k** (= ensemble member k), **draw = Monte Carlo sample s** from
  that component. A hierarchical scale is one global site shared by all components: its draw
  s is repeated across the chains (attribute ``shared_by_components = 1``);
* ``posterior_predictive``: ``obs`` drawn from :math:`p(y_n \mid x_n, \theta_{ks})`, dims
  ``(chain, draw, obs_id)``;
* ``log_likelihood``: :math:`\log p(y_n \mid x_n, \theta_{ks})` per observation (for PSIS-LOO);
* ``observed_data``: the labels ``obs`` (``obs_id``);
* ``sample_stats`` (when the guide has a density): ``lp`` :math:`= \log p(\theta_{ks}, D)`, the
  joint log density of the draw and the data in ``observed_data``, and ``log_q``
  :math:`= \log q(\theta_{ks})`, the log density of the whole variational posterior at the draw.

Draws come from running the guide under ``pyro.plate("samples", S, dim=-3)``: a factor site then
has shape ``(S, K, 1, size)``, which becomes ``(chain=K, draw=S, size)``. The model is evaluated
conditioned on those draws (``poutine.condition``) in eval mode over minibatches of the data, with
``num_data=None``, so its observation sites give unscaled per-example log-likelihoods and its latent
sites the log prior. Any Pyro model and guide that follow the library's plate layout (latents in
``pyro.plate("members", K, dim=-2)`` or outside every plate, observations in a data plate at
dim -1) are accepted, so the same code serves a :class:`~rank1_pyro.models.Rank1Model` and a
hand-written conjugate model. Other posteriors (Laplace, projected) enter through the
:class:`~rank1_pyro.inference.predictive.Posterior` protocol: they fill the predictive groups from
``sample_predictions`` (chain = their K, usually 1) and, optionally, ``posterior`` from a dict
of parameter draws.

**The mixture density.** The rank-1 posterior is the equal-weight mixture
:math:`q(\theta) = \frac1K \sum_j q_j(\theta)` (global scales :math:`\sigma` have one shared factor
:math:`q(\sigma)`), so for a draw :math:`\theta_{ks}` from component k

.. math:: \log q(\theta_{ks}) = \log q(\sigma_s)
          + \operatorname{logsumexp}_j \log q_j(\theta_{ks}) - \log K ,

evaluated with the guide's own site distributions (each component j at every component's draw).
For a draw from member k, :math:`p(D \mid \theta)` uses member k's point estimates (W is shared;
the per-member bias :math:`b_k` is not); with shared point estimates this is exactly the marginal
posterior over one member's factors.

**Reading the tree** (summaries, VI k-hat, PSIS-LOO, and the meaning of R-hat across components)
is :mod:`rank1_pyro.diagnostics_stats`, which needs no Pyro; its public names are re-exported here.
The figures are :mod:`rank1_pyro.plots`, and the report that writes them all is the
``rank1-pyro diagnose`` command (:mod:`rank1_pyro.commands.diagnose`).

One concept, one module (hence over 400 lines): the ArviZ DataTree of a posterior: draws evaluated by Pyro, their log densities, and netCDF round trips.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import xarray as xr
from pyro.poutine.util import site_is_subsample

from ._checks import positive_int
from .diagnostics_stats import (
    KHAT_GOOD,
    KHAT_USABLE,
    MIN_PARETO_DRAWS,
    khat_label,
    khat_verdict,
    loo,
    site_summary,
    summary,
    vi_khat,
)
from .inference.joint import joint_latents
from .inference.objectives import is_point_mass
from .inference.predictive import SAMPLE_DIM, Posterior, Rank1Posterior, _device_of, _module_mode, predict
from .layers import MEMBER_DIM, MEMBERS

__all__ = [
    "to_datatree",
    "to_netcdf",
    "from_netcdf",
    "log_density_ratios",
    # re-exported from diagnostics_stats
    "summary",
    "site_summary",
    "vi_khat",
    "khat_label",
    "khat_verdict",
    "loo",
    "KHAT_GOOD",
    "KHAT_USABLE",
    "MIN_PARETO_DRAWS",
]

_CHAIN_DOC = "mixture component k (ensemble member k)"
_DRAW_DOC = "Monte Carlo sample s from the component"


# ----------------------------------------------------------------------------- input checks


def _check_data(data) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)):
        raise TypeError(f"data must be a pair of tensors (x, y), got {type(data).__name__}")
    x, y = data
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"data: x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"data: y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    return x, y


@contextlib.contextmanager
def _evaluation(model, guide):
    """Eval mode, no gradients, and ``num_data=None`` (unscaled log-likelihoods); all restored."""
    num_data = getattr(model, "num_data", None)
    if num_data is not None:
        model.num_data = None
    try:
        with _module_mode((model, guide), training=False), torch.no_grad():
            yield
    finally:
        if num_data is not None:
            model.num_data = num_data


# ----------------------------------------------------------------------------- Pyro evaluation


def _sample_sites(trace):
    return [
        (name, site) for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
    ]


def _member_size(site) -> int | None:
    for frame in site["cond_indep_stack"]:
        if frame.name == MEMBERS:
            return frame.size
    return None


def _per_draw(log_prob: torch.Tensor, num_samples: int, num_components: int, name: str) -> torch.Tensor:
    """Reduce a site's log-density, batch ``(S|1, K|1, B|1)``, to one value per draw ``(S, K)``."""
    if log_prob.dim() > 3:
        raise ValueError(
            f"site {name!r}: batch shape {tuple(log_prob.shape)} has more dims than (samples, members, data)"
        )
    log_prob = log_prob.reshape((1,) * (3 - log_prob.dim()) + tuple(log_prob.shape))
    return log_prob.expand(num_samples, num_components, log_prob.shape[-1]).sum(-1)


@dataclass
class _Evaluation:
    """One set of S·K draws and everything computed from them (tensors on the CPU)."""

    latents: dict  # site -> (value (S, ...), event_dim, is member site)
    num_samples: int
    num_components: int
    log_likelihood: dict  # observation site -> (S, K, N)
    predictive: dict  # observation site -> (S, K, N) draws
    log_prior: torch.Tensor  # (S, K): the latent sites' log density under the model
    log_q: torch.Tensor | None  # (S, K): log of the variational (mixture) density, None for point masses


def _log_mixture_density(sites, num_samples: int, num_components: int, device, joints=None) -> torch.Tensor | None:
    """:math:`\\log q(\\theta_{ks})`, with the member sites' density the equal-weight mixture over components.

    Any guide with a density: its auxiliary sites (autoguides' unconstrained draws) carry the
    density, and its ``Delta`` sites the log-Jacobian of the map to the model's sites. A joint
    latent (``AutoContinuous``) scores member k's coordinates, with the global ones, under each
    component j's marginal (:mod:`~rank1_pyro.inference.joint`). Only a guide of point masses
    without auxiliary sites (``DeltaGuide``, ``AutoDelta``) has no density: ``None``.
    """
    S, K = num_samples, num_components
    joints = joints or {}
    has_auxiliary = any(site["infer"].get("is_auxiliary") for _, site in sites)
    shared = torch.zeros(S, K, dtype=torch.float64, device=device)
    components = torch.zeros(K, S, K, dtype=torch.float64, device=device)  # [j, s, k] = log q_j(theta_ks), member sites
    for name, site in sites:
        fn, value = site["fn"], site["value"]
        joint = joints.get(name)
        if joint is not None and joint.num_members is not None:
            if joint.num_members != K:
                raise ValueError(f"guide site {name!r} holds {joint.num_members} members, the model {K}")
            u = value.reshape(S, value.shape[-1])
            dens = torch.stack(
                [joint.member_log_density(u, c).double() for c in range(K)]
            )  # [c, s, k]: log q_c(theta_k)
            # in the member sites' order below: [j, s, k] = log q_{(k+j) mod K}(theta_k)
            order = (torch.arange(K, device=dens.device).unsqueeze(-1) + torch.arange(K, device=dens.device)) % K
            components += dens.gather(0, order.unsqueeze(1).expand(K, S, K))
            continue
        if is_point_mass(fn):
            if not has_auxiliary:
                return None
            shared += _per_draw(fn.log_prob(value).double(), S, K, name)  # the transform's log-Jacobian
            continue
        if _member_size(site) is None:
            shared += _per_draw(fn.log_prob(value).double(), S, K, name)
            continue
        value_dim = MEMBER_DIM - fn.event_dim  # the member dim counted in the value's dims
        for j in range(K):
            # rolled[k] = theta_{k-j}, scored by component k; rolling back puts log q_{d+j}(theta_d) at d
            lp = fn.log_prob(value.roll(j, dims=value_dim)).roll(-j, dims=MEMBER_DIM)
            components[j] += _per_draw(lp.double(), S, K, name)
    return shared + torch.logsumexp(components, dim=0) - math.log(K)


def _evaluate(model, guide, x, y, num_samples: int, batch_size: int, log_density: bool) -> _Evaluation:
    """Draw S samples from ``guide`` and evaluate ``model`` on ``(x, y)`` in minibatches with them."""
    device = _device_of(model, guide)
    S = num_samples
    with _evaluation(model, guide):
        first = (x[:batch_size].to(device), y[:batch_size].to(device))
        with pyro.plate("samples", S, dim=SAMPLE_DIM):
            guide_trace = poutine.trace(guide).get_trace(*first)
        guide_sites = [(n, s) for n, s in _sample_sites(guide_trace) if not s["is_observed"]]
        values = {name: site["value"] for name, site in guide_sites}
        loglik, predictive, log_prior, K, model_latents = {}, {}, None, 1, None
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
            with pyro.plate("samples", S, dim=SAMPLE_DIM):
                trace = poutine.trace(poutine.condition(model, data=values)).get_trace(xb, yb)
            sites = _sample_sites(trace)
            if log_prior is None:  # first batch: the number of components and the log prior
                K = max([_member_size(site) or 1 for _, site in sites] + [1])
                log_prior = torch.zeros(S, K, dtype=torch.float64, device=device)
                for name, site in sites:
                    if name in values:
                        log_prior += _per_draw(site["fn"].log_prob(site["value"]).double(), S, K, name)
            for name, site in sites:
                if site["is_observed"] and name not in values:
                    fn, shape = site["fn"], (S, K, xb.shape[0])
                    loglik.setdefault(name, []).append(fn.log_prob(site["value"]).expand(shape).double().cpu())
                    predictive.setdefault(name, []).append(fn.sample().expand(shape).cpu())
            if model_latents is None:  # the model's own latent sites: what the posterior group exports
                model_latents = {name for name, site in sites if name in values}
        if not loglik:
            raise ValueError("the model has no observed sites: it must observe y when called as model(x, y)")
        log_q = (
            _log_mixture_density(guide_sites, S, K, device, joint_latents(guide))
            if log_density and guide_sites
            else None
        )
    latents = {  # auxiliary guide sites (autoguides' unconstrained or joint draws) are not model variables
        name: (site["value"].detach().cpu(), site["fn"].event_dim, _member_size(site) is not None)
        for name, site in guide_sites
        if name in model_latents
    }
    return _Evaluation(
        latents,
        S,
        K,
        {n: torch.cat(v, dim=-1) for n, v in loglik.items()},
        {n: torch.cat(v, dim=-1) for n, v in predictive.items()},
        log_prior.cpu(),
        None if log_q is None else log_q.cpu(),
    )


def _chain_draw(t: torch.Tensor) -> np.ndarray:
    """``(S, K, ...)`` -> ``(chain=K, draw=S, ...)`` as a NumPy array."""
    return t.transpose(0, 1).numpy()


def _latent_arrays(ev: _Evaluation):
    """Posterior-group arrays ``(K, S, *event)``, their dims and attributes."""
    S, K = ev.num_samples, ev.num_components
    arrays, dims, attrs = {}, {}, {}
    for name, (value, event_dim, member) in ev.latents.items():
        batch = value.shape[: value.dim() - event_dim]
        if len(batch) != 3 or batch[0] != S or batch[2] != 1:
            raise ValueError(
                f"latent site {name!r} has batch shape {tuple(batch)}; expected (samples, members|1, 1), "
                "i.e. sampled in the members plate (dim -2) or outside every plate"
            )
        value = value.expand(S, K, *value.shape[2:]).squeeze(2)
        arrays[name] = _chain_draw(value)
        event = value.shape[2:]
        dims[name] = [f"{name}_dim"] if len(event) == 1 else [f"{name}_dim_{i}" for i in range(len(event))]
        attrs[name] = {"shared_by_components": int(not member)}
    return arrays, dims, attrs


def _observation_distribution(likelihood: str, samples: torch.Tensor) -> dist.Distribution:
    """Per-draw observation distribution from a :class:`Posterior`'s ``sample_predictions`` output."""
    if likelihood == "categorical":
        return dist.Categorical(probs=samples.double())
    if likelihood == "normal":
        return dist.Normal(samples[..., 0].double(), samples[..., 1].double().sqrt())
    raise ValueError(f"posterior.likelihood: unknown name {likelihood!r}; valid: ['categorical', 'normal']")


# ----------------------------------------------------------------------------- DataTree


def _groups_from_guide(model, guide, x, y, num_samples, batch_size, log_density):
    ev = _evaluate(model, guide, x, y, num_samples, batch_size, log_density)
    groups = {
        "log_likelihood": {n: _chain_draw(v) for n, v in ev.log_likelihood.items()},
        "posterior_predictive": {n: _chain_draw(v) for n, v in ev.predictive.items()},
    }
    dims = {n: ["obs_id"] for n in ev.log_likelihood}
    var_attrs = {}
    if ev.latents:
        groups["posterior"], latent_dims, var_attrs = _latent_arrays(ev)
        dims.update(latent_dims)
    if ev.log_q is not None:
        lp = ev.log_prior + sum(v.sum(-1) for v in ev.log_likelihood.values())
        groups["sample_stats"] = {"lp": _chain_draw(lp), "log_q": _chain_draw(ev.log_q)}
    return groups, dims, var_attrs, ev.num_samples, ev.num_components


def _groups_from_posterior(posterior, x, y, num_samples, batch_size, draws):
    if draws is not None and not isinstance(draws, dict):
        raise TypeError(f"draws must be a dict of arrays (chain, draw, ...), got {type(draws).__name__}")
    samples = predict(posterior, x, num_samples=num_samples, batch_size=batch_size).samples
    d = _observation_distribution(posterior.likelihood, samples)
    y = y.cpu().double() if posterior.likelihood == "normal" else y.cpu()
    groups = {
        "log_likelihood": {"obs": _chain_draw(d.log_prob(y))},
        "posterior_predictive": {"obs": _chain_draw(d.sample())},
    }
    S, K = samples.shape[:2]
    if draws:
        groups["posterior"] = {name: np.asarray(v) for name, v in draws.items()}
        for name, v in groups["posterior"].items():
            if v.ndim < 2 or v.shape[:2] != (K, S):
                raise ValueError(f"draws[{name!r}] must have shape (chain={K}, draw={S}, ...), got {v.shape}")
    return groups, {"obs": ["obs_id"]}, {}, S, K


def to_datatree(
    model,
    posterior,
    data,
    num_samples: int = 32,
    *,
    draws: dict | None = None,
    batch_size: int = 512,
    log_density: bool = True,
) -> xr.DataTree:
    """Monte Carlo draws of ``posterior`` and their evaluation on ``data`` as an ArviZ DataTree.

    Args:
        model: the Pyro model ``model(x, y)`` (e.g. a :class:`~rank1_pyro.models.Rank1Model`);
            ``None`` is fine when ``posterior`` is a :class:`Rank1Posterior` or a generic posterior.
        posterior: a :class:`~rank1_pyro.inference.Rank1Posterior`, a Pyro guide for ``model``
            (e.g. :class:`~rank1_pyro.inference.MixtureGuide`), or any
            :class:`~rank1_pyro.inference.Posterior` (Laplace, projected).
        data: ``(x, y)`` tensors. Pass the *training* data for PSIS-LOO and for
            ``sample_stats.lp`` :math:`= \\log p(\\theta, D)` (it needs all of D); held-out data
            for predictive checks.
        num_samples: S, Monte Carlo draws per component.
        draws: generic posteriors only: parameter draws ``{name: array (chain, draw, ...)}`` for
            the ``posterior`` group; chain and draw must equal the predictive's (K, S).
        batch_size: examples per model evaluation (the parameter draws stay fixed across batches).
        log_density: add ``sample_stats`` (``lp``, ``log_q``) when the guide has a density
            (not for point masses such as :class:`~rank1_pyro.inference.DeltaGuide`).

    A generic posterior is evaluated through :func:`~rank1_pyro.inference.predict`, batch by
    batch: its ``log_likelihood`` rows belong to one parameter draw only if it reuses its draws
    across calls (as :class:`~rank1_pyro.laplace.projected.ProjectedPosterior` does); otherwise
    pass ``batch_size >= N``. Groups, dims and their meaning: see the module docstring.
    """
    from arviz_base import from_dict

    x, y = _check_data(data)
    positive_int("num_samples", num_samples)
    positive_int("batch_size", batch_size)
    if isinstance(posterior, Rank1Posterior):
        if model is not None and model is not posterior.model:
            raise ValueError("model: not the model of the Rank1Posterior (pass None or that model)")
        model, posterior = posterior.model, posterior.guide
    if isinstance(posterior, Posterior):
        built = _groups_from_posterior(posterior, x, y, num_samples, batch_size, draws)
        likelihood = posterior.likelihood
    elif callable(posterior) and model is not None:
        if draws is not None:
            raise ValueError("draws: only for generic posteriors; a guide supplies its own draws")
        built = _groups_from_guide(model, posterior, x, y, num_samples, batch_size, log_density)
        likelihood = getattr(model, "likelihood", "")
    else:
        raise TypeError(
            "posterior must be a Rank1Posterior, a Posterior (likelihood, sample_predictions) or a "
            f"Pyro guide together with its model, got {type(posterior).__name__} with model={type(model).__name__}"
        )
    groups, dims, var_attrs, S, K = built
    if len(groups["log_likelihood"]) == 1:
        groups["observed_data"] = {next(iter(groups["log_likelihood"])): y.cpu().numpy()}
    tree = from_dict(groups, dims=dims)
    for name, attrs in var_attrs.items():
        tree["posterior"][name].attrs.update(attrs)
    if "sample_stats" in tree.children:
        tree["sample_stats"]["lp"].attrs["description"] = "log p(theta, D): log prior + log-likelihood of observed_data"
        tree["sample_stats"]["log_q"].attrs["description"] = "log q(theta): log density of the (mixture) guide"
    tree.attrs.update(
        {
            "chain": _CHAIN_DOC,
            "draw": _DRAW_DOC,
            "num_components": int(K),
            "num_samples": int(S),
            "posterior_kind": type(posterior).__name__,
            "likelihood": str(likelihood),
            "created_by": "rank1_pyro.diagnostics.to_datatree",
        }
    )
    return tree


def to_netcdf(tree: xr.DataTree, path) -> Path:
    """Write ``tree`` (all groups) to a netCDF-4 file (``h5netcdf`` engine); returns the path."""
    if not isinstance(tree, xr.DataTree):
        raise TypeError(f"tree must be an xarray.DataTree, got {type(tree).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    tree.to_netcdf(path, engine="h5netcdf")
    return path


def from_netcdf(path) -> xr.DataTree:
    """Read a DataTree written by :func:`to_netcdf` fully into memory (the file is closed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such netCDF file: {path}")
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        return tree.load()


# ----------------------------------------------------------------------------- VI quality: the log density ratios


def log_density_ratios(model, guide, data, num_samples: int = 256, *, batch_size: int = 512) -> xr.Dataset:
    """``lp`` :math:`= \\log p(\\theta, D)` and ``log_q`` :math:`= \\log q(\\theta)` for draws :math:`\\theta \\sim q`.

    ``data`` is the full training set ``(x, y)`` (summed over minibatches); dims ``(chain, draw)``
    with chain = component, as in :func:`to_datatree`'s ``sample_stats`` (which holds the same
    quantities for the tree's own draws). ``guide`` must have a density (no point masses).
    """
    x, y = _check_data(data)
    positive_int("num_samples", num_samples)
    positive_int("batch_size", batch_size)
    if isinstance(guide, Rank1Posterior):
        model, guide = guide.model, guide.guide
    ev = _evaluate(model, guide, x, y, num_samples, batch_size, log_density=True)
    if ev.log_q is None:
        raise ValueError("guide: has point masses (Delta sites) or no latent sites, so log q(theta) is undefined")
    lp = ev.log_prior + sum(v.sum(-1) for v in ev.log_likelihood.values())
    return xr.Dataset({"lp": (("chain", "draw"), _chain_draw(lp)), "log_q": (("chain", "draw"), _chain_draw(ev.log_q))})
