"""benchmarks/speed.py runs (tiny sizes), so the performance table cannot rot."""

import math

import pyro
import torch


def test_speed_benchmark_timings_run_on_tiny_networks(benchmark_script):
    speed = benchmark_script("speed")
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    cpu = torch.device("cpu")
    timings = {
        **speed.training_steps(cpu, batch=4, hidden=8, k=2, num_data=10),
        **speed.mean_field_bnn_step(cpu, batch=4, hidden=8, num_data=10),
        **speed.predictive(cpu, samples=2, batch=4, hidden=8, k=2, tag="tiny"),
    }
    assert set(timings) == {"pyro_step", "hand_step", "deterministic_KB_step", "mean_field_bnn_step",
                            "predictive_vectorized_tiny", "predictive_loop_tiny"}
    assert all(math.isfinite(t) and t > 0 for t in timings.values()), timings


def test_hand_written_step_minimises_the_mixture_elbo_of_the_same_network(benchmark_script):
    """The hand-written baseline is a rank-1 network under the mixture ELBO: its loss is finite and falls."""
    speed = benchmark_script("speed")
    torch.manual_seed(0)
    hand = speed.HandRank1([6, 8, 3], k=2, num_data=32, device=torch.device("cpu"))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(hand.params, lr=1e-2)
    first = float(hand.loss(x, y))
    for _ in range(100):
        opt.zero_grad()
        hand.loss(x, y).backward()
        opt.step()
    assert math.isfinite(first) and float(hand.loss(x, y)) < first
