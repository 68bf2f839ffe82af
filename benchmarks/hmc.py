"""The approximate posteriors of one trained rank-1 MLP against an HMC reference over its factors.

    python benchmarks/hmc.py                  # about 20 minutes on one core; writes docs/results/hmc.json
    python benchmarks/hmc.py --update-docs    # ... and the "HMC reference" section of docs/benchmarks.md
    python benchmarks/hmc.py --quick          # a few minutes: fewer draws, one member (a smoke test)
    python benchmarks/hmc.py --docs-only      # the docs section again from docs/results/hmc.json

The model: a rank-1 MLP 16-16-10 (K = 4 members, prior N(1, 0.1²)) on scikit-learn's digits with
the 8×8 images average-pooled to 4×4 (16 features), so that NUTS over the factors (58 per member)
on all 1,198 training images fits in minutes. It is trained with the mixture guide and the
averaged ELBO (W, biases and guide together); then W and the biases are frozen and every other
approximation is fitted to the factors of *that* network, each component k started at the trained
component k's mean (so all of them describe the same modes the HMC chains start in):

==============================  ==========================================================================
``mixture (averaged ELBO)``     the trained mixture guide itself
``mixture (mixture ELBO)``      a new mixture guide, trained with the mixture ELBO
``BatchEnsemble (Delta)``       point estimates (``DeltaGuide``, averaged ELBO: each member's MAP)
``AutoNormal``                  Pyro's mean-field autoguide over all members' factors
``AutoLowRankMVN``              Pyro's low-rank (rank 10) plus diagonal Gaussian over all factors
``Laplace (factors)``           the library's full-covariance Laplace over all factors at the Delta fit
                                (``rank1_point_network`` + ``"rank1-factors"``, prior N(1, 0.1²)), whose
                                likelihood is the members' *average* (weight 1/K per member)
``Laplace (per member)``        the same Hessian with each member's own likelihood: δ = 1/(K σ²) and
                                deviations scaled by K^{-1/2}, i.e. precision H_k + 1/σ²
==============================  ==========================================================================

HMC: for each member, one NUTS chain from the trained component's mean and one from a prior draw
(``--samples`` draws after as many warmup iterations, float64, the potential traced by
``torch.jit``), one chain after another on one thread. :func:`rank1_pyro.comparison.compare_to_hmc`
then compares everything on the 599 test images.

Results are written as they come: the trained networks and each member's chains are kept in
``--work`` (default ``benchmarks/results/hmc/``) and reused by a rerun with the same settings, and
``docs/results/hmc.json`` is rewritten after every stage; figures go to ``docs/images/hmc-*.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rank1_pyro import AveragedELBO, DeltaGuide, Gaussian, MixtureELBO, MixtureGuide, rank1_mlp  # noqa: E402
from rank1_pyro.comparison import compare_to_hmc, plot_marginals, plot_std_ratios  # noqa: E402
from rank1_pyro.data import load_digits  # noqa: E402
from rank1_pyro.diagnostics import from_netcdf, to_netcdf  # noqa: E402
from rank1_pyro.inference.hmc import concat_chains, convergence, run_hmc  # noqa: E402
from rank1_pyro.inference.train import train  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "hmc.json"
IMAGES = ROOT / "docs" / "images"
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- hmc-table:start -->", "<!-- hmc-table:end -->"
PRIOR_SCALE = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=500, help="NUTS draws per chain, after as many warmup (default 500)")
    p.add_argument("--members", type=int, nargs="+", default=None, help="members sampled by HMC (default: all 4)")
    p.add_argument("--ensemble-size", type=int, default=4, help="K (default 4)")
    p.add_argument("--hidden", type=int, default=16, help="hidden units (default 16)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs of every guide (default 100)")
    p.add_argument("--draws", type=int, default=256, help="draws per component in the comparison (default 256)")
    p.add_argument("--random-starts", type=int, default=1, help="HMC chains per member from prior draws (default 1)")
    p.add_argument(
        "--sign-starts", type=int, default=0, help="HMC chains per member from random ±1 factors (default 0)"
    )
    p.add_argument(
        "--init-sign-prob",
        type=float,
        default=None,
        help="the trained mixture guide's random-sign init P(+1) (default: none, every component starts at 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "hmc", help="cache directory")
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON written (default docs/results/hmc.json)")
    p.add_argument("--images", type=Path, default=IMAGES, help="where the figures go (default docs/images)")
    p.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/benchmarks.md")
    p.add_argument("--docs-only", action="store_true", help="only rewrite the docs table from --results")
    p.add_argument("--quick", action="store_true", help="smoke test: 60 draws, member 0, 20 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.members, args.epochs, args.draws = 60, [0], 20, 64
    return args


def pooled_digits(seed: int):
    """Digits with the 8×8 images average-pooled to 4×4 and standardized (training statistics)."""
    split = load_digits(seed=seed)

    def pool(x):
        return F.avg_pool2d(x, 2).flatten(1)

    x_train, x_test = pool(split.x_train), pool(split.x_test)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    return ((x_train - mean) / std, split.y_train), ((x_test - mean) / std, split.y_test)


def fit(model, guide, data, objective, epochs: int, seed: int, lr: float = 1e-2):
    began = time.perf_counter()
    train(model, guide, data, objective=objective, epochs=epochs, batch_size=64, lr=lr, progress=False, seed=seed)
    return time.perf_counter() - began


def start_at(guide, means: dict) -> None:
    """Put every component's location of a rank-1 guide at the trained component means."""
    with torch.no_grad():
        for name, value in means.items():
            guide.loc[name.replace(".", "__")].copy_(value)


def build(args, train_data):
    """The trained model and every approximation (cached in --work); returns (model, approximations, seconds)."""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
    from pyro.infer.autoguide.initialization import init_to_value

    from rank1_pyro.laplace import SubnetLaplace, rank1_point_network

    K = args.ensemble_size
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    model = rank1_mlp(16, [args.hidden], 10, ensemble_size=K, prior=Gaussian(1.0, PRIOR_SCALE))
    base = MixtureGuide(model, init_sign_prob=args.init_sign_prob)
    mix = MixtureGuide(model, init_sign_prob=args.init_sign_prob)
    delta = DeltaGuide(model)
    cache = args.work / f"models-{fingerprint(args, 'models')}.pt"
    seconds = {}
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        model.load_state_dict(saved["model"])
        for name, guide in (("base", base), ("mix", mix), ("delta", delta)):
            guide.load_state_dict(saved[name])
        seconds = saved["seconds"]
    else:
        seconds["mixture (averaged ELBO)"] = fit(model, base, train_data, AveragedELBO(), args.epochs, args.seed)
    for p in model.parameters():  # W and the biases: fixed from here on
        p.requires_grad_(False)
    means = base.median()
    init = {name: value.clone() for name, value in means.items()}
    if not cache.is_file():
        start_at(mix, means)
        seconds["mixture (mixture ELBO)"] = fit(model, mix, train_data, MixtureELBO(), args.epochs, args.seed)
        start_at(delta, means)
        seconds["BatchEnsemble (Delta)"] = fit(model, delta, train_data, AveragedELBO(), args.epochs, args.seed)
        torch.save(
            {
                "model": model.state_dict(),
                "base": base.state_dict(),
                "mix": mix.state_dict(),
                "delta": delta.state_dict(),
                "seconds": seconds,
            },
            cache,
        )
    approximations = {"mixture (averaged ELBO)": base, "mixture (mixture ELBO)": mix, "BatchEnsemble (Delta)": delta}
    # the autoguides hold parameters in Pyro's param store: trained here every run (about a minute each)
    for name, make in (
        ("AutoNormal", lambda: AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.0316)),
        (
            "AutoLowRankMVN",
            lambda: AutoLowRankMultivariateNormal(
                model, init_loc_fn=init_to_value(values=init), init_scale=0.0316, rank=10
            ),
        ),
    ):
        pyro.set_rng_seed(args.seed)
        guide = make()
        seconds[name] = fit(model, guide, train_data, AveragedELBO(), args.epochs, args.seed)
        approximations[name] = guide
    began = time.perf_counter()
    network = rank1_point_network(model, delta)
    laplace = SubnetLaplace(
        network, "classification", "rank1-factors", prior_precision=1 / PRIOR_SCALE**2, prior_mean=1.0, predictive="nn"
    ).fit(train_data)
    seconds["Laplace (factors)"] = seconds["BatchEnsemble (Delta)"] + time.perf_counter() - began
    approximations["Laplace (factors)"] = laplace
    began = time.perf_counter()
    per_member = SubnetLaplace(
        network,
        "classification",
        "rank1-factors",
        prior_precision=1 / (K * PRIOR_SCALE**2),
        prior_mean=1.0,
        predictive="nn",
    ).fit(train_data)
    approximations["Laplace (per member)"] = per_member_draws(per_member, args.draws, K)
    seconds["Laplace (per member)"] = seconds["BatchEnsemble (Delta)"] + time.perf_counter() - began
    return model, approximations, seconds, base


def per_member_draws(la, num_samples: int, K: int) -> dict:
    r"""Draws of :math:`\mathcal N(\theta_*, (H_k + \sigma^{-2} I)^{-1})` per member from a Laplace fitted with the
    members' average likelihood (GGN :math:`H/K`) and δ = 1/(Kσ²): its covariance is
    :math:`K (H_k + \sigma^{-2})^{-1}`, so deviations scaled by :math:`K^{-1/2}` have the right one."""
    from rank1_pyro.comparison import factor_draws

    mean = {n: v.unsqueeze(0) for n, v in factor_draws_mean(la).items()}
    draws = factor_draws(la.model.model, la, num_samples)
    return {n: mean[n] + (v - mean[n]) / math.sqrt(K) for n, v in draws.items()}


def factor_draws_mean(la) -> dict:
    return {key.replace("__", "."): value.detach() for key, value in la.model.factors.items()}


def fingerprint(args, stage: str) -> str:
    keys = {"stage": stage, "K": args.ensemble_size, "hidden": args.hidden, "epochs": args.epochs, "seed": args.seed}
    keys["init_sign_prob"] = args.init_sign_prob
    if stage == "hmc":
        keys.update(samples=args.samples, random_starts=args.random_starts, sign_starts=args.sign_starts)
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]


def clean(obj):
    """Strict JSON: NumPy scalars as numbers, NaN and infinities as null."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean(results), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def sample_member(args, model, base, train_data, k: int) -> tuple:
    """Member k's chains (cached as netCDF in --work): (DataTree, seconds)."""
    path = args.work / f"hmc-{fingerprint(args, 'hmc')}-member{k}.nc"
    if path.is_file():
        tree = from_netcdf(path)
        return tree, float(tree.attrs.get("seconds", float("nan")))
    began = time.perf_counter()
    runs = [("prior", args.random_starts, base), ("signs", args.sign_starts, None)]
    trees, chain_seconds = [], []
    for how, starts, guide in runs:
        if starts == 0 and guide is None:
            continue
        result = run_hmc(
            model,
            train_data,
            guide=guide,
            members=[k],
            random_starts=starts,
            random_init=how,
            num_samples=args.samples,
            seed=args.seed + 100 * k + (50 if how == "signs" else 0),
            progress=True,
        )
        trees.append(result.to_datatree())
        chain_seconds += [float(x) for x in result.seconds]
    tree = concat_chains(trees)
    seconds = time.perf_counter() - began
    tree.attrs["seconds"] = seconds
    tree.attrs["chain_seconds"] = chain_seconds
    to_netcdf(tree, path)
    return tree, seconds


def markdown(results: dict) -> str:
    """The generated part of the docs section: command and run time, the table, and what it shows."""
    from rank1_pyro.comparison import markdown_table

    s, h, c = results["settings"], results["hmc"], results["comparison"]
    fits = results["fit_seconds"]  # each Laplace entry counts the Delta fit it starts from: counted once here
    fitting = sum(v for k, v in fits.items() if not k.startswith("Laplace")) + sum(
        v - fits["BatchEnsemble (Delta)"] for k, v in fits.items() if k.startswith("Laplace")
    )
    rows = c["rows"]
    approx = [r for r in rows if r["method"] != "hmc"]
    by_kl = sorted(approx, key=lambda r: r["predictive_kl"])
    best, second = by_kl[0], by_kl[1] if len(by_kl) > 1 else None
    spread = [r for r in approx if not r.get("point_mass")]
    by_std = min(spread, key=lambda r: abs(math.log(r["std_ratio_median"])))
    conv = c["convergence"]
    rhat = max(v["r_hat_max"] for v in conv.values() if v["r_hat_max"] is not None)
    ess = min(v["ess_bulk_min"] for v in conv.values())
    divergences = sum(v["divergences"] for v in conv.values())
    minor = [m for m in c["modes"] if m["weight"] < 0.01]
    chains = s["hmc_chains_per_member"]
    lines = [
        f"Command: `{results['command']}`: "
        + (f"{results['cpu_seconds'] / 60:.1f} min of CPU time on one thread, " if "cpu_seconds" in results else "")
        + f"{results['total_seconds'] / 60:.1f} min wall on a 2-core machine shared with other jobs (training and "
        f"fitting {fitting / 60:.1f} min, HMC {h['seconds'] / 60:.1f} min for {h['chains']} chains of {s['samples']} "
        f"draws after {s['samples']} warmup iterations); torch {results['versions']['torch']}, "
        f"pyro {results['versions']['pyro']}. "
        f"{s['model']}; {s['data']}; HMC chains per member: {chains['component mean']} from the trained component's "
        f"mean, {chains['prior draw']} from a prior draw, {chains['random signs']} from random signs; "
        f"{c['settings']['num_samples']} draws per component for the approximations.",
        "",
        markdown_table(rows),
        "",
        f"- HMC: largest R-hat over the members' chains {rhat:.3f}, smallest bulk ESS {ess:.0f}, "
        f"{divergences} divergent transitions; {len(c['modes'])} modes over {len(conv)} members"
        + (f", {len(minor)} of them with less than 1 % of their member's mass." if minor else "."),
        f"- Closest to HMC by the predictive: **{best['method']}**, mean KL {best['predictive_kl']:.5f} nats"
        + (
            f" ({second['predictive_kl'] / max(best['predictive_kl'], 1e-300):.1f}× less than the next, "
            f"{second['method']}, {second['predictive_kl']:.5f})"
            if second
            else ""
        )
        + f"; its test NLL {best['nll']:.4f} against HMC's {rows[0]['nll']:.4f}.",
        f"- Closest by the marginal standard deviations: **{by_std['method']}** (median ratio to HMC "
        f"{by_std['std_ratio_median']:.2f}, 10 %-90 % of the entries in [{by_std['std_ratio_q10']:.2f}, "
        f"{by_std['std_ratio_q90']:.2f}]).",
        "",
        "![Marginal posteriors of four factors of member 0: each approximation's component against the HMC "
        "histogram](images/hmc-marginals.png)",
        "",
        "![Histogram of log2 of the ratio of each approximation's marginal standard deviation to HMC's, over all "
        "factor entries](images/hmc-std-ratios.png)",
        "",
    ]
    return "\n".join(lines)


def update_docs(results: dict) -> None:
    text = DOCS.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOCS}: no {START} ... {END} markers; add the 'HMC reference' section first")
    head, rest = text.split(START, 1)
    DOCS.write_text(head + START + "\n" + markdown(results) + END + rest.split(END, 1)[1])
    print(f"updated {DOCS}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.docs_only:  # re-render the docs section from the results of a finished run
        results = json.loads(args.results.read_text())
        if results.get("stage") != "done":
            raise SystemExit(f"{args.results}: the run has not finished (stage {results.get('stage')!r})")
        update_docs(results)
        return 0
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    began, cpu_began = time.perf_counter(), time.process_time()
    train_data, test_data = pooled_digits(args.seed)
    K = args.ensemble_size
    members = list(range(K)) if args.members is None else args.members
    results = {
        "command": "python benchmarks/hmc.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "settings": {
            "data": "digits, 8x8 average-pooled to 4x4 (16 features), 1198 train / 599 test",
            "model": f"rank-1 MLP 16-{args.hidden}-10, K = {K}, prior N(1, {PRIOR_SCALE}^2)",
            "epochs": args.epochs,
            "samples": args.samples,
            "members": members,
            "draws": args.draws,
            "hmc_chains_per_member": {
                "component mean": 1,
                "prior draw": args.random_starts,
                "random signs": args.sign_starts,
            },
            "init_sign_prob": args.init_sign_prob,
            "seed": args.seed,
        },
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version()},
        "stage": "training",
    }
    write(results, args.results)
    model, approximations, fit_seconds, base = build(args, train_data)
    results["fit_seconds"] = fit_seconds
    results["stage"] = "hmc"
    write(results, args.results)
    print(f"fitted {len(approximations)} approximations in {sum(fit_seconds.values()):.0f} s", flush=True)

    trees, hmc_seconds = [], 0.0
    results["hmc"] = {"members": {}}
    for k in members:
        tree, seconds = sample_member(args, model, base, train_data, k)
        trees.append(tree)
        hmc_seconds += seconds
        results["hmc"]["members"][str(k)] = {**convergence(tree)[k], "seconds": seconds}
        write(results, args.results)
        print(f"member {k}: {results['hmc']['members'][str(k)]}", flush=True)
    tree = concat_chains(trees)
    results["hmc"].update({"seconds": hmc_seconds, "chains": int(tree["posterior"].sizes["chain"])})

    comparison = compare_to_hmc(
        model,
        approximations,
        tree,
        train_data,
        test_data,
        num_samples=args.draws,
        khat_samples=min(args.draws, 64),
        seed=args.seed,
    )
    args.images.mkdir(parents=True, exist_ok=True)
    plot_marginals(comparison, args.images / "hmc-marginals.png", member=members[0])
    plot_std_ratios(comparison, args.images / "hmc-std-ratios.png")
    results["comparison"] = comparison.to_dict()
    results["stage"] = "done"
    results["total_seconds"] = time.perf_counter() - began
    results["cpu_seconds"] = time.process_time() - cpu_began
    write(results, args.results)
    print()
    print(comparison.report())
    print(markdown(results))
    if args.update_docs:
        update_docs(results)
    print(f"wrote {args.results} and {args.images}/hmc-*.png ({results['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
