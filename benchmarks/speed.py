"""Every performance ratio of rank1-pyro in one run, each measured side by side.

    python benchmarks/speed.py [--device auto] [--skip-posthoc] [--out benchmarks/results/speed.json]

Ratios (target in brackets):
* Pyro rank-1 training step / hand-written pure-PyTorch step of the same computation
  (MLP 784-512-512-10, K = 4, batch 128, mixture ELBO, Adam)              [<= 1.3]
* hand-written rank-1 step / deterministic step on K·B examples             [informational]
* full mean-field BNN step (every weight Bayesian, AutoNormal) / Pyro rank-1 step [informational]
* a Python loop of 32 single-draw predictive calls / one vectorized S = 32 call, on a small MLP
  (overhead-bound) [>= 3] and on the large one (compute-bound on a CPU)   [>= 1]
* subnetwork Laplace fit time and peak memory / laplace-torch's FullSubnetLaplace on the same MLP
  (1.86M weights) and the same 1,000 indices                               [time <= 0.5, memory far less]
  (runs ``benchmarks/laplace_vs_laplace_torch.py``)
* projected posterior: log-log slope of time per sample in the number of parameters [<= 1.15], of
  the Gram part in the number of outputs [about 2], of the loss-projected variant in outputs [about 0]
  (runs ``benchmarks/projected_scaling.py --skip-digits``)

* then the step-floor table of ``benchmarks/step_floor.py`` (``--skip-floor`` to leave it out): each
  network's rank-1 training step and predictive against the deterministic network on the K·B rows.

Timings are medians over repeated blocks after warm-up; the table prints the targets beside the ratios.
On a shared machine run nothing else meanwhile: the ratios are robust to a steady load, not to bursts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

from rank1_pyro import AveragedELBO, Gaussian, MixtureELBO, MixtureGuide, rank1_mlp
from rank1_pyro.inference import Rank1Posterior
from rank1_pyro.inference.distributed import resolve_device
from rank1_pyro.models.zoo import rank1_network


def timeit(fn, repeats: int, blocks: int = 5, device=None) -> float:
    """Median seconds per call over ``blocks`` blocks of ``repeats`` calls (after one warm-up block)."""
    times = []
    for block in range(blocks + 1):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        if block:
            times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)


class HandRank1:
    """The rank-1 MLP, its mixture guide and the mixture ELBO written directly in PyTorch."""

    def __init__(self, sizes, k, num_data, device):
        self.k, self.num_data = k, num_data
        self.layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layer = {
                "w": torch.nn.Parameter(torch.randn(b, a, device=device) / math.sqrt(a)),
                "b": torch.nn.Parameter(torch.zeros(k, b, device=device)),
            }
            for name, n in (("r", a), ("s", b)):
                layer[f"{name}_loc"] = torch.nn.Parameter(torch.ones(k, 1, n, device=device))
                layer[f"{name}_raw"] = torch.nn.Parameter(torch.full((k, 1, n), -3.44, device=device))
            self.layers.append(layer)
        self.params = [p for layer in self.layers for p in layer.values()]

    def loss(self, x, y):
        h = x.expand(self.k, *x.shape)
        kl = 0.0
        for i, layer in enumerate(self.layers):
            factors = {}
            for name in ("r", "s"):
                loc, scale = layer[f"{name}_loc"], F.softplus(layer[f"{name}_raw"])
                factors[name] = loc + scale * torch.randn_like(loc)
                kl = kl + (math.log(0.1) - scale.log() + (scale**2 + (loc - 1.0) ** 2) / (2 * 0.01) - 0.5).sum()
            h = F.linear(h * factors["r"], layer["w"]) * factors["s"] + layer["b"].unsqueeze(-2)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        log_p = -F.cross_entropy(h.reshape(-1, h.shape[-1]), y.repeat(self.k), reduction="none").view(self.k, -1)
        log_lik = (self.num_data / x.shape[0]) * (torch.logsumexp(log_p, 0) - math.log(self.k)).sum()
        return -(log_lik - kl / self.k)


def training_steps(device, batch=128, hidden=512, k=4, num_data=60000):
    sizes = [784, hidden, hidden, 10]
    x = torch.randn(batch, 784, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    model = rank1_mlp(784, [hidden, hidden], 10, ensemble_size=k, num_data=num_data).to(device)
    guide = MixtureGuide(model, init_sign_prob=None).to(device)
    elbo = MixtureELBO()
    opt = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-3)

    def pyro_step():
        opt.zero_grad(set_to_none=True)
        elbo.differentiable_loss(model, guide, x, y).backward()
        opt.step()

    hand = HandRank1(sizes, k, num_data, device)
    hand_opt = torch.optim.Adam(hand.params, lr=1e-3)

    def hand_step():
        hand_opt.zero_grad(set_to_none=True)
        hand.loss(x, y).backward()
        hand_opt.step()

    det = torch.nn.Sequential(
        torch.nn.Linear(784, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    ).to(device)
    det_opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    xk, yk = x.repeat(k, 1), y.repeat(k)

    def det_step():
        det_opt.zero_grad(set_to_none=True)
        F.cross_entropy(det(xk), yk).backward()
        det_opt.step()

    with pyro.validation_enabled(False):
        return {
            "pyro_step": timeit(pyro_step, 20, device=device),
            "hand_step": timeit(hand_step, 20, device=device),
            "deterministic_KB_step": timeit(det_step, 20, device=device),
        }


def split_batch_steps(device, batch=128, k=4, num_data=54000):
    """A rank-1 LeNet-5 training step (averaged ELBO, Adam) with the batch tiled over the K members
    against the same step with each member on its own B/K rows (``estimator="split"``)."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = rank1_network("lenet5", 10, k, Gaussian(1.0, 0.1), input_shape=(1, 28, 28)).to(device)
    model.num_data = num_data
    guide = MixtureGuide(model).to(device)
    opt = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-3)
    steps = {}
    for estimator in ("member", "split"):
        elbo = AveragedELBO(estimator=estimator)

        def step(elbo=elbo):
            opt.zero_grad(set_to_none=True)
            elbo.differentiable_loss(model, guide, x, y).backward()
            opt.step()

        with pyro.validation_enabled(False):
            steps[f"lenet5_{'tiled' if estimator == 'member' else 'split'}_step"] = timeit(step, 5, device=device)
    return steps


def mean_field_bnn_step(device, batch=128, hidden=512, num_data=60000):
    """Every weight Bayesian (as TyXe does): N(0, 1) priors on all weights, AutoNormal guide."""
    from pyro.infer import TraceMeanField_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.nn import PyroModule, PyroSample

    sizes = [784, hidden, hidden, 10]
    net = PyroModule[torch.nn.Sequential](
        *[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (PyroModule[torch.nn.Linear](a, b), torch.nn.ReLU())][:-1]
    )
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            layer.weight = PyroSample(pyro.distributions.Normal(0.0, 1.0).expand(layer.weight.shape).to_event(2))
            layer.bias = PyroSample(pyro.distributions.Normal(0.0, 1.0).expand(layer.bias.shape).to_event(1))
    net.to(device)

    def model(x, y):
        logits = net(x)
        with pyro.plate("data", num_data, subsample=torch.arange(x.shape[0], device=device)):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)

    x = torch.randn(batch, 784, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    guide = AutoNormal(model)
    guide(x, y)
    elbo = TraceMeanField_ELBO()
    opt = torch.optim.Adam(guide.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        elbo.differentiable_loss(model, guide, x, y).backward()
        opt.step()

    with pyro.validation_enabled(False):
        return {"mean_field_bnn_step": timeit(step, 10, device=device)}


def predictive(device, samples=32, batch=256, hidden=512, k=4, tag="large"):
    """S = ``samples`` draws in one vectorized call against a loop of single-draw calls.

    Two sizes: ``small`` (MLP 784-64-64-10, batch 32: the per-call overhead of Pyro's
    tracing dominates, which is what vectorizing removes) and ``large`` (784-512-512-10,
    batch 256: compute-bound on a CPU, where one big matmul cannot beat 32 smaller ones by much).
    """
    model = rank1_mlp(784, [hidden, hidden], 10, ensemble_size=k).to(device)
    posterior = Rank1Posterior(model, MixtureGuide(model).to(device))
    x = torch.randn(batch, 784, device=device)
    return {
        f"predictive_vectorized_{tag}": timeit(lambda: posterior.sample_predictions(x, samples), 3, device=device),
        f"predictive_loop_{tag}": timeit(
            lambda: [posterior.sample_predictions(x, 1) for _ in range(samples)], 3, device=device
        ),
    }


HERE = Path(__file__).resolve().parent


def posthoc_ratios(device, results_dir: Path) -> list[tuple[str, float, str]]:
    """Run the two post-hoc benchmark scripts and read their JSON results back."""
    laplace_dir = results_dir / "speed-laplace"
    projected_json = results_dir / "speed-projected.json"
    for cmd in (
        [
            sys.executable,
            str(HERE / "laplace_vs_laplace_torch.py"),
            "--device",
            str(device.type),
            "--out",
            str(laplace_dir),
        ],
        [
            sys.executable,
            str(HERE / "projected_scaling.py"),
            "--device",
            str(device.type),
            "--skip-digits",
            "--out",
            str(projected_json),
        ],
    ):
        print("running", " ".join(Path(c).name if c.endswith(".py") else c for c in cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    laplace = json.loads(max(laplace_dir.glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
    projected = json.loads(projected_json.read_text())
    slopes = projected["outputs"]["slopes"]
    return [
        ("subnetwork Laplace fit time / laplace-torch FullSubnetLaplace", laplace["ratios"]["time"], "<= 0.5"),
        ("subnetwork Laplace fit peak memory / laplace-torch", laplace["ratios"]["memory"], "far less than 1"),
        ("projected: log-log slope of time per sample in parameters", projected["parameters"]["slope"], "<= 1.15"),
        ("projected: log-log slope of the Gram part in outputs", slopes["gram_part"], "about 2 (1.7..2.5)"),
        ("projected (loss variant): log-log slope in outputs", slopes["loss"], "about 0 (|s| <= 0.2)"),
    ]


def check_hand_baseline(device) -> None:
    """The hand-written baseline is a rank-1 network under the mixture ELBO: its loss must be finite
    and fall under Adam (else the ratio against it measures nothing)."""
    torch.manual_seed(0)
    hand = HandRank1([6, 8, 3], k=2, num_data=32, device=device)
    x, y = torch.randn(32, 6, device=device), torch.randint(0, 3, (32,), device=device)
    opt = torch.optim.Adam(hand.params, lr=1e-2)
    first = float(hand.loss(x, y))
    for _ in range(100):
        opt.zero_grad()
        hand.loss(x, y).backward()
        opt.step()
    last = float(hand.loss(x, y))
    if not (math.isfinite(first) and last < first):
        raise SystemExit(f"the hand-written baseline does not train: loss {first} -> {last}")
    print(f"hand-written baseline trains: mixture-ELBO loss {first:.3f} -> {last:.3f} in 100 Adam steps")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-posthoc", action="store_true", help="skip the Laplace and projected-posterior runs")
    parser.add_argument(
        "--skip-floor",
        action="store_true",
        help="skip the step-floor table (benchmarks/step_floor.py: LeNet-5, ResNet-20, MLPs, both guides)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny networks, one repeat, no post-hoc runs: checks that the benchmark (and its hand-written "
        "baseline) works, in seconds; its ratios mean nothing",
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    if args.smoke:
        check_hand_baseline(device)
        tiny = dict(batch=4, hidden=8)
        t = {
            **training_steps(device, **tiny, k=2, num_data=10),
            **split_batch_steps(device, batch=4, k=2, num_data=10),
            **mean_field_bnn_step(device, **tiny, num_data=10),
            **predictive(device, samples=2, **tiny, k=2, tag="small"),
            **predictive(device, samples=2, **tiny, k=2, tag="large"),
        }
        args.skip_posthoc = True
    else:
        t = {
            **training_steps(device),
            **split_batch_steps(device),
            **mean_field_bnn_step(device),
            **predictive(device, batch=32, hidden=64, tag="small"),
            **predictive(device),
        }
    rows = [
        ("Pyro rank-1 step / hand-written PyTorch step", t["pyro_step"] / t["hand_step"], "<= 1.3"),
        ("hand-written rank-1 step / deterministic step on K*B", t["hand_step"] / t["deterministic_KB_step"], "info"),
        ("mean-field BNN step (all weights) / Pyro rank-1 step", t["mean_field_bnn_step"] / t["pyro_step"], "info"),
        (
            "rank-1 LeNet-5 step, batch split over the members / tiled (K = 4, B = 128)",
            t["lenet5_split_step"] / t["lenet5_tiled_step"],
            "<= 0.5",
        ),
        (
            "loop of 32 draws / vectorized S=32 predictive, small MLP (overhead-bound)",
            t["predictive_loop_small"] / t["predictive_vectorized_small"],
            ">= 3",
        ),
        (
            "loop of 32 draws / vectorized S=32 predictive, large MLP (compute-bound on CPU)",
            t["predictive_loop_large"] / t["predictive_vectorized_large"],
            ">= 1",
        ),
    ]
    if not args.skip_posthoc:
        rows += posthoc_ratios(device, args.out.parent)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| timing | ms |\n|---|---:|")
    for name, sec in t.items():
        print(f"| {name} | {1e3 * sec:.2f} |")
    print("\n| ratio | measured | target |\n|---|---:|---:|")
    for name, value, target in rows:
        print(f"| {name} | {value:.2f} | {target} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": str(device), "timings_s": t, "ratios": {r[0]: r[1] for r in rows}}, indent=2)
    )
    print(f"\nwrote {args.out}")
    if not args.skip_floor:  # the same run: every training step and predictive against its deterministic floor
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import step_floor

        step_floor.main(
            [
                "--device",
                str(device),
                "--threads",
                str(torch.get_num_threads()),
                "--out",
                str(args.out.with_name("step_floor.json")),
                *(["--small", "--repeats", "1", "--blocks", "1"] if args.smoke else []),
            ]
        )


if __name__ == "__main__":
    main()
