"""A training process for tests/test_checkpoint.py (run as a script, not collected by pytest).

    python checkpoint_worker.py MODE RUN_DIR OUT

MODE ``reference``: train without checkpoints; ``interrupt``: train with checkpoints and, at
step STOP, signal ``RUN_DIR/blocked`` and wait to be killed; ``resume``: train with
``resume=True``. Writes the final model/guide state and the history to OUT.

The objective multiplies the loss by draws from python's ``random`` and numpy, so the result
depends on every random stream the checkpoint must restore (torch's drives the factor draws).
"""

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from rank1_pyro import MixtureELBO, MixtureGuide, rank1_mlp  # noqa: E402
from rank1_pyro.inference.train import train  # noqa: E402

N, BATCH, EPOCHS, EVERY, STOP, SEED = 128, 16, 4, 3, 15, 7  # 8 steps per epoch, 32 in all


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = ((x[:, 0] + x[:, 1] * x[:, 2]) > 0).long()
    return x, y


class WorkerELBO(MixtureELBO):
    def __init__(self, run_dir: Path, block: bool):
        super().__init__()
        self.run_dir, self.block, self.calls = run_dir, block, 0

    def loss_terms(self, *args, **kwargs):
        self.calls += 1
        if self.block and self.calls == STOP:
            (self.run_dir / "blocked").write_text(str(self.calls))
            time.sleep(300)  # killed here, in the middle of a step
        terms = super().loss_terms(*args, **kwargs)
        noise = 1.0 + 1e-3 * random.random() + 1e-3 * float(np.random.rand())
        return terms._replace(loss=terms.loss * noise)


def main(mode: str, run_dir: str, out: str) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = rank1_mlp(3, [8], 2, ensemble_size=3)
    guide = MixtureGuide(model)
    checkpoints = {} if mode == "reference" else dict(checkpoint_dir=run_dir / "ckpt", checkpoint_every=EVERY)
    history = train(
        model,
        guide,
        data(N, 0),
        objective=WorkerELBO(run_dir, block=mode == "interrupt"),
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=0.02,
        warmup_epochs=1,
        decay_epochs=(2,),
        kl_annealing_epochs=2,
        val_data=data(32, 1),
        eval_samples=2,
        progress=False,
        seed=SEED,
        resume=mode == "resume",
        **checkpoints,
    )
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": v for k, v in guide.state_dict().items()})
    torch.save({"state": state, "history": history.epochs}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
