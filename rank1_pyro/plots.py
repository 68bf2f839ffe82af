r"""Figures of the diagnostics (PNG, matplotlib's Agg backend); the numbers come from :mod:`rank1_pyro.diagnostics`.

* :func:`factor_forest` -- forest plot of the rank-1 factors (from the ArviZ DataTree), one row per
  site and entry (``net.0.r[2]``), one interval per mixture component (chain), so separated
  components show as separated intervals;
* :func:`reliability_diagram` -- accuracy against confidence of the mixture predictive;
* :func:`pit_check` -- ArviZ's PIT Δ-ECDF of the posterior predictive against held-out labels;
* :func:`khat_plot` -- the PSIS-LOO Pareto k-hat per observation, with the 0.5 / 0.7 thresholds,
  titled with the VI k-hat.

Every function writes one PNG and returns its path. Every figure is readable on its own: a title
that names the data, axis labels that define every symbol, and a legend for every line or colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import metrics
from ._checks import positive_int
from .diagnostics_stats import khat_label

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


#: the intervals of :func:`factor_forest`: thick bar, thin bar (equal-tailed)
FOREST_INTERVALS = (0.5, 0.89)


def factor_forest(tree: xr.DataTree, path, *, max_entries: int = 4, var_names=None) -> Path:
    """Forest plot of the first ``max_entries`` entries of every factor, one colour per component.

    One row per site and entry, labelled ``site[entry]`` (``net.0.r[0]``, ``net.0.r[1]``, ...), in
    module order, so the rows run layer by layer; a thin line separates the sites. Per mixture
    component (chain): dot = posterior mean, thick / thin bar = 50% / 89% equal-tailed interval of
    its draws. The figure's height grows with the number of rows. ``var_names`` defaults to the
    vector sites (the factors); global scales are left out (see
    :func:`rank1_pyro.diagnostics.site_summary`).
    """
    plt = _pyplot()
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
    rows, boundaries = [], []  # (label, draws (chain, draw)); the row index where each site starts
    for name in names:
        da = posterior[name].isel({d: slice(0, max_entries) for d in entry_dims[name]})
        values = np.asarray(da.transpose("chain", "draw", *entry_dims[name]).values, dtype=float)
        boundaries.append(len(rows))
        for idx in np.ndindex(*values.shape[2:]):
            label = f"{name}[{', '.join(map(str, idx))}]" if idx else name
            rows.append((label, values[(slice(None), slice(None), *idx)]))
    chains = posterior.sizes["chain"]
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + len(rows) * (0.16 + 0.05 * min(chains, 6))))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    spread = 0.7 / chains
    (lo50, hi50), (lo89, hi89) = ((50 - 50 * p, 50 + 50 * p) for p in FOREST_INTERVALS)
    for i, (_label, draws) in enumerate(rows):
        for c in range(chains):
            y = -i + (c - (chains - 1) / 2) * spread
            q = np.percentile(draws[c], [lo89, lo50, hi50, hi89])
            color = colors[c % len(colors)]
            ax.hlines(y, q[0], q[3], color=color, linewidth=1)
            ax.hlines(y, q[1], q[2], color=color, linewidth=3.5)
            ax.plot(
                draws[c].mean(),
                y,
                "o",
                color=color,
                markersize=3.5,
                label=f"component {c + 1}" if i == 0 and chains > 1 else None,
            )
    for b in boundaries[1:]:
        ax.axhline(-b + 0.5, color="lightgrey", linewidth=0.8)
    ax.set_yticks([-i for i in range(len(rows))], [label for label, _ in rows], fontsize=8)
    ax.set_ylim(-len(rows) + 0.5, 0.5)
    ax.set_ylabel("site[entry]")
    ax.set_xlabel("factor value (dot: posterior mean; thick / thin bar: 50% / 89% interval)")
    ax.grid(axis="x", alpha=0.3)
    if chains > 1:
        ax.legend(title="mixture component", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(
        f"Rank-1 factor posteriors, layer by layer:\nthe first {max_entries} entries of each site"
        + (", one colour per mixture component" if chains > 1 else ""),
        fontsize=10,
    )
    return _save_figure(fig, path)


def _save_figure(fig, path) -> Path:
    plt = _pyplot()
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def reliability_diagram(
    probs, labels: torch.Tensor, path, *, num_bins: int = 15, title: str = "", suptitle: str = ""
) -> Path:
    """Reliability diagram of predicted class probabilities ``(N, C)`` (top-label confidence).

    ``probs`` is one ``(N, C)`` tensor, or a dict ``{name: probs}`` drawn as one column per entry
    (e.g. several methods on the same labels). Bars: accuracy per confidence bin
    (:func:`rank1_pyro.metrics.reliability`), dots: the bin's mean confidence; bars above the
    diagonal mean underconfidence, below it overconfidence. The lower panels show how many
    predictions fall in each bin. ``suptitle`` titles the whole figure (say which data it shows).
    """
    plt = _pyplot()
    panels = probs if isinstance(probs, dict) else {title: probs}
    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(4.0 * len(panels), 5.2),
        sharex=True,
        squeeze=False,
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
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pit_check(
    tree: xr.DataTree, path, *, title: str = "", data: str = "held-out data", name: str | None = None
) -> Path:
    """ArviZ PIT Δ-ECDF of ``posterior_predictive`` against ``observed_data`` (``plot_ppc_pit``).

    For each observation the PIT is :math:`u_n = P(\\tilde y < y_n) + V\\,P(\\tilde y = y_n)`,
    :math:`V \\sim U(0, 1)`, under the posterior predictive draws. For class labels this is the
    randomized PIT: it is uniform whenever the predictive distribution is right, whatever the
    (arbitrary) order of the classes, so a Δ-ECDF far from 0 flags miscalibration. Below 0 at
    small u and above 0 at large u (too few PIT values in both tails): the predictive is too wide
    (underconfident); the mirror image: too narrow (overconfident). The reliability diagram is the
    easier-to-read check for classification.

    The title names ``data`` (e.g. ``"test set"``); the panel is titled ``name`` (default: "class
    label" for integer observations, "target" otherwise) instead of the model's site name.
    """
    import arviz_plots

    for group in ("posterior_predictive", "observed_data"):
        if group not in tree.children:
            raise ValueError(f"tree has no {group} group for a PIT check")
    observed = tree["observed_data"].to_dataset()
    if name is None:
        kinds = {observed[v].dtype.kind for v in observed.data_vars}
        name = "class label" if kinds <= {"i", "u", "b"} else "target"
    renames = {v: name if len(observed.data_vars) == 1 else f"{name} ({v})" for v in observed.data_vars}
    readable = xr.DataTree.from_dict(
        {
            group: tree[group].to_dataset()[list(renames)].rename(renames)
            for group in ("posterior_predictive", "observed_data")
        }
    )
    pc = arviz_plots.plot_ppc_pit(readable, backend="matplotlib")
    fig = pc.viz["figure"].item()
    for ax in fig.axes:
        ax.set_xlabel("PIT value u (uniform when calibrated)")
        ax.set_ylabel("Δ-ECDF: ECDF(u) − u")
    return _save(
        pc,
        path,
        title or f"PIT check of the posterior predictive on the {data}: Δ-ECDF of the PIT values (0 = calibrated)",
    )


#: Pareto k-hat thresholds drawn by :func:`khat_plot`: (value, legend text, colour)
KHAT_THRESHOLDS = (
    (0.5, "k-hat = 0.5: below, PSIS estimate reliable", "tab:orange"),
    (0.7, "k-hat = 0.7: above, unreliable", "tab:red"),
)


def khat_plot(loo_result, path, *, vi_khat: float | None = None, data: str = "training example") -> Path:
    """The Pareto k-hat of each observation from a pointwise PSIS-LOO (``arviz_stats.loo``).

    Dashed lines at k-hat = 0.5 and 0.7 (legend): below 0.5 the observation's leave-one-out estimate
    is reliable, above 0.7 it is not (ArviZ's sample-size threshold min(1 − 1/log10 S, 0.7), S =
    number of posterior draws, is 0.7 from S ≈ 2200 on). The title carries the number of draws and
    the VI k-hat of :func:`rank1_pyro.diagnostics.vi_khat`.
    """
    plt = _pyplot()
    if getattr(loo_result, "pareto_k", None) is None:
        raise ValueError("loo_result must be a pointwise PSIS-LOO result (pareto_k per observation)")
    k = np.asarray(loo_result.pareto_k, dtype=float).reshape(-1)
    draws = getattr(loo_result, "n_samples", None)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    colors = np.where(k > 0.7, "tab:red", np.where(k > 0.5, "tab:orange", "tab:blue"))
    ax.scatter(np.arange(k.size), k, c=list(colors), s=12, marker="+" if k.size > 200 else "o")
    for value, label, color in KHAT_THRESHOLDS:
        ax.axhline(value, linestyle="--", color=color, linewidth=1, label=label)
    ax.set_xlabel(f"{data} (index)")
    ax.set_ylabel("Pareto k-hat (tail shape of the\nimportance weights)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    counts = f"{int((k > 0.7).sum())} of {k.size} above 0.7"
    title = f"PSIS-LOO Pareto k-hat per {data}" + (f", {draws} posterior draws" if draws else "") + f" ({counts})"
    if vi_khat is not None:
        title += (
            f"\nVI quality: k-hat of the weights p(θ, D) / q(θ) = {vi_khat:.2f}, {khat_label(vi_khat)} "
            "(< 0.7 usable)\nθ: the factors, D: the training data, q: the guide"
        )
    ax.set_title(title, fontsize=9)
    return _save_figure(fig, path)
