r"""ArviZ diagnostics of the library's posteriors: DataTree conversion, summaries, VI quality, PSIS-LOO.

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

**VI quality** (Yao, Vehtari, Simpson & Gelman, 2018, "Yes, but Did It Work?"). With
:math:`\theta_i \sim q` and importance ratios :math:`w_i = p(\theta_i, D) / q(\theta_i)`, the
shape :math:`\hat k` of a generalized Pareto fit to the largest ratios (PSIS) measures how far
q is from the posterior: :math:`\hat k < 0.5` good, :math:`0.5 \le \hat k < 0.7` usable,
:math:`\hat k \ge 0.7` q is far from the posterior (importance sampling with it would not work,
and its summaries should not be read as the Bayesian posterior's). In hundreds of dimensions,
mean-field families almost always give :math:`\hat k > 0.7` even when the predictive is good.

**Component separation.** ArviZ's R-hat across chains here compares the K mixture components:
values far above 1 say the components sit in different places (the multimodality the mixture is
meant to capture). Being rank-normalised it measures overlap rather than distance: it saturates
(about 2.4 for 3 × 50 draws) once the components no longer overlap. It is **not** a convergence
check for VI, and :func:`summary` names the column ``component_separation_rhat`` accordingly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import xarray as xr
from pyro.poutine.util import site_is_subsample
from torch import nn

from ._checks import positive_int
from .inference.joint import joint_latents
from .inference.objectives import is_point_mass
from .inference.predictive import SAMPLE_DIM, Posterior, Rank1Posterior, _device_of, _module_mode, predict
from .layers import MEMBER_DIM

__all__ = [
    "to_datatree",
    "to_netcdf",
    "from_netcdf",
    "summary",
    "site_summary",
    "log_density_ratios",
    "vi_khat",
    "khat_label",
    "khat_verdict",
    "loo",
    "diagnose",
    "KHAT_GOOD",
    "KHAT_USABLE",
    "MIN_PARETO_DRAWS",
]

#: Yao et al. (2018): below this k-hat the variational posterior is close to the posterior
KHAT_GOOD = 0.5
#: at or above this k-hat the variational posterior is far from the posterior
KHAT_USABLE = 0.7

_MEMBER_PLATE = "members"
#: fewest draws for a Pareto tail fit (ArviZ fits the largest n/5 ratios and needs at least 5)
MIN_PARETO_DRAWS = 25
#: log ratios spread less than this are equal weights up to rounding (a Pareto fit would be noise)
_CONSTANT_LOG_RATIO = 1e-8
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
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]


def _member_size(site) -> int | None:
    for frame in site["cond_indep_stack"]:
        if frame.name == _MEMBER_PLATE:
            return frame.size
    return None


def _per_draw(log_prob: torch.Tensor, num_samples: int, num_components: int, name: str) -> torch.Tensor:
    """Reduce a site's log-density, batch ``(S|1, K|1, B|1)``, to one value per draw ``(S, K)``."""
    if log_prob.dim() > 3:
        raise ValueError(f"site {name!r}: batch shape {tuple(log_prob.shape)} has more dims than (samples, members, data)")
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
            for j in range(K):
                components[j] += joint.member_log_density(u, j).double()
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
            _log_mixture_density(guide_sites, S, K, device, joint_latents(guide)) if log_density and guide_sites else None
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
    groups = {"log_likelihood": {"obs": _chain_draw(d.log_prob(y))}, "posterior_predictive": {"obs": _chain_draw(d.sample())}}
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


# ----------------------------------------------------------------------------- summaries


def _posterior(tree) -> xr.Dataset:
    if not isinstance(tree, xr.DataTree):
        raise TypeError(f"tree must be an xarray.DataTree, got {type(tree).__name__}")
    if "posterior" not in tree.children:
        raise ValueError("tree has no posterior group (a generic posterior needs draws=... in to_datatree)")
    return tree["posterior"].to_dataset()


def summary(tree: xr.DataTree, var_names=None, *, ci_prob: float | None = None, ci_kind: str = "eti"):
    """ArviZ summary of the posterior draws plus the between-component R-hat, one row per entry.

    Columns: ``mean``, ``sd`` and the credible interval of :func:`arviz_stats.summary` over all
    components and draws, and ``component_separation_rhat``: ArviZ's rank-normalised R-hat with the
    mixture components as chains. It measures how far the **components sit apart** (values well
    above 1: the components occupy different modes; it saturates once they stop overlapping);
    it is **not** a convergence diagnostic, since
    the draws are independent draws from a variational posterior, not Markov chains. For the same
    reason the MCMC columns (ESS, MCSE) are dropped. NaN for a single component; inf for
    point-mass components (zero spread within each).
    """
    import arviz_stats

    _posterior(tree)
    # point-mass components (DeltaGuide) have zero within-component variance: R-hat is inf there
    # by definition (fully separated components), not a numerical accident worth a warning
    with np.errstate(divide="ignore", invalid="ignore"):
        df = arviz_stats.summary(
            tree, var_names=var_names, group="posterior", kind="all", round_to="none", ci_prob=ci_prob,
            ci_kind=ci_kind,
        )
    keep = [c for c in df.columns if c in ("mean", "sd") or c.endswith("_lb") or c.endswith("_ub")]
    out = df[keep].copy()
    out["component_separation_rhat"] = df["r_hat"] if tree["posterior"].sizes["chain"] > 1 else np.nan
    return out


def site_summary(tree: xr.DataTree):
    """One row per posterior variable (rank-1 factor or scale), aggregated over its entries.

    Columns: ``size``; ``mean`` (average entry mean); ``sd`` (average entry stddev over all
    components and draws); ``within_component_sd`` (average stddev inside one component);
    ``component_separation_rhat_median`` / ``_max`` over the entries (see :func:`summary`;
    NaN for a single component and for scales shared by all components).
    """
    import arviz_stats
    import pandas as pd

    ds = _posterior(tree)
    multi = ds.sizes["chain"] > 1
    with np.errstate(divide="ignore", invalid="ignore"):  # inf for point-mass components, see summary()
        rhat = arviz_stats.rhat(ds) if multi else None
    rows = {}
    for name, da in ds.data_vars.items():
        shared = bool(da.attrs.get("shared_by_components", 0))
        r = rhat[name].values if multi and not shared else np.full(1, np.nan)
        rows[name] = {
            "size": int(np.prod([da.sizes[d] for d in da.dims if d not in ("chain", "draw")], dtype=int)),
            "mean": float(da.mean()),
            "sd": float(da.std(("chain", "draw")).mean()),
            "within_component_sd": float(da.std("draw").mean()),
            "component_separation_rhat_median": float(np.median(r)),
            "component_separation_rhat_max": float(np.max(r)),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


# ----------------------------------------------------------------------------- VI quality and LOO


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


def vi_khat(data) -> float:
    """Pareto :math:`\\hat k` of the importance ratios :math:`p(\\theta, D) / q(\\theta)`, :math:`\\theta \\sim q`.

    ``data``: a DataTree with ``sample_stats`` (``lp``, ``log_q``) or the Dataset of
    :func:`log_density_ratios`. All chains and draws are pooled (stratified draws from the
    mixture; independent, so no relative efficiency correction). Uses ArviZ's PSIS
    (``psislw``), which takes log-likelihood values and weighs by their reciprocal, hence the
    negated log ratios. Read it with :func:`khat_verdict`.
    """
    import arviz_stats  # noqa: F401  (registers the .azstats accessor)

    if isinstance(data, xr.DataTree):
        if "sample_stats" not in data.children:
            raise ValueError("data has no sample_stats group: build it with a guide that has a density")
        data = data["sample_stats"].to_dataset()
    if not isinstance(data, xr.Dataset) or not {"lp", "log_q"} <= set(data.data_vars):
        raise TypeError("data must be a DataTree with sample_stats or a Dataset with variables lp and log_q")
    log_ratio = (data["lp"] - data["log_q"]).astype(np.float64)
    if log_ratio.size < MIN_PARETO_DRAWS:
        raise ValueError(f"vi_khat needs at least {MIN_PARETO_DRAWS} draws for the Pareto tail fit, got {log_ratio.size}")
    if not np.isfinite(log_ratio.values).all():
        raise ValueError("the log importance ratios are not all finite (q or p vanishes at some draws)")
    if np.ptp(log_ratio.values) < _CONSTANT_LOG_RATIO:
        return float("-inf")  # equal weights to rounding: q is the posterior, the ratios have no tail
    _, khat = (-log_ratio).azstats.psislw(dim=list(log_ratio.dims))
    return float(khat)


def khat_label(khat: float) -> str:
    """``"good"`` (k < 0.5), ``"usable"`` (0.5 <= k < 0.7) or ``"unreliable"`` (k >= 0.7), as in Yao et al. (2018)."""
    return "good" if khat < KHAT_GOOD else "usable" if khat < KHAT_USABLE else "unreliable"


def khat_verdict(khat: float) -> str:
    """The usual reading of a VI k-hat (Yao et al., 2018), in one sentence."""
    label = khat_label(khat)
    if label == "good":
        return f"k-hat = {khat:.2f} < {KHAT_GOOD}: good, q is close to the posterior"
    if label == "usable":
        return f"k-hat = {khat:.2f} in [{KHAT_GOOD}, {KHAT_USABLE}): usable, q is a rough approximation of the posterior"
    return (
        f"k-hat = {khat:.2f} >= {KHAT_USABLE}: unreliable, q is far from the posterior and its summaries are not "
        "the Bayesian posterior's (usual for mean-field families in hundreds of dimensions; judge the "
        "predictive by held-out metrics)"
    )


def loo(tree: xr.DataTree, *, approximate_posterior: bool = False):
    """PSIS-LOO (``arviz_stats.loo``) from the ``log_likelihood`` group, pointwise.

    The draws are independent, so the relative efficiency is 1. Plain PSIS-LOO treats the draws
    as posterior draws; with ``approximate_posterior=True`` it corrects for sampling from q
    instead (``arviz_stats.loo_approximate_posterior`` with ``sample_stats.lp`` and ``log_q``;
    Magnusson et al., 2019), which is only as reliable as :func:`vi_khat` allows.
    """
    import arviz_stats

    if not isinstance(tree, xr.DataTree) or "log_likelihood" not in tree.children:
        raise ValueError("tree must be a DataTree with a log_likelihood group (see to_datatree)")
    if not approximate_posterior:
        return arviz_stats.loo(tree, pointwise=True, reff=1.0)
    if "sample_stats" not in tree.children:
        raise ValueError("approximate_posterior=True needs the sample_stats group (lp, log_q)")
    stats = tree["sample_stats"]
    return arviz_stats.loo_approximate_posterior(tree, log_p=stats["lp"], log_q=stats["log_q"], pointwise=True)


# ----------------------------------------------------------------------------- the whole report


def _loo_line(result, label: str) -> str:
    k = np.asarray(result.pareto_k)
    bad = int((k > result.good_k).sum())
    return (
        f"{label}: elpd_loo = {result.elpd:.1f} (SE {result.se:.1f}), p_loo = {result.p:.1f}; "
        f"Pareto k > {result.good_k:.2f} for {bad} of {k.size} examples"
    )


def diagnose(
    model,
    guide,
    train_data,
    test_data,
    out_dir,
    *,
    num_samples: int = 32,
    batch_size: int = 512,
    max_entries: int = 6,
) -> str:
    """Run every diagnostic of a rank-1 model and its guide; write figures and data; return the text report.

    Writes into ``out_dir``: ``train.nc`` (the DataTree of the training data: posterior,
    posterior_predictive, log_likelihood, observed_data, sample_stats), ``test.nc`` (predictive
    groups on the test data), ``summary.csv`` (:func:`summary`, one row per factor entry),
    ``forest.png``, ``reliability.png`` (classification), ``pit.png`` (test data), ``khat.png``
    (guides with a density) and ``report.txt``. Held-out metrics use the Monte Carlo mixture predictive of S draws per
    component; VI quality and PSIS-LOO use the training data, as they must.
    """
    from . import metrics, plots

    x_test, y_test = _check_data(test_data)
    _check_data(train_data)
    positive_int("num_samples", num_samples)
    draws = num_samples * getattr(model, "ensemble_size", 1)
    if draws < MIN_PARETO_DRAWS:
        raise ValueError(
            f"num_samples: {num_samples} draws per component give {draws} draws in all; the Pareto fits of "
            f"k-hat and PSIS-LOO need at least {MIN_PARETO_DRAWS}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    posterior = Rank1Posterior(model, guide)
    train_tree = to_datatree(None, posterior, train_data, num_samples, batch_size=batch_size)
    test_tree = to_datatree(None, posterior, test_data, num_samples, batch_size=batch_size, log_density=False)
    to_netcdf(train_tree, out / "train.nc")
    to_netcdf(test_tree, out / "test.nc")
    S, K = train_tree.attrs["num_samples"], train_tree.attrs["num_components"]
    prediction = predict(posterior, x_test, num_samples=num_samples, batch_size=batch_size)
    lines = [
        "rank1-pyro diagnostics",
        f"model: {type(model).__name__}({model.extra_repr() if isinstance(model, nn.Module) else ''}); "
        f"guide: {type(guide).__name__}",
        f"draws: S = {S} per component x K = {K} components = {S * K} (chain = component, draw = sample)",
        f"data: {train_tree['observed_data'].sizes['obs_id']} training, {x_test.shape[0]} test examples",
        "",
    ]
    files = ["train.nc", "test.nc"]
    if prediction.likelihood == "categorical":
        m = metrics.classification_metrics(prediction.probs, y_test.cpu(), prediction.log_probs)
        lines.append("held-out predictive (mixture): " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        members = [metrics.accuracy(p, y_test.cpu()) for p in prediction.member_probs]
        lines.append("held-out accuracy of each component alone: " + ", ".join(f"{a:.4f}" for a in members))
        plots.reliability_diagram(
            prediction.probs, y_test.cpu(), out / "reliability.png", title="Test set, mixture predictive"
        )
        files.append("reliability.png")
    else:
        lines.append(
            f"held-out predictive: rmse {metrics.rmse(prediction.mean, y_test.cpu()):.4f}, "
            f"nll {metrics.gaussian_nll(prediction.mean, prediction.variance, y_test.cpu()):.4f}"
        )
    pit_title = "PIT check on the test set (randomized PIT for class labels; 0 = calibrated)"
    plots.pit_check(test_tree, out / "pit.png", title=pit_title, data="test set")
    files.append("pit.png")
    lines.append("")
    if "sample_stats" in train_tree.children:
        khat = vi_khat(train_tree)
        with warnings.catch_warnings():  # ArviZ warns about large Pareto k; the report states the counts
            warnings.simplefilter("ignore", UserWarning)
            plain, corrected = loo(train_tree), loo(train_tree, approximate_posterior=True)
        note = "" if khat < KHAT_USABLE else " (unreliable: the VI k-hat is >= 0.7)"
        lines += [
            f"VI quality (Yao et al. 2018), Pareto k-hat of log p(theta, D) - log q(theta) over {S * K} draws of q:",
            "  " + khat_verdict(khat),
            _loo_line(plain, "PSIS-LOO on the training data, draws taken as posterior draws"),
            _loo_line(corrected, f"PSIS-LOO corrected for sampling from q{note}"),
        ]
        plots.khat_plot(plain, out / "khat.png", vi_khat=khat)
        files.append("khat.png")
    else:  # point masses: no density, and only K distinct draws (a Pareto tail fit of ties is undefined)
        lines += [
            "VI quality: undefined, the guide has point masses (no density q(theta))",
            "PSIS-LOO: skipped, a point-mass guide gives only K distinct parameter draws",
        ]
    lines.append("")
    if "posterior" in train_tree.children:
        summary(train_tree).to_csv(out / "summary.csv")
        plots.factor_forest(train_tree, out / "forest.png", max_entries=max_entries)
        files += ["summary.csv", "forest.png"]
        table = site_summary(train_tree)
        lines += [
            "Posterior per site (averaged over entries). component_separation_rhat is ArviZ's R-hat with the",
            "mixture components as chains: how far apart the components sit, NOT a convergence check for VI.",
            table.to_string(float_format=lambda v: f"{v:.3f}"),
            "",
        ]
    lines.append(f"files in {out}: {', '.join(files + ['report.txt'])}")
    report = "\n".join(lines) + "\n"
    (out / "report.txt").write_text(report)
    return report
