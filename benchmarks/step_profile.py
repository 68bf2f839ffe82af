"""Where a small rank-1 training step spends its time: a cProfile breakdown of 200 steps.

    python benchmarks/step_profile.py [--threads 1]

The 64-128-128-10 MLP at K = 4, B = 64 (MixtureGuide, AveragedELBO, fused Adam, Pyro validation off as
in ``train``): self time grouped by where the code lives, so the Pyro share of a step is explicit.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import pyro
import torch

from rank1_pyro import AveragedELBO, MixtureGuide, rank1_mlp

GROUPS = [
    ("autograd backward (C++)", ("run_backward",)),
    (
        "Pyro effect handlers and sites",
        ("pyro/poutine", "pyro/primitives", "pyro/nn", "pyro/infer", "pyro/distributions"),
    ),
    ("torch.distributions (construction, KL, sampling)", ("torch/distributions",)),
    ("rank1_pyro (layers, guide, objective)", ("rank1_pyro",)),
    ("torch ops and modules (forward, optimizer)", ("torch", "built-in method", "method '")),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    model = rank1_mlp(64, [128, 128], 10, ensemble_size=4, num_data=1437)
    guide = MixtureGuide(model, init_sign_prob=None)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-3, fused=True)
    elbo = AveragedELBO()

    def step():
        opt.zero_grad(set_to_none=True)
        (elbo.differentiable_loss(model, guide, x, y) / 1437).backward()
        opt.step()

    with pyro.validation_enabled(False):
        for _ in range(20):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        per_step = (time.perf_counter() - start) / args.steps
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    totals = {name: 0.0 for name, _ in GROUPS}
    for (filename, _, function), (_, _, self_time, _, _) in stats.items():
        where = f"{filename} {function}"
        for name, keys in GROUPS:
            if any(k in where for k in keys):
                totals[name] += self_time
                break
    whole = sum(totals.values())
    print(f"{1e3 * per_step:.2f} ms per step without the profiler; profiled self time by place:")
    print("| where | ms per step | share |\n|---|---:|---:|")
    for name, seconds in totals.items():
        print(f"| {name} | {1e3 * seconds / args.steps:.2f} | {100 * seconds / whole:.0f}% |")


if __name__ == "__main__":
    main()
