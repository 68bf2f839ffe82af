"""One script for a machine with an accelerator: GPU tests, speed ratios on CUDA, torchrun with NCCL,
peak GPU memory; one table at the end. Under five minutes on one GPU; skips cleanly without CUDA.

    python benchmarks/gpu_check.py            # or: make gpu-check

Exit status: 0 when every check passed or CUDA is absent (it says so), 1 when a check failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(name: str, cmd: list[str], timeout: int) -> tuple[str, bool, float, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        ok, tail = False, [f"timed out after {timeout} s"]
    return name, ok, time.perf_counter() - start, tail[0][:100]


def _peak_memory() -> tuple[str, bool, float, str]:
    """Peak GPU memory of one rank-1 LeNet-5 training step (K = 4, B = 128) and of a 4-member deep ensemble."""
    import torch

    from rank1_pyro import AveragedELBO, MixtureGuide
    from rank1_pyro.models import lenet5_net, rank1_network

    device = torch.device("cuda")
    start = time.perf_counter()
    x, y = torch.randn(128, 1, 28, 28, device=device), torch.randint(0, 10, (128,), device=device)
    results = []
    for kind in ("rank-1", "deep ensemble"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if kind == "rank-1":
            model = rank1_network("lenet5", 10, 4, num_data=60000).to(device)
            guide = MixtureGuide(model).to(device)
            loss = AveragedELBO().differentiable_loss(model, guide, x, y)
        else:
            nets = [lenet5_net().to(device) for _ in range(4)]
            loss = sum(torch.nn.functional.cross_entropy(net(x), y) for net in nets)
        loss.backward()
        torch.cuda.synchronize()
        results.append(torch.cuda.max_memory_allocated(device) / 2**20)
    detail = f"rank-1 {results[0]:.0f} MiB, deep ensemble {results[1]:.0f} MiB"
    return "peak GPU memory, LeNet-5 step", True, time.perf_counter() - start, detail


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: CUDA is not available on this machine; nothing to check (skipped).")
        return 0
    py = sys.executable
    checks = [
        _run(
            "GPU tests (pytest -k cuda or gpu)",
            [py, "-m", "pytest", "-q", "-k", "cuda or gpu", "-p", "no:cacheprovider"],
            150,
        ),
        _run(
            "speed ratios on CUDA (step_floor.py)",
            [
                py,
                "benchmarks/step_floor.py",
                "--device",
                "cuda",
                "--repeats",
                "5",
                "--blocks",
                "3",
                "--out",
                "benchmarks/results/step_floor_cuda.json",
            ],
            150,
        ),
        _run(
            "torchrun, NCCL, 1 process",
            [
                "torchrun",
                "--standalone",
                "--nproc_per_node=1",
                "-m",
                "rank1_pyro",
                "train",
                "--config",
                "digits_mlp",
                "--epochs",
                "1",
                "--device",
                "cuda",
                "--no-progress",
                "--overwrite",
                "--out",
                "runs/gpu-check",
            ],
            120,
        ),
    ]
    checks.append(_peak_memory())
    print(f"\ndevice: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("| check | result | seconds | detail |\n|---|---|---:|---|")
    for name, ok, seconds, detail in checks:
        print(f"| {name} | {'pass' if ok else 'FAIL'} | {seconds:.0f} | {detail} |")
    return 0 if all(ok for _, ok, _, _ in checks) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
