r"""Parameter counts of a rank-1 model against its deterministic network and a deep ensemble.

What is counted (every number is a count of scalar parameters; buffers such as BatchNorm
running statistics are not parameters):

* **deterministic**: all parameters of the deterministic network (weights, biases, BatchNorm
  affine parameters). torchvision's ResNet-50: 25,557,032.
* **factor sizes**: :math:`\sum_\ell (\text{in}_\ell + \text{out}_\ell)` over the rank-1 layers,
  the length of one member's :math:`r` and :math:`s` (an LSTM counts ``in + 4H`` for its input
  kernel and ``H + 4H`` for its recurrent kernel). ResNet-50 (53 convolutions + the dense
  layer): 52,139.
* **one mixture component**: a mean and a stddev for every factor entry, 2 × factor sizes.
  ResNet-50: 104,278 = 0.41 % of the deterministic network.
* **per-member extras**: what the rank-1 model holds beyond the deterministic weights: the
  per-member biases add K − 1 copies of every converted layer's bias (ResNet-50: 3 × 1,000 for
  the dense layer, its convolutions have no bias), and ``batchnorm="per_member"`` adds K − 1
  copies of every BatchNorm layer's affine parameters.
* **rank-1 model** = deterministic + per-member extras + K components: the model's own
  parameters (shared W and BatchNorm, per-member biases) plus the mixture guide's.
  ResNet-50, K = 4: 25,557,032 + 3,000 + 4 × 104,278 = 25,977,144 ≈ 25.98M (without the
  per-member biases it would be 25,974,144 ≈ 25.97M).
* **deep ensemble** = K × deterministic: ResNet-50, K = 4: 102,228,128 ≈ 102.2M.

The counts come from the converted model itself (:func:`~rank1_pyro.convert.rank1ize` and
:func:`~rank1_pyro.layers.factor_sites`), so they follow the conversion exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import convert
from ..layers import factor_sites

__all__ = ["ParameterCounts", "parameter_counts", "parameter_table", "count_parameters"]


def count_parameters(model: nn.Module, guide=None) -> int:
    """Trainable parameters of a model and its guide (W, biases, factor means and scales)."""
    modules = [model] + ([guide] if isinstance(guide, nn.Module) else [])
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a rank-1 model with K members (see the module docstring)."""

    ensemble_size: int
    deterministic: int
    factor_size: int
    member_extras: int

    @property
    def component(self) -> int:
        """One mixture component: mean and stddev of every r and s entry."""
        return 2 * self.factor_size

    @property
    def rank1(self) -> int:
        """The rank-1 model with its K-component mixture guide."""
        return self.deterministic + self.member_extras + self.ensemble_size * self.component

    @property
    def deep_ensemble(self) -> int:
        return self.ensemble_size * self.deterministic

    @property
    def overhead(self) -> int:
        """Parameters the rank-1 model adds to the deterministic network."""
        return self.rank1 - self.deterministic

    def percent(self, count: int) -> float:
        """``count`` as a percentage of the deterministic network."""
        return 100.0 * count / self.deterministic


def parameter_counts(net: nn.Module, ensemble_size: int = 4, **rank1ize_kwargs) -> ParameterCounts:
    """Count the parameters of ``rank1ize(net, ensemble_size, **rank1ize_kwargs)`` (``net`` is not modified)."""
    model = convert.rank1ize(net, ensemble_size, **rank1ize_kwargs)
    deterministic = _numel(net)
    return ParameterCounts(
        ensemble_size=ensemble_size,
        deterministic=deterministic,
        factor_size=sum(site.size for site in factor_sites(model)),
        member_extras=_numel(model) - deterministic,
    )


def _short(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return str(n)


def parameter_table(counts: ParameterCounts, name: str = "model") -> str:
    """A plain-text table of ``counts``: deterministic, rank-1, deep ensemble, overhead."""
    k = counts.ensemble_size
    rows = [
        ("deterministic network", counts.deterministic),
        ("rank-1 factor sizes (sum of in + out)", counts.factor_size),
        ("one mixture component (mean, stddev of r, s)", counts.component),
        ("per-member biases / BatchNorm beyond deterministic", counts.member_extras),
        (f"rank-1 model, K = {k} (W + biases + guide)", counts.rank1),
        (f"deep ensemble, K = {k}", counts.deep_ensemble),
        ("rank-1 overhead over deterministic", counts.overhead),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{name}: parameter counts, ensemble size K = {k}", ""]
    lines.append(f"{'':{width}}  {'parameters':>13}  {'':>8}  {'% of det.':>9}")
    for label, n in rows:
        lines.append(f"{label:{width}}  {n:>13,}  {_short(n):>8}  {counts.percent(n):>8.2f}%")
    return "\n".join(lines)
