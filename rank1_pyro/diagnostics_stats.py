r"""Statistics read from an ArviZ DataTree: posterior summaries, VI quality (Pareto k-hat), PSIS-LOO.

This module holds one concept: reading a DataTree that :func:`rank1_pyro.diagnostics.to_datatree`
wrote (or :func:`~rank1_pyro.diagnostics.log_density_ratios` for k-hat alone). It needs no model,
guide or Pyro, only xarray and ArviZ; :mod:`rank1_pyro.diagnostics` re-exports every public name,
so ``from rank1_pyro.diagnostics import vi_khat`` is the usual spelling.

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

import numpy as np
import xarray as xr

__all__ = [
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

#: Yao et al. (2018): below this k-hat the variational posterior is close to the posterior
KHAT_GOOD = 0.5
#: at or above this k-hat the variational posterior is far from the posterior
KHAT_USABLE = 0.7
#: fewest draws for a Pareto tail fit: ArviZ's PSIS fits a tail only from 30 draws on (with fewer it
#: returns k-hat NaN), so fewer are refused with a message rather than reported as NaN
MIN_PARETO_DRAWS = 30
#: log ratios spread less than this are equal weights up to rounding (a Pareto fit would be noise)
_CONSTANT_LOG_RATIO = 1e-8


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
            tree,
            var_names=var_names,
            group="posterior",
            kind="all",
            round_to="none",
            ci_prob=ci_prob,
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


def vi_khat(data) -> float:
    """Pareto :math:`\\hat k` of the importance ratios :math:`p(\\theta, D) / q(\\theta)`, :math:`\\theta \\sim q`.

    ``data``: a DataTree with ``sample_stats`` (``lp``, ``log_q``) or the Dataset of
    :func:`~rank1_pyro.diagnostics.log_density_ratios`. All chains and draws are pooled (stratified
    draws from the mixture; independent, so no relative efficiency correction). Uses ArviZ's PSIS
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
        raise ValueError(
            f"vi_khat needs at least {MIN_PARETO_DRAWS} draws for the Pareto tail fit, got {log_ratio.size}"
        )
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
        return (
            f"k-hat = {khat:.2f} in [{KHAT_GOOD}, {KHAT_USABLE}): usable, q is a rough approximation of the posterior"
        )
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
