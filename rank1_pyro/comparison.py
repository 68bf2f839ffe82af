r"""Approximate posteriors of one trained rank-1 model against the HMC reference over its factors.

:func:`compare_to_hmc` takes a trained model, any number of approximate posteriors of its rank-1
factors -- mixture guides (either ELBO), ``DeltaGuide`` (BatchEnsemble), Pyro autoguides, a
:class:`~rank1_pyro.laplace.SubnetLaplace` over the ``"rank1-factors"`` subnetwork, or plain factor
draws -- and the DataTree of :func:`~rank1_pyro.inference.hmc.run_hmc` chains of the same model
(W and the biases are the model's for all of them), and measures, for the members the chains
sampled (member k's posterior :math:`p_k` against component k of each approximation):

* **held-out predictive**: NLL, accuracy and ECE of the mixture predictive
  :math:`\bar p(y \mid x) = \frac{1}{|M|}\sum_{k \in M} \mathbb E_{q_k}[p(y \mid x, \theta; W, b_k)]`
  (M the sampled members), each approximation and HMC evaluated the same way: the network at
  posterior draws (a Laplace posterior through its ``"nn"`` predictive, not a linearisation);
* **predictive KL** to HMC, averaged over the test inputs:
  :math:`\frac1N \sum_n \mathrm{KL}\big(\bar p_{\rm HMC}(\cdot \mid x_n) \,\|\, \bar p_q(\cdot \mid x_n)\big)`;
* **marginal moments** of every factor entry e of every member: the standardized mean error
  :math:`|\mu_{q,e} - \mu_{{\rm HMC},e}| / \sigma_{{\rm HMC},e}` (median over entries) and the std ratio
  :math:`\sigma_{q,e} / \sigma_{{\rm HMC},e}` (median and 10 %/90 % quantiles; 1 is exact, below 1
  over-confident), moments of q from ``num_samples`` draws per component;
* **modes covered**: the HMC chains of each member are grouped into modes and weighed by their
  estimated mass (:func:`~rank1_pyro.inference.hmc.chain_modes`); component k *covers* a mode of member
  k when its mean lies within ``cover_distance`` RMS standardized units of the mode's mean,
  :math:`\big(\frac1D\sum_e (\mu_{q,e} - \mu_{m,e})^2 / \sigma_{m,e}^2\big)^{1/2} < 2`; reported as
  covered / total modes and the mass of the covered modes (mean over members);
* **VI Pareto** :math:`\hat k` of a guide with a density (:func:`rank1_pyro.diagnostics.vi_khat` on the
  training data; NaN for point masses and Laplace).

The HMC reference of member k mixes its modes with their weights (draws taken from each mode in
proportion to its weight), so a chain stuck in a mode of negligible mass does not distort it.
:meth:`Comparison.report` prints the table and names the approximation closest to HMC (smallest
predictive KL); :func:`plot_marginals` and :func:`plot_std_ratios` draw the figures.

One concept, one module (hence over 400 lines): the comparison of approximate posteriors against the HMC reference: its metrics, table and figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from torch import nn

from ._checks import number, positive_int
from .inference.predictive import SAMPLE_DIM, Rank1Posterior, _module_mode, predict
from .layers import factor_sites

__all__ = [
    "DrawsPosterior",
    "factor_draws",
    "hmc_reference",
    "compare_to_hmc",
    "Comparison",
    "markdown_table",
    "plot_marginals",
    "plot_std_ratios",
    "COVER_DISTANCE",
]

#: a component covers an HMC mode when its mean is within this RMS standardized distance of the mode's
COVER_DISTANCE = 2.0


class DrawsPosterior:
    """A :class:`~rank1_pyro.inference.Posterior` from fixed factor draws ``{site: (S, K, 1, size)}``.

    ``sample_log_predictions(x, n)`` runs the model at the first ``n`` draws (all S when ``n``
    is larger), vectorized under the samples plate, in eval mode without gradients.
    """

    def __init__(self, model: nn.Module, draws: dict, max_rows: int = 8192):
        if not draws:
            raise ValueError("draws: no factor draws given")
        sizes = {v.shape[0] for v in draws.values()}
        if len(sizes) != 1:
            raise ValueError(f"draws: every site needs the same number of draws, got {sorted(sizes)}")
        self.model, self.draws = model, draws
        self.likelihood = model.likelihood
        self.num_draws = sizes.pop()
        self.max_rows = positive_int("max_rows", max_rows)

    @property
    def device(self) -> torch.device:
        return next(iter(self.draws.values())).device

    @torch.no_grad()
    def sample_log_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Log class probabilities ``(n, K, B, C)`` at the first ``n = min(num_samples, S)`` draws."""
        n = min(positive_int("num_samples", num_samples), self.num_draws)
        chunk = max(1, self.max_rows // (self.model.ensemble_size * x.shape[0]))
        pieces = []
        helper = Rank1Posterior(self.model, None)
        with _module_mode((self.model,), training=False):
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                latents = {name: v[start : start + m] for name, v in self.draws.items()}
                with pyro.plate("samples", m, dim=SAMPLE_DIM):
                    out = helper.outputs_given(x, latents)
                pieces.append(torch.log_softmax(out.expand(m, *out.shape[-3:]), dim=-1))
        return torch.cat(pieces)

    def sample_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        return self.sample_log_predictions(x, num_samples).exp()


def _laplace_draws(model, la, num_samples: int) -> dict:
    """Draws of a :class:`~rank1_pyro.laplace.SubnetLaplace` over a rank-1 point network as factor draws."""
    full = la.full
    theta = full.full_map.unsqueeze(0).repeat(num_samples, 1)
    theta[:, la.subnetwork_indices.to(theta.device)] = la.sample(num_samples).to(theta.dtype)
    draws = {}
    for name, chunk, shape in zip(full.param_names, theta.split(full.numels, dim=1), full.shapes):
        if name.startswith("factors."):
            draws[name[len("factors.") :].replace("__", ".")] = chunk.reshape(num_samples, *shape)
    if not draws:
        raise ValueError("laplace: its network has no 'factors.*' parameters (use rank1_point_network(model, guide))")
    return draws


def factor_draws(model: nn.Module, posterior, num_samples: int, x: torch.Tensor | None = None) -> dict:
    """``num_samples`` draws of every factor site of ``model`` from ``posterior``: ``{site: (S, K, 1, size)}``.

    ``posterior``: a guide or :class:`~rank1_pyro.inference.Rank1Posterior` (any guide, autoguides
    included), a :class:`~rank1_pyro.laplace.SubnetLaplace` over a
    :func:`~rank1_pyro.laplace.rank1_point_network` (factor entries outside its subnetwork stay at their
    means), or a dict of draws (returned as it is, checked). ``x``: an input batch the guide may need.
    """
    positive_int("num_samples", num_samples)
    names = [s.name for s in factor_sites(model)]
    if isinstance(posterior, dict):
        draws = posterior
    elif hasattr(posterior, "subnetwork_indices") and hasattr(posterior, "full"):
        with torch.no_grad():
            draws = _laplace_draws(model, posterior, num_samples)
    else:
        if not isinstance(posterior, Rank1Posterior):
            if not callable(posterior):
                raise TypeError(
                    "posterior must be a guide, a Rank1Posterior, a SubnetLaplace over rank1_point_network or a "
                    f"dict of factor draws, got {type(posterior).__name__}"
                )
            posterior = Rank1Posterior(model, posterior)
        if x is None:
            raise ValueError("x: a guide needs an input batch to be run (any batch of the data)")
        with torch.no_grad(), _module_mode((posterior.model, posterior.guide), training=False):
            latents = posterior.sample_latents(x[:1], num_samples)
        draws = {}
        for name in names:
            if name in latents:
                value = latents[name].detach()
                draws[name] = value.expand(num_samples, *value.shape[-3:]) if value.dim() == 3 else value
    missing = [n for n in names if n not in draws]
    if missing:
        raise ValueError(f"the posterior gives no draws of the factor sites {missing}")
    return {n: draws[n].detach() for n in names}


def _site_layout(model) -> list[tuple[str, int]]:
    return [(s.name, s.size) for s in factor_sites(model)]


def _flat_member(draws: dict, layout, member: int) -> np.ndarray:
    """``(S, D)``: member ``member``'s factor entries, sites in ``layout`` order."""
    return np.concatenate(
        [draws[name][:, member].reshape(draws[name].shape[0], -1).double().cpu().numpy() for name, _ in layout], axis=1
    )


def hmc_reference(tree, model: nn.Module, max_draws: int = 512, modes: list | None = None):
    """The HMC reference of each sampled member: draws from its modes in proportion to their weights.

    Returns ``(draws, members, modes)``: factor draws ``{site: (n, K, 1, size)}`` (members not sampled
    by the chains hold 1), the sorted sampled members, and :func:`~rank1_pyro.inference.hmc.chain_modes`
    over the factor sites. ``n`` is at most ``max_draws``; a mode gets ``round(weight · n)`` of them,
    evenly spaced over its chains' draws.
    """
    from .inference.hmc import _member_indices, chain_modes

    positive_int("max_draws", max_draws)
    layout = _site_layout(model)
    names = [n for n, _ in layout]
    posterior = tree["posterior"]
    missing = [n for n in names if n not in posterior.data_vars]
    if missing:
        raise ValueError(f"the HMC tree has no draws of the model's factor sites {missing}: not this model's chains")
    modes = chain_modes(tree, var_names=names) if modes is None else modes
    members = sorted(_member_indices(tree))
    K = model.ensemble_size
    if max(members) >= K:
        raise ValueError(f"the HMC chains sampled member {max(members)}, the model has K = {K}")
    pooled = {k: sum(posterior.sizes["draw"] * len(m["chains"]) for m in modes if m["member"] == k) for k in members}
    n = min(max_draws, *pooled.values())
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    draws = {name: torch.ones(n, K, 1, size, dtype=dtype) for name, size in layout}
    for k in members:
        member_modes = [m for m in modes if m["member"] == k]
        counts = np.floor(np.array([m["weight"] for m in member_modes]) * n).astype(int)
        counts[int(np.argmax([m["weight"] for m in member_modes]))] += n - counts.sum()
        rows = 0
        for mode, count in zip(member_modes, counts):
            if count == 0:
                continue
            for name, size in layout:
                values = posterior[name].values[mode["chains"]].reshape(-1, size)
                pick = np.linspace(0, values.shape[0] - 1, count).round().astype(int)
                draws[name][rows : rows + count, k, 0] = torch.as_tensor(values[pick], dtype=dtype)
            rows += count
    return draws, members, modes


@dataclass
class Comparison:
    """The result of :func:`compare_to_hmc`: ``rows`` (one dict per posterior, ``"hmc"`` first),
    per-entry moments for the figures, the HMC modes and convergence, and the settings."""

    rows: list
    entry_names: list
    members: list
    hmc_moments: dict  # member -> (mean (D,), sd (D,))
    moments: dict  # method -> member -> (mean (D,), sd (D,))
    hmc_samples: dict  # member -> (n, D) reference draws (for the marginal plots)
    samples: dict  # method -> member -> (S, D) draws
    modes: list
    convergence: dict
    settings: dict = field(default_factory=dict)

    @property
    def closest(self) -> str:
        """The approximation with the smallest predictive KL to HMC."""
        rows = [r for r in self.rows if r["method"] != "hmc"]
        return min(rows, key=lambda r: r["predictive_kl"])["method"]

    def table(self) -> str:
        """The rows as a Markdown table (:func:`markdown_table`)."""
        return markdown_table(self.rows)

    def report(self) -> str:
        """The table, the HMC chains' convergence and modes, and which approximation is closest."""
        lines = [
            f"Approximate posteriors against HMC over the rank-1 factors (members {self.members}; "
            f"{self.settings.get('test_examples', '?')} test examples)",
            "",
            self.table(),
            "",
            "HMC convergence per member: "
            + "; ".join(
                f"member {k}: {c['chains']} chains, max R-hat {c['r_hat_max']:.3f}, min bulk ESS "
                f"{c['ess_bulk_min']:.0f}, {c['divergences']} divergences"
                for k, c in self.convergence.items()
            ),
            "HMC modes: "
            + "; ".join(
                f"member {m['member']}: chains {m['chains']}, mean log p(theta, D) {m['lp']:.1f}, weight {m['weight']:.3g}"
                for m in self.modes
            ),
        ]
        rows = [r for r in self.rows if r["method"] != "hmc"]
        if rows:
            best = min(rows, key=lambda r: r["predictive_kl"])
            by_std = min(rows, key=lambda r: abs(math.log(max(r["std_ratio_median"], 1e-12))))
            lines.append(
                f"Closest to HMC by the predictive: {best['method']} (mean KL {best['predictive_kl']:.5f} nats, NLL "
                f"{best['nll']:.4f} against HMC's {self.rows[0]['nll']:.4f}); by the marginal stds: "
                f"{by_std['method']} (median std ratio {by_std['std_ratio_median']:.2f})."
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """The JSON-ready part: rows, modes (without per-entry arrays), convergence, settings; NaN as ``None``."""
        modes = [{k: v for k, v in m.items() if k not in ("mean", "sd")} for m in self.modes]
        return _jsonable(
            {
                "rows": self.rows,
                "closest": self.closest if len(self.rows) > 1 else None,
                "members": self.members,
                "modes": modes,
                "convergence": {str(k): v for k, v in self.convergence.items()},
                "settings": self.settings,
            }
        )


def _number(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown_table(rows: list) -> str:
    """Rows of :func:`compare_to_hmc` (or of its JSON, where NaN is ``null``) as a Markdown table."""
    head = (
        "| posterior | NLL | accuracy | ECE | predictive KL to HMC | mean error (HMC sd) | std ratio median "
        "[10%, 90%] | modes covered | mass covered | VI k-hat |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        ratio = (
            f"{_number(r['std_ratio_median'], '.2f')} [{_number(r['std_ratio_q10'], '.2f')}, "
            f"{_number(r['std_ratio_q90'], '.2f')}]"
        )
        lines.append(
            f"| {r['method']} | {_number(r['nll'], '.4f')} | {_number(r['accuracy'], '.4f')} | {_number(r['ece'], '.4f')} "
            f"| {_number(r['predictive_kl'], '.5f')} | {_number(r['mean_error_median'], '.2f')} | {ratio} "
            f"| {r['modes_covered']}/{r['modes_total']} | {_number(r['mass_covered'], '.2f')} | {_number(r['khat'], '.2f')} |"
        )
    return "\n".join(lines)


def _jsonable(obj):
    """NumPy scalars as Python numbers, non-finite floats as ``None`` (strict JSON), recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _metrics(log_probs: torch.Tensor, y: torch.Tensor) -> dict:
    from .metrics import classification_metrics

    return classification_metrics(log_probs.exp().float(), y, log_probs)


def _mixture_log_probs(log_samples: torch.Tensor, members: list) -> torch.Tensor:
    """``(S, K, N, C)`` -> log of the mixture over draws and the chosen members ``(N, C)`` (float64)."""
    chosen = log_samples[:, members].double().flatten(0, 1)
    return torch.logsumexp(chosen, dim=0) - math.log(chosen.shape[0])


def _is_point_mass(draws: np.ndarray) -> bool:
    return bool(np.all(draws.std(0) == 0))


def _khat(model, posterior, train_data, num_samples: int) -> float:
    from .diagnostics import log_density_ratios, vi_khat

    guide = posterior.guide if isinstance(posterior, Rank1Posterior) else posterior
    if isinstance(posterior, dict) or hasattr(posterior, "subnetwork_indices") or not callable(guide):
        return float("nan")
    try:
        return vi_khat(log_density_ratios(model, guide, train_data, num_samples=num_samples))
    except ValueError:  # point masses: no density
        return float("nan")


def compare_to_hmc(
    model: nn.Module,
    approximations: dict,
    hmc_tree,
    train_data,
    test_data,
    *,
    num_samples: int = 256,
    khat_samples: int = 64,
    reference_draws: int = 512,
    cover_distance: float = COVER_DISTANCE,
    batch_size: int = 512,
    seed: int = 0,
) -> Comparison:
    """Compare approximate posteriors of ``model``'s factors with its HMC chains (module docstring).

    Args:
        model: the trained :class:`~rank1_pyro.models.Rank1Model` (classification) all the
            posteriors belong to.
        approximations: name -> a guide, a :class:`~rank1_pyro.inference.Rank1Posterior`, a
            :class:`~rank1_pyro.laplace.SubnetLaplace` over the ``"rank1-factors"`` of
            :func:`~rank1_pyro.laplace.rank1_point_network`, or factor draws ``{site: (S, K, 1, size)}``.
        hmc_tree: the DataTree of :func:`~rank1_pyro.inference.hmc.hmc_to_datatree` (with ``sample_stats``)
            for this model, or several of them joined by
            :func:`~rank1_pyro.inference.hmc.concat_chains`.
        train_data: ``(x, y)``, for the VI k-hat (the whole training set).
        test_data: ``(x, y)``, held-out data for the predictive metrics.
        num_samples: draws per component for the moments and the predictive.
        khat_samples: draws per component for the k-hat (K · khat_samples ≥ 25).
        reference_draws: at most this many HMC draws per member for the reference predictive.
        cover_distance: the RMS standardized distance under which a component covers a mode.
        seed: ``pyro.set_rng_seed(seed)`` before each approximation's draws.
    """
    from .inference.hmc import convergence as hmc_convergence

    if getattr(model, "likelihood", None) != "categorical":
        raise ValueError(
            "compare_to_hmc compares classification models (likelihood='categorical'); for regression compare "
            "the posterior moments with rank1_pyro.inference.hmc.hmc_summary"
        )
    if not isinstance(approximations, dict) or not approximations:
        raise ValueError("approximations must be a non-empty dict {name: posterior}")
    if "hmc" in approximations:
        raise ValueError("approximations: the name 'hmc' is the reference's; choose another")
    positive_int("num_samples", num_samples)
    positive_int("khat_samples", khat_samples)
    number("cover_distance", cover_distance, strict=True)
    if not hasattr(hmc_tree, "children") or "posterior" not in hmc_tree.children:
        raise TypeError("hmc_tree must be the DataTree of hmc_to_datatree (with a posterior group)")
    x_test, y_test = test_data
    x_train = train_data[0]
    layout = _site_layout(model)
    entry_names = [f"{name}[{i}]" for name, size in layout for i in range(size)]

    ref_draws, members, modes = hmc_reference(hmc_tree, model, reference_draws)
    ref_log = predict(DrawsPosterior(model, ref_draws), x_test, num_samples=reference_draws, batch_size=batch_size)
    ref_lp = _mixture_log_probs(ref_log.log_samples, members)
    hmc_samples = {k: _flat_member(ref_draws, layout, k) for k in members}
    hmc_moments = {k: (v.mean(0), v.std(0)) for k, v in hmc_samples.items()}
    conv = hmc_convergence(hmc_tree)
    ref_metrics = _metrics(ref_lp, y_test)
    rows = [
        {
            "method": "hmc",
            **{k: ref_metrics[k] for k in ("nll", "accuracy", "ece")},
            "predictive_kl": 0.0,
            "mean_error_median": 0.0,
            "std_ratio_median": 1.0,
            "std_ratio_q10": 1.0,
            "std_ratio_q90": 1.0,
            "modes_covered": len(modes),
            "modes_total": len(modes),
            "mass_covered": 1.0,
            "khat": float("nan"),
        }
    ]
    moments, samples = {}, {}
    for name, posterior in approximations.items():
        pyro.set_rng_seed(seed)
        draws = factor_draws(model, posterior, num_samples, x_train)
        pred = predict(DrawsPosterior(model, draws), x_test, num_samples=num_samples, batch_size=batch_size)
        lp = _mixture_log_probs(pred.log_samples, members)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()
        m = _metrics(lp, y_test)
        samples[name] = {k: _flat_member(draws, layout, k) for k in members}
        moments[name] = {k: (v.mean(0), v.std(0)) for k, v in samples[name].items()}
        errors, ratios, covered, total, mass = [], [], 0, 0, []
        for k in members:
            mean_q, sd_q = moments[name][k]
            mean_h, sd_h = hmc_moments[k]
            sd_h = np.maximum(sd_h, 1e-300)
            errors.append(np.abs(mean_q - mean_h) / sd_h)
            ratios.append(sd_q / sd_h)
            member_mass = 0.0
            for mode in (m_ for m_ in modes if m_["member"] == k):
                total += 1
                distance = np.sqrt(np.mean((mean_q - mode["mean"]) ** 2 / np.maximum(mode["sd"], 1e-300) ** 2))
                if distance < cover_distance:
                    covered += 1
                    member_mass += mode["weight"]
            mass.append(member_mass)
        errors, ratios = np.concatenate(errors), np.concatenate(ratios)
        pyro.set_rng_seed(seed)
        khat = _khat(model, posterior, train_data, khat_samples)
        rows.append(
            {
                "method": name,
                **{k: m[k] for k in ("nll", "accuracy", "ece")},
                "predictive_kl": kl,
                "mean_error_median": float(np.median(errors)),
                "std_ratio_median": float(np.median(ratios)),
                "std_ratio_q10": float(np.quantile(ratios, 0.1)),
                "std_ratio_q90": float(np.quantile(ratios, 0.9)),
                "modes_covered": covered,
                "modes_total": total,
                "mass_covered": float(np.mean(mass)),
                "khat": khat,
                "point_mass": all(_is_point_mass(v) for v in samples[name].values()),
            }
        )
    settings = {
        "num_samples": num_samples,
        "khat_samples": khat_samples,
        "reference_draws": int(next(iter(ref_draws.values())).shape[0]),
        "cover_distance": cover_distance,
        "test_examples": int(x_test.shape[0]),
        "train_examples": int(x_train.shape[0]),
        "factor_entries_per_member": len(entry_names),
    }
    return Comparison(rows, entry_names, members, hmc_moments, moments, hmc_samples, samples, modes, conv, settings)


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        try:
            matplotlib.use("Agg")
        except Exception:  # noqa: BLE001 - an interactive session keeps its backend
            pass
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does not exist")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _chosen_entries(comparison: Comparison, member: int, entries: int) -> list[int]:
    """Per factor site, the entry with the largest HMC sd; then the next largest, up to ``entries``."""
    _, sd = comparison.hmc_moments[member]
    sites = [name.split("[")[0] for name in comparison.entry_names]
    order = np.argsort(-sd)
    chosen, seen = [], set()
    for i in order:
        if sites[i] not in seen:
            chosen.append(int(i))
            seen.add(sites[i])
    chosen += [int(i) for i in order if int(i) not in chosen]
    return chosen[:entries]


def plot_marginals(comparison: Comparison, path, *, member: int | None = None, entries: int = 4, methods=None) -> Path:
    """Marginal densities of a few factor entries of one member: HMC (histogram) against each
    approximation's component (kernel density estimate of its draws; a vertical line for a point mass).

    The entries are, per factor site, the one with the largest HMC sd.
    """
    from scipy.stats import gaussian_kde

    positive_int("entries", entries)
    member = comparison.members[0] if member is None else member
    if member not in comparison.hmc_samples:
        raise ValueError(f"member {member}: the HMC chains sampled members {comparison.members}")
    methods = list(comparison.samples) if methods is None else list(methods)
    plt = _pyplot()
    chosen = _chosen_entries(comparison, member, entries)
    cols = min(len(chosen), 2)
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, e in zip(axes.flat, chosen):
        ref = comparison.hmc_samples[member][:, e]
        ax.hist(ref, bins=40, density=True, color="0.8", edgecolor="0.55", label="HMC (reference)")
        lo, hi = np.quantile(ref, [0.001, 0.999])
        width = hi - lo if hi > lo else 1.0
        grid = np.linspace(lo - 0.5 * width, hi + 0.5 * width, 300)
        for i, name in enumerate(methods):
            values = comparison.samples[name][member][:, e]
            color = colors[i % len(colors)]
            if values.std() == 0 or values.std() < 1e-9 * max(1.0, abs(values.mean())):
                ax.axvline(values.mean(), color=color, linestyle="--", label=f"{name} (point mass)")
            else:
                ax.plot(grid, gaussian_kde(values)(grid), color=color, label=name)
        ax.set_title(f"{comparison.entry_names[e]}, member {member}")
        ax.set_xlabel("factor value")
        ax.set_ylabel("density")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.02 - 0.03 * rows))
    fig.suptitle(f"Marginal posteriors of rank-1 factors: approximations (component {member}) against HMC")
    fig.tight_layout()
    return _save(fig, path)


def plot_std_ratios(comparison: Comparison, path, *, methods=None) -> Path:
    """Histogram over all factor entries (of the sampled members) of :math:`\\log_2(\\sigma_q / \\sigma_{\\rm HMC})`
    per approximation; point masses (σ = 0) are left out and named in the legend."""
    plt = _pyplot()
    methods = list(comparison.samples) if methods is None else list(methods)
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    logs = {}
    for name in methods:
        ratios = np.concatenate(
            [
                comparison.moments[name][k][1] / np.maximum(comparison.hmc_moments[k][1], 1e-300)
                for k in comparison.members
            ]
        )
        logs[name] = np.log2(ratios) if np.all(ratios > 0) else None
    finite = np.concatenate([v for v in logs.values() if v is not None] or [np.zeros(1)])
    lo, hi = min(-1.0, float(np.quantile(finite, 0.005))), max(1.0, float(np.quantile(finite, 0.995)))
    bins = np.linspace(lo, hi, 50)
    for name, values in logs.items():
        if values is None:
            ax.plot([], [], " ", label=f"{name}: point masses (std 0), not shown")
            continue
        ax.hist(np.clip(values, lo, hi), bins=bins, histtype="step", linewidth=1.6, label=name)
    ax.axvline(0.0, color="k", linestyle=":", label="ratio 1 (exact)")
    ax.set_xlabel("log₂(std of the approximation / std of HMC), per factor entry")
    ax.set_ylabel("factor entries")
    ax.set_title("Marginal standard deviations of the rank-1 factors relative to HMC")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return _save(fig, path)
