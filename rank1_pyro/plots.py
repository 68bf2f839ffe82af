r"""Figures of the diagnostics (PNG, matplotlib's Agg backend); the numbers come from :mod:`rank1_pyro.diagnostics`.

* :func:`factor_forest` -- ArviZ forest plot of the rank-1 factors, layer by layer, one interval per
  mixture component (chain), so separated components show as separated intervals;
* :func:`reliability_diagram` -- accuracy against confidence of the mixture predictive;
* :func:`pit_check` -- ArviZ's PIT Δ-ECDF of the posterior predictive against held-out labels;
* :func:`khat_plot` -- ArviZ's PSIS-LOO Pareto k-hat per observation, titled with the VI k-hat.

Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ._checks import positive_int
from . import metrics
from .diagnostics import khat_label

__all__ = ["factor_forest", "reliability_diagram", "pit_check", "khat_plot"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(pc, path, title: str) -> Path:
    """Title and save an arviz_plots PlotCollection (matplotlib backend), then close its figure."""
    plt = _pyplot()
    path = Path(path)
    fig = pc.viz["figure"].item()
    fig.suptitle(title, fontsize=10, y=1.0, va="bottom")  # above the axes' own titles
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def factor_forest(tree: xr.DataTree, path, *, max_entries: int = 6, var_names=None) -> Path:
    """Forest plot of the first ``max_entries`` entries of every factor, one colour per component.

    Point = posterior mean, thick / thin bars = 50% / 89% equal-tailed intervals of each component's
    draws. Sites are listed in module order, so the rows run layer by layer (``net.0.r``,
    ``net.0.s``, ``net.2.r``, ...), entries top to bottom. ``var_names`` defaults to the vector
    sites (the factors); global scales are left out (see :func:`rank1_pyro.diagnostics.site_summary`).
    """
    import arviz_plots

    positive_int("max_entries", max_entries)
    if "posterior" not in tree.children:
        raise ValueError("tree has no posterior group to plot")
    posterior = tree["posterior"]
    entry_dims = {name: [d for d in da.dims if d not in ("chain", "draw")] for name, da in posterior.data_vars.items()}
    names = list(var_names) if var_names is not None else [n for n, dims in entry_dims.items() if len(dims) == 1]
    if not names:
        raise ValueError("factor_forest: no vector-valued posterior variables to plot")
    unknown = [n for n in names if n not in entry_dims]
    if unknown:
        raise ValueError(f"var_names: not in the posterior group: {unknown}")
    coords = {d: np.arange(min(max_entries, posterior.sizes[d])) for n in names for d in entry_dims[n]}
    rows = sum(int(np.prod([len(coords[d]) for d in entry_dims[n]], dtype=int)) for n in names)
    chains = posterior.sizes["chain"]
    pc = arviz_plots.plot_forest(
        tree,
        var_names=names,
        coords=coords,
        combined=chains == 1,
        ci_probs=(0.5, 0.89),
        labels=["__variable__"],  # one label column; entries run top to bottom within a factor
        backend="matplotlib",
        aes={"color": ["chain"]} if chains > 1 else {},
        figure_kwargs={"figsize": (8, 1.5 + 0.07 * rows * max(chains, 2))},
    )
    if chains > 1:
        pc.add_legend("chain", title="component", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(
        pc,
        path,
        f"Rank-1 factor posteriors, layer by layer: first {max_entries} entries of each factor, "
        "one colour per mixture component",
    )


def reliability_diagram(probs, labels: torch.Tensor, path, *, num_bins: int = 15, title: str = "") -> Path:
    """Reliability diagram of predicted class probabilities ``(N, C)`` (top-label confidence).

    ``probs`` is one ``(N, C)`` tensor, or a dict ``{name: probs}`` drawn as one column per entry
    (e.g. several methods on the same labels). Bars: accuracy per confidence bin
    (:func:`rank1_pyro.metrics.reliability`), dots: the bin's mean confidence; bars above the
    diagonal mean underconfidence, below it overconfidence. The lower panels show how many
    predictions fall in each bin.
    """
    plt = _pyplot()
    panels = probs if isinstance(probs, dict) else {title: probs}
    fig, axes = plt.subplots(
        2, len(panels), figsize=(4.0 * len(panels), 5.2), sharex=True, squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    width = 1.0 / num_bins
    centers = (np.arange(num_bins) + 0.5) * width
    for column, (name, p) in enumerate(panels.items()):
        top, bottom = axes[0, column], axes[1, column]
        conf, acc, count = (t.numpy() for t in metrics.reliability(p, labels, num_bins))
        used = count > 0
        top.bar(centers[used], acc[used], width=width, edgecolor="black", label="accuracy in bin")
        top.plot(centers[used], conf[used], "o", color="tab:red", markersize=4, label="mean confidence in bin")
        top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        top.set_ylim(0, 1)
        scores = f"ECE {metrics.ece(p, labels, num_bins):.3f}, accuracy {metrics.accuracy(p, labels):.3f}"
        top.set_title(f"{name}\n{scores}".strip(), fontsize=9)
        bottom.bar(centers, count, width=width, color="grey", edgecolor="black")
        bottom.set_xlabel("confidence (max predicted probability)")
        bottom.set_xlim(0, 1)
    axes[0, 0].set_ylabel("accuracy")
    axes[1, 0].set_ylabel("count")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pit_check(tree: xr.DataTree, path, *, title: str = "") -> Path:
    """ArviZ PIT Δ-ECDF of ``posterior_predictive`` against ``observed_data`` (``plot_ppc_pit``).

    For each observation the PIT is :math:`u_n = P(\\tilde y < y_n) + V\\,P(\\tilde y = y_n)`,
    :math:`V \\sim U(0, 1)`, under the posterior predictive draws. For class labels this is the
    randomized PIT: it is uniform whenever the predictive distribution is right, whatever the
    (arbitrary) order of the classes, so a Δ-ECDF far from 0 flags miscalibration. Below 0 at
    small u and above 0 at large u (too few PIT values in both tails): the predictive is too wide
    (underconfident); the mirror image: too narrow (overconfident). The reliability diagram is the
    easier-to-read check for classification.
    """
    import arviz_plots

    for group in ("posterior_predictive", "observed_data"):
        if group not in tree.children:
            raise ValueError(f"tree has no {group} group for a PIT check")
    pc = arviz_plots.plot_ppc_pit(tree, backend="matplotlib")
    return _save(pc, path, title or "PIT check: Δ-ECDF of PIT values (0 = calibrated)")


def khat_plot(loo_result, path, *, vi_khat: float | None = None) -> Path:
    """ArviZ's Pareto k-hat per observation from a pointwise PSIS-LOO (``arviz_stats.loo``).

    Lines at 0, ArviZ's sample-size threshold :math:`\\min(1 - 1/\\log_{10} S, 0.7)` and 1; the title
    carries the VI k-hat of :func:`rank1_pyro.diagnostics.vi_khat`.
    """
    import arviz_plots

    if getattr(loo_result, "pareto_k", None) is None:
        raise ValueError("loo_result must be a pointwise PSIS-LOO result (pareto_k per observation)")
    pc = arviz_plots.plot_khat(loo_result, backend="matplotlib", visuals={"hlines": True})
    title = "PSIS-LOO Pareto k-hat per training example (below the dashed line min(1 - 1/log10 S, 0.7): reliable)"
    if vi_khat is not None:
        title += f"\nVI quality: k-hat of p(θ, D)/q(θ) = {vi_khat:.2f}, {khat_label(vi_khat)} (< 0.7 usable)"
    return _save(pc, path, title)
