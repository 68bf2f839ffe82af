"""Peak memory of a subnetwork Laplace fit, in units of one M x M float64 matrix (8 M² bytes).

Each measurement runs in a fresh subprocess: a float32 MLP (100-256-256-10, 94,218 weights), a
random subnetwork of M of its weights (seed 0), N = 32 training examples (so the Jacobian, 32 x 10
x M numbers, is small beside the M x M matrices). After a warm-up fit on M = 50 (libraries
loaded), the peak resident set size is reset (Linux: ``/proc/self/clear_refs`` 5, read back from
``VmHWM``; elsewhere the growth of ``ru_maxrss``) and

* ``fit``: ``SubnetLaplace(...).fit(data)``: the GGN, and with ``marglik`` δ by the marginal
  likelihood (the eigenvalues of H); with a fixed δ (``--marglik-up-to`` below M) only the GGN;
* ``all``: then the closed-form GLM predictive on 64 inputs (the Cholesky factor of H + δI) and
  100 posterior draws,

each reported as the peak RSS above the RSS before the fit, and divided by 8 M² bytes.

Run::

    .venv/bin/python benchmarks/laplace_memory.py                          # M = 3,000 and 20,000
    .venv/bin/python benchmarks/laplace_memory.py --sizes 1000 --dtype float32
    .venv/bin/python benchmarks/laplace_memory.py --pythonpath /tmp/before --label before --sizes 3000

``--pythonpath DIR`` imports ``rank1_pyro`` from ``DIR`` (e.g. a copy of the package with the
committed ``subnetwork.py``, to measure the code before a change). The eigenvalues cost about
(4/3) M³ memory-bound flops (tens of minutes at M = 20,000 on two cores), so sizes above
``--marglik-up-to`` (default 8,000) are fitted at a fixed δ = 1, which skips them (the memory of
that step, one transient copy of H, is measured at the smaller sizes). Prints a table and writes
JSON to ``benchmarks/results/laplace_memory[-LABEL].json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 2**20


sys.path.insert(0, str(HERE))  # the RSS helpers live beside this script
from laplace_vs_laplace_torch import _peak_rss, _reset_peak_rss  # noqa: E402


def worker(spec: dict) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(spec["threads"])
    import rank1_pyro.laplace.subnetwork as subnetwork
    from rank1_pyro.laplace import SubnetLaplace

    M, marglik = spec["M"], spec["marglik"]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 100, generator=g), torch.randint(0, 10, (32,), generator=g)
    x_test = torch.randn(64, 100, generator=g)
    kwargs = {} if spec["dtype"] is None else {"dtype": getattr(torch, spec["dtype"])}

    def make(size):
        return SubnetLaplace(
            net,
            "classification",
            "random",
            subnetwork_size=size,
            selection_options={"seed": 0},
            prior_precision=None if marglik else 1.0,
            **kwargs,
        )

    warm = make(50).fit((x, y))  # load LAPACK / thread pools once
    warm.sample_predictions(x_test, 1), warm.sample(4)
    del warm
    base = _reset_peak_rss()
    t0 = time.perf_counter()
    la = make(M).fit((x, y))
    t_fit = time.perf_counter() - t0
    fit_peak = _peak_rss() - base
    t0 = time.perf_counter()
    la.sample_predictions(x_test, 1)
    la.sample(100, generator=torch.Generator().manual_seed(0))
    t_pred = time.perf_counter() - t0
    all_peak = _peak_rss() - base
    unit = 8 * M * M
    return {
        "M": M,
        "marglik": marglik,
        "dtype": spec["dtype"] or "default",
        "prior_precision": la.prior_precision,
        "fit_peak_mib": fit_peak / MIB,
        "all_peak_mib": all_peak / MIB,
        "unit_mib": unit / MIB,
        "fit_ratio": fit_peak / unit,
        "all_ratio": all_peak / unit,
        "fit_s": t_fit,
        "predict_sample_s": t_pred,
        "module": subnetwork.__file__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def measure(spec: dict, pythonpath: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    paths = [p for p in (pythonpath, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {
            **spec,
            "error": (proc.stderr or "")[-2000:] or f"exit status {proc.returncode} (killed: out of memory?)",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| M | δ | dtype | M×M float64 (MiB) | fit peak (MiB) | fit / M×M | fit+predict+sample peak (MiB) | "
        "all / M×M | fit s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "marglik" if r["marglik"] else "fixed 1"
        if "error" in r:
            lines.append(
                f"| {r['M']:,} | {delta} | {r.get('dtype') or 'default'} | {8 * r['M'] ** 2 / MIB:,.0f} | failed | | | | |"
            )
            continue
        lines.append(
            f"| {r['M']:,} | {delta} | {r['dtype']} | {r['unit_mib']:,.0f} | {r['fit_peak_mib']:,.0f} | "
            f"{r['fit_ratio']:.2f} | {r['all_peak_mib']:,.0f} | {r['all_ratio']:.2f} | {r['fit_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 20000])
    parser.add_argument(
        "--marglik-up-to",
        type=int,
        default=8000,
        help="sizes above this are fitted at a fixed prior precision (no eigenvalues)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="SubnetLaplace's dtype (default: the library's default; not passed at all)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pythonpath", default=None, help="import rank1_pyro from this directory")
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rows = []
    for M in args.sizes:
        spec = {"M": M, "marglik": M <= args.marglik_up_to, "dtype": args.dtype, "threads": args.threads}
        rows.append(measure(spec, args.pythonpath))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"laplace_memory{'-' + args.label if args.label else ''}.json"
    path.write_text(json.dumps({"label": args.label, "pythonpath": args.pythonpath, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
