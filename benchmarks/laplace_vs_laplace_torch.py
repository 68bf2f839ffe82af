"""Subnetwork Laplace: rank1_pyro.laplace.SubnetLaplace against laplace-torch's FullSubnetLaplace.

The same MAP MLP (default 784-1024-1024-10, 1.86M weights) trained on scikit-learn's digits
upsampled to 28x28, the same subnetwork indices, the same prior precision and the same training
DataLoader. Each method is fitted in a fresh subprocess, which reports

* fit time (``fit(train_loader)``: the GGN over the subnetwork), the fastest of ``--repeats``
  fits after a warm-up fit on one batch,
* peak memory of the fits: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated
  before; on the CPU the peak resident set size during the fit above the resident set size
  before it (Linux: the peak is reset through ``/proc/self/clear_refs`` and read from ``VmHWM``;
  elsewhere the growth of ``ru_maxrss``),
* NLL / accuracy of the closed-form GLM predictive (probit) on the test set.

Run (CPU or CUDA, device auto-detected)::

    .venv/bin/python benchmarks/laplace_vs_laplace_torch.py
    .venv/bin/python benchmarks/laplace_vs_laplace_torch.py --hidden 256 256 --num-train 256   # quick

It prints a table and writes JSON to ``benchmarks/results/`` (git-ignored). laplace-torch is a
benchmark/test dependency only (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
METHODS = ("rank1_pyro", "laplace-torch")


def build_data(num_train: int, seed: int):
    from rank1_pyro.data import load_digits

    split = load_digits(seed=seed)
    up = lambda x: F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)  # noqa: E731
    return up(split.x_train)[:num_train], split.y_train[:num_train], up(split.x_test), split.y_test


def train_map(hidden, x, y, epochs: int, seed: int, device) -> torch.nn.Module:
    from rank1_pyro.models import mlp

    torch.manual_seed(seed)
    net = mlp(x.shape[1], list(hidden), 10).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(net(xb.to(device)), yb.to(device)).backward()
            opt.step()
    return net.eval()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the peak resident set size to the current one (Linux: ``clear_refs`` 5) and return
    the current RSS in bytes; without /proc, the peak so far (``ru_maxrss``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    """Peak resident set size in bytes since the last reset (``VmHWM``, else ``ru_maxrss``)."""
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(method: str, workdir: Path) -> None:
    """Fit one method on the saved problem and write its measurements to ``workdir/<method>.json``."""
    from rank1_pyro.models import mlp

    cfg = json.loads((workdir / "config.json").read_text())
    device = torch.device(cfg["device"])
    torch.set_num_threads(cfg["threads"])
    blob = torch.load(workdir / "problem.pt", weights_only=True)
    net = mlp(blob["x_train"].shape[1], cfg["hidden"], 10).to(device)
    net.load_state_dict(blob["state"])
    net.eval()
    indices = blob["indices"]
    loader = DataLoader(TensorDataset(blob["x_train"], blob["y_train"]), batch_size=cfg["batch_size"])
    delta = cfg["prior_precision"]

    def make():
        if method == "laplace-torch":
            from laplace import Laplace

            return Laplace(
                net,
                "classification",
                subset_of_weights="subnetwork",
                hessian_structure="full",
                subnetwork_indices=indices,
                prior_precision=delta,
            )
        from rank1_pyro.laplace import SubnetLaplace

        return SubnetLaplace(net, "classification", indices, prior_precision=delta)

    # warm-up on one batch (first-call costs: lazy initialisation, allocator), then timed fits
    first = next(iter(loader))
    make().fit(DataLoader(TensorDataset(first[0], first[1]), batch_size=cfg["batch_size"]))
    times, peaks = [], []
    for _ in range(cfg["repeats"]):
        la = make()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _reset_peak_rss()
        start = time.perf_counter()
        la.fit(loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            peaks.append((_peak_rss() - base) / 2**20)
    if method == "laplace-torch":
        predict = lambda x: la(x, pred_type="glm", link_approx="probit")  # noqa: E731
    else:
        predict = lambda x: la.sample_predictions(x, 1)[0, 0]  # noqa: E731
    probs = []
    with torch.no_grad():
        for x in blob["x_test"].split(cfg["batch_size"]):
            probs.append(predict(x.to(device)).double().cpu())
    probs = torch.cat(probs)
    y = blob["y_test"]
    nll = -probs.gather(1, y.unsqueeze(1)).clamp_min(1e-12).log().mean().item()
    acc = (probs.argmax(1) == y).double().mean().item()
    result = {
        "method": method,
        "fit_seconds": min(times),
        "fit_seconds_all": times,
        "fit_peak_mb": max(peaks),
        "test_nll": nll,
        "test_accuracy": acc,
    }
    (workdir / f"{method}.json").write_text(json.dumps(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--num-train", type=int, default=512, help="training examples (default 512)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--subnetwork-size", type=int, default=1000)
    p.add_argument(
        "--strategy", default="largest-magnitude", help="subnetwork strategy of rank1_pyro (default largest-magnitude)"
    )
    p.add_argument("--prior-precision", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=20, help="MAP training epochs (default 20)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=2, help="timed fits per method; the fastest is reported (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.workdir)
        return 0

    from rank1_pyro.laplace import FlatFunctional, select_subnetwork

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    x_tr, y_tr, x_te, y_te = build_data(args.num_train, args.seed)
    net = train_map(args.hidden, x_tr, y_tr, args.epochs, args.seed, device)
    num_weights = sum(q.numel() for q in net.parameters())
    options = {"seed": args.seed} if args.strategy == "random" else {}
    indices = select_subnetwork(
        args.strategy,
        FlatFunctional(net),
        args.subnetwork_size,
        {"data": (x_tr.to(device), y_tr.to(device))},
        **options,
    )
    cfg = {
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "prior_precision": args.prior_precision,
        "device": str(device),
        "threads": args.threads,
        "repeats": args.repeats,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "config.json").write_text(json.dumps(cfg))
        torch.save(
            {
                "state": {k: v.cpu() for k, v in net.state_dict().items()},
                "indices": indices.cpu(),
                "x_train": x_tr,
                "y_train": y_tr,
                "x_test": x_te,
                "y_test": y_te,
            },
            workdir / "problem.pt",
        )
        for method in METHODS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--workdir", str(workdir)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method} failed (exit {proc.returncode})")
            results[method] = json.loads((workdir / f"{method}.json").read_text())
    ours, ref = results["rank1_pyro"], results["laplace-torch"]
    ratios = {
        "time": ours["fit_seconds"] / ref["fit_seconds"],
        "memory": ours["fit_peak_mb"] / max(ref["fit_peak_mb"], 1e-9),
    }
    head = (
        f"MLP {x_tr.shape[1]}-{'-'.join(map(str, args.hidden))}-10 ({num_weights:,} weights), "
        f"subnetwork {indices.numel()} ({args.strategy}), N={len(x_tr)}, batch {args.batch_size}, "
        f"delta={args.prior_precision}, device {device}, {args.threads} threads"
    )
    rows = ["| method | fit s | fit peak MB | test NLL | test acc |", "|---|---|---|---|---|"]
    for m in METHODS:
        r = results[m]
        rows.append(
            f"| {m} | {r['fit_seconds']:.2f} | {r['fit_peak_mb']:.0f} | {r['test_nll']:.6f} | {r['test_accuracy']:.4f} |"
        )
    rows.append(
        f"| ratio rank1_pyro / laplace-torch | {ratios['time']:.3f} | {ratios['memory']:.3f} | "
        f"diff {ours['test_nll'] - ref['test_nll']:.2e} | |"
    )
    print(head)
    print("\n".join(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("laplace_vs_laplace_torch-%Y%m%d-%H%M%S.json")
    path.write_text(
        json.dumps(
            {
                "setup": head,
                "config": {
                    **cfg,
                    "num_train": len(x_tr),
                    "num_weights": num_weights,
                    "subnetwork_size": indices.numel(),
                    "strategy": args.strategy,
                },
                "results": results,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
