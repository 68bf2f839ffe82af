"""Run directories: what ``rank1-pyro train`` writes and what ``evaluate`` (and friends) read.

A run directory holds

* ``config.json`` -- the resolved :class:`~rank1_pyro.models.configs.RunConfig`,
* ``checkpoint.pt`` -- model, guide, optimizer and RNG state (:mod:`rank1_pyro.inference.checkpoint`),
* ``metrics.json`` -- the training history and the test metrics.

:func:`load_run` rebuilds the model and guide of a run with its trained weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .inference.checkpoint import CHECKPOINT_NAME, load_weights
from .models.configs import RunConfig

__all__ = ["save_config", "load_run", "write_json", "CONFIG_FILE", "METRICS_FILE"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def write_json(obj, path: Path) -> None:
    """Write ``obj`` as JSON atomically (a crash leaves the previous file intact)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def save_config(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(dataclasses.asdict(cfg), run_dir / CONFIG_FILE)


def load_run(run_dir, data_root=None, device="cpu"):
    """``(config, model, guide, (train_set, test_set))`` of a finished or interrupted run."""
    run_dir = Path(run_dir)
    config_path, checkpoint = run_dir / CONFIG_FILE, run_dir / CHECKPOINT_NAME
    for path in (config_path, checkpoint):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir} is not a rank1-pyro run directory")
    try:
        cfg = RunConfig.from_dict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON: {e}") from None
    train_set, test_set = cfg.datasets(data_root)
    model, guide = cfg.build(num_data=len(train_set), input_shape=tuple(train_set[0][0].shape))
    load_weights(checkpoint, model, guide)
    return cfg, model.to(device), guide.to(device), (train_set, test_set)

