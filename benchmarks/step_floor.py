"""How close a rank-1 training step and predictive come to their floor: the deterministic network on K·B rows.

    python benchmarks/step_floor.py [--device auto] [--threads 2] [--out benchmarks/results/step_floor.json]

For each network (the 784-512-512-10 MLP, LeNet-5 on 28x28 images, ResNet-20 on CIFAR-shaped
32x32x3 images; random data; K = 4, B = 128) and each guide (MixtureGuide, DeltaGuide =
BatchEnsemble), measured side by side in one process, interleaved, medians of blocks:

* ``det``: one training step (Adam) of the deterministic network on the K·B tiled rows: the floor;
* ``pyro``: the library's step as ``train`` takes it (AveragedELBO.differentiable_loss with Pyro's
  validation off, which ``train`` leaves on for the first step only; backward; fused Adam);
* ``hand``: the same modules with the factors drawn in plain PyTorch from the guide's parameters and
  the loss written by hand (closed-form Normal KL): the rank-1 computation without Pyro.

Ratios: pyro/det and hand/det (goal <= 1.25), pyro/hand (goal <= 1.1; <= 2 for the small
64-128-128-10 MLP at B = 64, where per-step overhead dominates). And the predictive: S = 16 draws of
all K members (``Rank1Posterior.sample_predictions``) against one deterministic forward on S·K·B rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

from rank1_pyro import AveragedELBO, DeltaGuide, MixtureGuide, members, rank1_mlp
from rank1_pyro.inference import Rank1Posterior
from rank1_pyro.inference.distributed import resolve_device
from rank1_pyro.layers import FACTOR_CLIP, Rank1Layer
from rank1_pyro.models import lenet5_net, mlp, rank1_network, resnet20_cifar_net

K = 4


def networks(small: bool = False):
    """name -> (rank-1 model builder, deterministic net builder, input shape, batch)."""
    nets = {
        "MLP 784-512-512-10": (
            lambda: rank1_mlp(784, [512, 512], 10, ensemble_size=K, num_data=60000),
            lambda: mlp(784, [512, 512], 10),
            (784,),
            128,
        ),
        "LeNet-5 28x28": (
            lambda: rank1_network("lenet5", 10, K, num_data=60000),
            lambda: lenet5_net(10, 1),
            (1, 28, 28),
            128,
        ),
        "ResNet-20 32x32x3": (
            lambda: rank1_network("resnet20_cifar", 10, K, num_data=50000),
            lambda: resnet20_cifar_net(10, 3),
            (3, 32, 32),
            128,
        ),
        "MLP 64-128-128-10, B=64": (
            lambda: rank1_mlp(64, [128, 128], 10, ensemble_size=K, num_data=1437),
            lambda: mlp(64, [128, 128], 10),
            (64,),
            64,
        ),
    }
    return {k: v for k, v in nets.items() if not small or k.startswith("MLP 64")}


@contextlib.contextmanager
def plain_torch_factors(guide, kl_terms: list):
    """Rank-1 layers draw their factors from ``guide``'s parameters in plain PyTorch (no Pyro)."""
    original = Rank1Layer.sample_factor

    def sample_factor(layer, name, device=None):
        key = layer.factor_site(name).replace(".", "__")
        loc = guide.loc[key]
        if key in guide.raw_scale:
            scale = F.softplus(guide.raw_scale[key])
            value = loc + scale * torch.randn_like(loc)
            kl_terms.append((math.log(0.1) - scale.log() + (scale**2 + (loc - 1.0) ** 2) / 0.02 - 0.5).sum())
        else:
            value = loc
            kl_terms.append((0.5 * ((value - 1.0) / 0.1) ** 2 + math.log(0.1 * math.sqrt(2 * math.pi))).sum())
        return value.clamp(-FACTOR_CLIP, FACTOR_CLIP)

    Rank1Layer.sample_factor = sample_factor
    try:
        yield
    finally:
        Rank1Layer.sample_factor = original


def _timed(fns: dict, repeats: int, blocks: int, device) -> dict:
    """Median seconds per call of each function, blocks interleaved (the same load for all)."""
    times = {name: [] for name in fns}
    for block in range(blocks + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if block:  # block 0 warms up
                times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def training_step_ratios(name, build_rank1, build_det, shape, batch, guide_cls, device, repeats, blocks) -> dict:
    torch.manual_seed(0)
    model = build_rank1().to(device)
    guide = guide_cls(model, init_sign_prob=None).to(device)
    det = build_det().to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    xk, yk = x.repeat(K, *([1] * len(shape))), y.repeat(K)
    elbo = AveragedELBO()
    params = [*model.parameters(), *guide.parameters()]
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    det_opt = torch.optim.Adam(det.parameters(), lr=1e-4, fused=True)

    def pyro_step():  # as in train(): Pyro's validation runs on the first step only
        opt.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):
            loss = elbo.differentiable_loss(model, guide, x, y)
        (loss / model.num_data).backward()
        opt.step()

    def hand_step():
        opt.zero_grad(set_to_none=True)
        kl_terms = []
        with plain_torch_factors(guide, kl_terms):
            if model.flat_batch:
                logits = model.net(xk.view(K * batch, *shape)).view(K, batch, -1)
            else:
                logits = model.net(members(K).tile(x))
        nll = F.cross_entropy(logits.reshape(K * batch, -1), yk)
        (nll + sum(kl_terms) / K / model.num_data).backward()
        opt.step()

    def det_step():
        det_opt.zero_grad(set_to_none=True)
        F.cross_entropy(det(xk), yk).backward()
        det_opt.step()

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        t = _timed({"det": det_step, "pyro": pyro_step, "hand": hand_step}, repeats, blocks, device)
    return {
        "network": name,
        "guide": guide_cls.__name__,
        "ms": {k: 1e3 * v for k, v in t.items()},
        "pyro/det": t["pyro"] / t["det"],
        "hand/det": t["hand"] / t["det"],
        "pyro/hand": t["pyro"] / t["hand"],
    }


def predictive_ratio(name, build_rank1, build_det, shape, batch, device, repeats, blocks, samples=16) -> dict:
    torch.manual_seed(0)
    model = build_rank1().to(device).eval()
    guide = MixtureGuide(model, init_sign_prob=None).to(device)
    det = build_det().to(device).eval()
    x = torch.randn(batch, *shape, device=device)
    x_rows = x.repeat(samples * K, *([1] * len(shape)))
    posterior = Rank1Posterior(model, guide, max_rows=samples * K * batch)

    @torch.no_grad()
    def det_forward():
        torch.softmax(det(x_rows), -1)

    def rank1_predictive():
        posterior.sample_predictions(x, samples)

    t = _timed({"det": det_forward, "rank1": rank1_predictive}, repeats, blocks, device)
    return {"network": name, "ms": {k: 1e3 * v for k, v in t.items()}, "rank1/det": t["rank1"] / t["det"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="only the small MLP (a smoke run)")
    parser.add_argument("--only", default=None, help="only the networks whose name contains this text")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_floor.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    steps, predictives = [], []
    for name, (rank1, det, shape, batch) in networks(args.small).items():
        if args.only and args.only not in name:
            continue
        heavy = name.startswith("ResNet") and device.type == "cpu"  # seconds per step on a CPU: fewer calls
        repeats, blocks = (1, min(args.blocks, 3)) if heavy else (args.repeats, args.blocks)
        for guide_cls in (MixtureGuide, DeltaGuide):
            steps.append(training_step_ratios(name, rank1, det, shape, batch, guide_cls, device, repeats, blocks))
            row = steps[-1]
            print(
                f"{name:26} {row['guide']:13} "
                + " ".join(f"{k} {v:7.2f} ms" for k, v in row["ms"].items())
                + f"  pyro/det {row['pyro/det']:.2f} hand/det {row['hand/det']:.2f} pyro/hand {row['pyro/hand']:.2f}",
                flush=True,
            )
        predictives.append(predictive_ratio(name, rank1, det, shape, batch, device, repeats, blocks))
    print(f"\ndevice: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, K = {K}")
    print("\n| network | guide | det ms | Pyro ms | hand ms | Pyro / det | hand / det | Pyro / hand |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in steps:
        m = r["ms"]
        print(
            f"| {r['network']} | {r['guide']} | {m['det']:.1f} | {m['pyro']:.1f} | {m['hand']:.1f} | "
            f"{r['pyro/det']:.2f} | {r['hand/det']:.2f} | {r['pyro/hand']:.2f} |"
        )
    print("\n| network (S = 16 draws x K = 4) | det forward on S·K·B rows, ms | rank-1 predictive, ms | ratio |")
    print("|---|---:|---:|---:|")
    for r in predictives:
        print(f"| {r['network']} | {r['ms']['det']:.1f} | {r['ms']['rank1']:.1f} | {r['rank1/det']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"device": str(device), "threads": torch.get_num_threads(), "steps": steps, "predictive": predictives},
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
