"""Cost scaling of the null-space projected posterior, and the no-underfitting comparison on digits.

    python benchmarks/projected_scaling.py [--threads 1] [--device auto] [--skip-digits]
                                           [--out benchmarks/results/projected_scaling.json]

1. Parameters: time per sample (one projection sweep of one vector) of the plain (output-Jacobian)
   variant for three MLPs 32-[w, w]-10 (w = 128, 512, 1536) spanning > 100x in parameters; fitted log-log slope
   [target <= 1.15, i.e. linear].
2. Outputs: MLPs 32-[h]-O with O = 128, 256, 512 and h chosen so that P stays ~8,000, micro-batches
   of S = 4 examples. Per sample and sweep, both variants pay the same JVP/VJP (~S·P); the plain
   variant adds two (S·O)×k matmuls per micro-batch with the cached Gram eigenvectors, the
   loss-projected one S×S. Slopes in O: loss variant [target 0, |slope| <= 0.2], plain minus loss
   (the Gram part) [target 2, within 1.7..2.5, beside the slope of the same matmuls run bare: caches
   make O² flops take slightly more than O² time at these sizes]; plain total [informational: it
   approaches 2 as the Gram part comes to dominate].
3. Digits (scikit-learn, 1437 / 360 seeded split, MLP 64-128-10 tanh, MAP by Adam): accuracy, NLL
   and OOD AUROC (predictive entropy; digits vs shuffled-pixel digits and vs uniform noise) of the
   MAP, the projected posterior (output and loss variants, linearized and NN predictives) and a
   diagonal-GGN Laplace (laplace-torch) at the same prior precision α.

Timings are the minimum over repeats (the machine is shared); one intra-op thread by default, since
on a CPU shared with other jobs OpenMP threads oversubscribe it. Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from rank1_pyro import mlp
from rank1_pyro.inference import predict
from rank1_pyro.inference.distributed import resolve_device
from rank1_pyro.laplace import FlatFunctional, ProjectedPosterior
from rank1_pyro.metrics import accuracy, nll, ood_auroc


def slope(xs, ys) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = torch.tensor(xs, dtype=torch.float64).log(), torch.tensor(ys, dtype=torch.float64).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def time_per_sample(post: ProjectedPosterior, num_vectors: int, sweeps: int, repeats: int, device) -> float:
    """Seconds per vector and sweep of plain alternating projections (a fixed amount of work)."""
    V = torch.randn(num_vectors, post.num_params, device=device)
    post.project(V, num_iterations=1)  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        post.project(V, num_iterations=sweeps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / (num_vectors * sweeps)


def bare_gemm_seconds(blocks, num_vectors: int, repeats: int, device) -> float:
    """Seconds per vector and sweep of the two Gram matmuls alone, ``((C U) Λ⁻¹) Uᵀ`` per micro-batch:
    the reference for the Gram part (its measured slope shows what caches add to the O² flop count)."""
    C = [torch.randn(num_vectors, b.eigvecs.shape[0], device=device) for b in blocks]
    best = math.inf
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for c, b in zip(C, blocks):
            ((c @ b.eigvecs) * b.inv_eigvals) @ b.eigvecs.T
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / num_vectors


def timing_posterior(net, x, y, kind, micro_batch_size):
    post = ProjectedPosterior(
        net,
        alpha=1.0,
        kind=kind,
        solver="alternating",
        over_relaxation=False,
        micro_batch_size=micro_batch_size,
        chunk_size=32,
    )
    return post.fit((x, y))


def scaling_in_parameters(device, args):
    rows = []
    x = torch.randn(128, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    for width in (128, 512, 1536):
        torch.manual_seed(0)
        net = mlp(32, [width, width], 10, activation=nn.Tanh).to(device)
        post = timing_posterior(net, x, y, "output", 64)
        t = time_per_sample(post, 8, 2, args.repeats, device)
        rows.append({"width": width, "num_params": post.num_params, "seconds_per_sample_sweep": t})
    return rows, slope([r["num_params"] for r in rows], [r["seconds_per_sample_sweep"] for r in rows])


def scaling_in_outputs(device, args, target_params=8000):
    rows = []
    x = torch.randn(16, 32, device=device)
    for outputs in (128, 256, 512):
        hidden = max(1, round((target_params - outputs) / (33 + outputs)))
        torch.manual_seed(0)
        net = mlp(32, [hidden], outputs, activation=nn.Tanh).to(device)
        y = torch.randint(0, outputs, (16,), device=device)
        row = {"outputs": outputs, "hidden": hidden, "num_params": sum(p.numel() for p in net.parameters())}
        for kind in ("output", "loss"):
            post = timing_posterior(net, x, y, kind, 4)
            if kind == "output":
                post_blocks = post._blocks
            row[f"{kind}_seconds_per_sample_sweep"] = time_per_sample(post, 32, 2, args.repeats, device)
            row[f"{kind}_gram_size"] = post._blocks[0].eigvecs.shape[0]
        row["gram_part_seconds"] = max(
            row["output_seconds_per_sample_sweep"] - row["loss_seconds_per_sample_sweep"], 1e-12
        )
        row["bare_gemm_seconds"] = bare_gemm_seconds(post_blocks, 32, args.repeats, device)
        rows.append(row)
    outs = [r["outputs"] for r in rows]
    slopes = {
        "plain": slope(outs, [r["output_seconds_per_sample_sweep"] for r in rows]),
        "gram_part": slope(outs, [r["gram_part_seconds"] for r in rows]),
        "loss": slope(outs, [r["loss_seconds_per_sample_sweep"] for r in rows]),
        "bare_gemm": slope(outs, [r["bare_gemm_seconds"] for r in rows]),
    }
    return rows, slopes


def digits_problem(seed=0):
    """scikit-learn digits scaled to [0, 1], a seeded 1437 / 360 split, and two OOD sets
    (shuffled-pixel digits, uniform noise); tests/test_projected.py runs the same problem."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32)[perm], torch.tensor(y)[perm]
    x_test = X[1437:]
    ood = {"shuffled": x_test[:, torch.randperm(64, generator=g)], "noise": torch.rand(len(x_test), 64, generator=g)}
    return X[:1437], y[:1437], x_test, y[1437:], ood


def _entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _summary(probs, y_train, y_test):
    row = {
        "train_acc": accuracy(probs["train"], y_train),
        "train_nll": nll(probs["train"], y_train),
        "test_acc": accuracy(probs["test"], y_test),
        "test_nll": nll(probs["test"], y_test),
    }
    for name in ("shuffled", "noise"):
        row[f"auroc_{name}"] = ood_auroc(_entropy(probs["test"]), _entropy(probs[name]))
    return row


def digits_comparison(device, args):
    from laplace import Laplace

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test, ood = digits_problem()
    sets = {"train": x_train, "test": x_test, **ood}
    net = mlp(64, [128], 10, activation=nn.Tanh).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = x_train.to(device), y_train.to(device)
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(net(xt), yt) + sum(p.pow(2).sum() for p in net.parameters()) / len(xt)
        loss.backward()
        opt.step()
    results = {}
    with torch.no_grad():
        results["MAP"] = _summary({k: net(v.to(device)).softmax(-1).cpu() for k, v in sets.items()}, y_train, y_test)
    info = {}
    alpha = None
    for kind in ("output", "loss"):
        post = ProjectedPosterior(
            net, kind=kind, micro_batch_size=50, num_iterations=args.iterations, num_trace_probes=16
        )
        start = time.perf_counter()
        post.fit((x_train, y_train))
        fit_s = time.perf_counter() - start
        info[kind] = {
            "trace_estimate": post.trace_estimate,
            "trace_stderr": post.trace_stderr,
            "alpha": post.alpha,
            "num_params": post.num_params,
            "fit_seconds": fit_s,
            "trace_residual_first_last": [post.convergence[0].item(), post.convergence[-1].item()],
        }
        alpha = alpha or post.alpha
        for predictive in ("linearized", "nn"):
            post.predictive = predictive
            probs = {k: predict(post, v, num_samples=args.samples, batch_size=512).probs for k, v in sets.items()}
            results[f"projected-{kind} {predictive}"] = _summary(probs, y_train, y_test)
    # diagonal GGN Laplace at the output-projected posterior's α (laplace-torch), same S draws
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=256)
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="diag", prior_precision=alpha)
    la.fit(loader)
    f = FlatFunctional(net)
    theta = f.theta_map
    deltas = la.posterior_variance.sqrt() * torch.randn(args.samples, f.num_params, device=device)
    for predictive in ("linearized", "nn"):
        probs = {}
        with torch.no_grad():
            for k, v in sets.items():
                v = v.to(device)
                if predictive == "linearized":
                    out, jd = vmap(lambda d: f.jvp(v, d))(deltas)
                    out = out + jd
                else:
                    out = vmap(lambda d: f(theta + d, v))(deltas)
                probs[k] = out.softmax(-1).mean(0).cpu()
        results[f"diag-Laplace {predictive}"] = _summary(probs, y_train, y_test)
    return results, info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1; 0 keeps torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=50, help="projection iterations (digits)")
    parser.add_argument("--samples", type=int, default=32, help="posterior samples (digits)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/projected_scaling.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    report = {"device": str(device), "threads": torch.get_num_threads()}

    rows, s = scaling_in_parameters(device, args)
    report["parameters"] = {"rows": rows, "slope": s, "target": "<= 1.15"}
    print("\n1. time per sample and sweep vs parameters (output variant, 128 examples, S = 64, O = 10)")
    print(f"{'MLP':>18} {'P':>10} {'ms/sample/sweep':>16}")
    for r in rows:
        print(
            f"{f'32-[{r["width"]},{r["width"]}]-10':>18} {r['num_params']:>10,} {1e3 * r['seconds_per_sample_sweep']:>16.3f}"
        )
    local = [
        slope([a["num_params"], b["num_params"]], [a["seconds_per_sample_sweep"], b["seconds_per_sample_sweep"]])
        for a, b in zip(rows[:-1], rows[1:])
    ]
    report["parameters"]["local_slopes"] = local
    print(f"log-log slope in P: {s:.2f}   [target <= 1.15]; between neighbours: {', '.join(f'{v:.2f}' for v in local)}")

    rows, slopes = scaling_in_outputs(device, args)
    report["outputs"] = {
        "rows": rows,
        "slopes": slopes,
        "targets": {"gram_part": "2 (1.7..2.5)", "loss": "0 (|slope| <= 0.2)", "plain": "informational"},
    }
    print("\n2. time per sample and sweep vs outputs O (P ~ 8,000, 16 examples, S = 4)")
    print(
        f"{'O':>5} {'hidden':>7} {'P':>7} {'Gram plain':>11} {'Gram loss':>10} {'plain ms':>9} {'loss ms':>8} "
        f"{'plain-loss ms':>14} {'bare GEMMs ms':>14}"
    )
    for r in rows:
        print(
            f"{r['outputs']:>5} {r['hidden']:>7} {r['num_params']:>7,} {r['output_gram_size']:>11} {r['loss_gram_size']:>10} "
            f"{1e3 * r['output_seconds_per_sample_sweep']:>9.3f} {1e3 * r['loss_seconds_per_sample_sweep']:>8.3f} "
            f"{1e3 * r['gram_part_seconds']:>14.3f} {1e3 * r['bare_gemm_seconds']:>14.3f}"
        )
    print(
        f"log-log slopes in O: Gram part (plain - loss) {slopes['gram_part']:.2f} [target 2: 1.7..2.5; bare GEMMs "
        f"{slopes['bare_gemm']:.2f}]; loss {slopes['loss']:.2f} [target 0: |s| <= 0.2]; plain total "
        f"{slopes['plain']:.2f} [informational]"
    )

    if not args.skip_digits:
        results, info = digits_comparison(device, args)
        report["digits"] = {
            "results": results,
            "posteriors": info,
            "iterations": args.iterations,
            "samples": args.samples,
        }
        print(f"\n3. digits, MLP 64-[128]-10 tanh, {args.samples} samples, {args.iterations} projection iterations")
        for kind, i in info.items():
            print(
                f"   {kind} variant: P = {i['num_params']:,}, tr P = {i['trace_estimate']:.0f} ± {i['trace_stderr']:.0f}, "
                f"alpha = {i['alpha']:.2f}, fit {i['fit_seconds']:.1f} s, ||Jv||/||v|| {i['trace_residual_first_last'][0]:.2g}"
                f" -> {i['trace_residual_first_last'][1]:.2g}"
            )
        print(
            f"{'posterior':>30} {'train acc':>10} {'train NLL':>10} {'test acc':>9} {'test NLL':>9} {'AUROC shuffled':>15} "
            f"{'AUROC noise':>12}"
        )
        for name, r in results.items():
            print(
                f"{name:>30} {r['train_acc']:>10.4f} {r['train_nll']:>10.4f} {r['test_acc']:>9.4f} {r['test_nll']:>9.4f} "
                f"{r['auroc_shuffled']:>15.4f} {r['auroc_noise']:>12.4f}"
            )
    report["seconds"] = time.perf_counter() - start
    print(f"\ntotal {report['seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
