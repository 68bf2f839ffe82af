"""``rank1-pyro train --config FILE``: run one declarative experiment into a run directory."""

from __future__ import annotations

import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the model a config describes (TOML file or shipped name)",
        description="Train the rank-1 model described by a config (a TOML file, or the name of a shipped config "
        "such as digits_mlp, cifar10_wrn28_10, imagenet_resnet50) and write config.json, checkpoint.pt and "
        "metrics.json into the run directory. Works unchanged under torchrun --nproc_per_node=N.",
    )
    p.add_argument("--config", required=True, help="path of a TOML config, or a shipped config name")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<config name>-<time>)")
    p.add_argument("--data-root", default=None, help="directory holding the data set (CIFAR, ImageNet, Fashion-MNIST)")
    p.add_argument("--epochs", type=int, default=None, help="override the config's number of epochs")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..inference.distributed import torchrun_env
    from ..inference.train import evaluate, train
    from ..models.configs import load_config
    from ..runs import METRICS_FILE, save_config, write_json

    cfg = load_config(args.config)
    if args.epochs is not None:
        cfg = cfg.replace(epochs=args.epochs)
    train_set, test_set = cfg.datasets(args.data_root)  # fails before anything is written
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
    out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    input_shape = tuple(train_set[0][0].shape)
    model, guide = cfg.build(num_data=len(train_set), input_shape=input_shape)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
    main_process = (torchrun_env() or {"RANK": 0})["RANK"] == 0  # under torchrun, rank 0 writes the run files
    if main_process:
        save_config(cfg, out)
    history = train(
        model,
        guide,
        loader,
        **cfg.train_kwargs(),
        device=args.device,
        seed=cfg.seed,
        checkpoint_dir=out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        distributed="auto",
        progress=False if args.no_progress else None,
    )
    if not main_process:
        return 0
    test = evaluate(model, guide, torch.utils.data.DataLoader(test_set, batch_size=512))
    write_json({"history": history.epochs, "train_seconds": history.seconds, "test": test}, out / METRICS_FILE)
    print(f"{cfg.name}: " + ", ".join(f"test {k} {v:.4f}" for k, v in test.items()))
    print(f"run directory: {out}")
    return 0
