"""``rank1-pyro train --config FILE``: run one declarative experiment into a run directory.

The run directory is a unit (:mod:`rank1_pyro.runs`):

* it is locked while this process trains into it; a second ``train`` into it is refused;
* a directory that holds a run is never replaced unless ``--overwrite`` is given, and the
  replacement is trained in a staging directory and swapped in only when it has finished: an
  interruption at any moment leaves the previous run as it was;
* ``--resume`` checks everything first (the config against ``config.json``, the architecture and
  the data against the checkpoint, ``--epochs`` against the epochs done) and writes nothing when
  a check fails; extending a *finished* run is staged like a replacement;
* the manifest ``run.json`` is written last, with the seed, the library versions and the hashes
  of the run's files.

The config's ``seed`` seeds everything: the model's initial weights, the data order, the factor
draws and the final test evaluation, so two runs of one config are bit-identical on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the model a config describes (TOML file or shipped name)",
        description="Train the rank-1 model described by a config (a TOML file, or the name of a shipped config "
        "such as digits_mlp, cifar10_wrn28_10, imagenet_resnet50) and write config.json, checkpoint.pt, "
        "metrics.json, history.csv (a row per epoch: tail -f it) and the manifest run.json into the run directory. "
        "Progress: a per-step bar on a terminal, one line per epoch on stderr otherwise. Works unchanged under torchrun "
        "--nproc_per_node=N.",
    )
    p.add_argument(
        "--config",
        default=None,
        help="path of a TOML config, or a shipped config name (with --resume: default RUN_DIR/config.json)",
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<config name>-<time>)")
    p.add_argument(
        "--data-root",
        default=None,
        help="directory holding the data set (CIFAR, ImageNet, Fashion-MNIST; relative paths of your own files)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the config's number of epochs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (the old run stays intact until the new one has finished)",
    )
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar and the per-epoch lines")
    p.set_defaults(func=run)


def _check_resume(cfg, saved_cfg, out: Path, model, guide, train_set) -> None:
    """Every check of ``--resume``, before anything is written."""
    from ..cli import UsageError
    from ..inference.checkpoint import CHECKPOINT_NAME, check_state_dict, data_fingerprint, read_checkpoint

    ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(saved_cfg)
    differ = sorted(k for k in ours if k != "epochs" and ours[k] != theirs.get(k))
    if differ:
        raise UsageError(
            f"--resume: the config differs from {out / 'config.json'} in {differ}; resume with the run's own "
            "config (omit --config) or train into another --out"
        )
    path = out / CHECKPOINT_NAME
    if not path.is_file():
        return  # interrupted before its first checkpoint: it starts afresh
    ckpt = read_checkpoint(path)
    check_state_dict(path, "model", model, ckpt["model"])
    if ckpt["guide"] is not None and guide.state_dict():  # a lazily built guide (autoguide) is checked by train()
        check_state_dict(path, "guide", guide, ckpt["guide"])
    done = int(ckpt["position"]["epoch"])
    if cfg.epochs < done:
        raise UsageError(f"--resume: {out} has trained {done} epochs already; --epochs {cfg.epochs} is fewer")
    saved = ckpt["config"]
    if saved.get("num_data") is not None and saved["num_data"] != len(train_set):
        raise UsageError(f"--resume: {out} was trained on {saved['num_data']} examples, the data has {len(train_set)}")
    theirs_data, ours_data = saved.get("data_fingerprint"), data_fingerprint(train_set)
    if theirs_data and ours_data and theirs_data != ours_data:
        raise UsageError(f"--resume: {out} was trained on other data of the same size (the contents differ)")


def run(args) -> int:
    from ..cli import UsageError
    from ..config import load_config
    from ..inference.distributed import resolve_device, torchrun_env
    from ..runs import check_run_path, lock_run, read_config, run_state

    # -- arguments and paths: checked before any work ------------------------------------------
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out RUN_DIR (the run to continue)")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.out is not None:
        check_run_path(args.out, "--out")
    if args.config is None:
        if not args.resume:
            raise UsageError("--config is required (with --resume it defaults to RUN_DIR/config.json)")
        cfg = read_config(args.out)
    else:
        cfg = load_config(args.config)
    if args.epochs is not None:
        cfg = cfg.replace(epochs=args.epochs)
    resolve_device(args.device)
    train_set, test_set, prep = cfg.load_data(args.data_root)  # fails before anything is written
    if prep is None:  # built-in data: record its shape, so that prediction needs no data
        from ..files import Preprocessing

        prep = Preprocessing(
            dataset=cfg.dataset,
            likelihood=cfg.likelihood,
            input_shape=list(train_set[0][0].shape),
            num_train=len(train_set),
        )
    args.preprocessing = prep
    out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    main_process = (torchrun_env() or {"RANK": 0})["RANK"] == 0  # under torchrun, rank 0 writes the run files

    state = run_state(out)
    if main_process and state != "missing" and not (args.resume or args.overwrite):
        what = "a finished run" if state == "finished" else "an interrupted run"
        raise UsageError(
            f"--out {out} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    created = not out.exists()
    with contextlib.ExitStack() as stack:
        if main_process:
            stack.enter_context(lock_run(out))
            state = run_state(out)  # again, under the lock: another process may have finished meanwhile
            if state != "missing" and not (args.resume or args.overwrite):
                raise UsageError(f"--out {out} already holds a run (written by another process meanwhile)")
        try:
            return _train_into(args, cfg, out, state, train_set, test_set, main_process, stack)
        except BaseException:
            if main_process and created and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
                shutil.rmtree(out, ignore_errors=True)  # nothing of a run was written: leave no trace
            raise


def _train_into(args, cfg, out, state, train_set, test_set, main_process, stack) -> int:
    import pyro
    import torch

    from ..inference.checkpoint import CHECKPOINT_NAME, data_fingerprint
    from ..inference.predictive import evaluate
    from ..inference.train import train
    from ..runs import (
        CONFIG_FILE,
        HISTORY_FILE,
        MANIFEST_FILE,
        METRICS_FILE,
        lock_run,
        read_config,
        replace_dir,
        save_config,
        staging_dir,
        write_json,
        write_manifest,
    )

    input_shape = tuple(train_set[0][0].shape)
    model, guide = cfg.build(num_data=len(train_set), input_shape=input_shape, seed=cfg.seed)
    # other ranks (torchrun) only read: train() resumes from a checkpoint when there is one
    resume = args.resume and (state != "missing" or not main_process)
    if resume and main_process:
        _check_resume(cfg, read_config(out), out, model, guide, train_set)
    # where this process trains: in place for a new or interrupted run; in a staging directory
    # (swapped in at the end) when a run that exists is replaced or a finished run is extended
    staged = main_process and (args.overwrite and state != "missing" or resume and state == "finished")
    work = staging_dir(out) if staged else out
    if staged:
        shutil.rmtree(work, ignore_errors=True)  # left by a killed process (we hold the run's lock)
        if resume:
            shutil.copytree(out, work, ignore=shutil.ignore_patterns(".lock", MANIFEST_FILE, METRICS_FILE))
        stack.enter_context(lock_run(work))
    try:
        if main_process:
            save_config(cfg, work)
            args.preprocessing.save(work)
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)

        def on_epoch(history) -> None:  # the history so far, readable while the run trains
            write_json({"history": history.epochs, "train_seconds": history.seconds}, work / METRICS_FILE)

        schedule = cfg.train_config(
            device=args.device,
            # other ranks read (never write) the checkpoint; a staged copy holds the same file
            checkpoint_dir=work if main_process else out,
            checkpoint_every=args.checkpoint_every,
            resume=resume,
            distributed="auto",
            progress=False if args.no_progress else None,
            log_csv=work / HISTORY_FILE if main_process else None,
        )
        history = train(model, guide, loader, schedule, on_epoch=on_epoch if main_process else None)
        if not main_process:
            return 0
        pyro.set_rng_seed(cfg.seed)  # the evaluation draws, too, are a function of the seed
        test = evaluate(model, guide, torch.utils.data.DataLoader(test_set, batch_size=512))
        test = args.preprocessing.original_units(test)  # regression: RMSE and NLL in the target's units
        write_json({"history": history.epochs, "train_seconds": history.seconds, "test": test}, work / METRICS_FILE)
        write_manifest(work, cfg, data_fingerprint=data_fingerprint(train_set))
        if staged:
            replace_dir(work, out)
    except BaseException:
        if staged:
            shutil.rmtree(work, ignore_errors=True)  # the run in --out is untouched
        elif main_process and state == "missing" and not (work / CHECKPOINT_NAME).exists():
            for name in (CONFIG_FILE, "data.json", HISTORY_FILE, METRICS_FILE):  # stopped before its first checkpoint
                with contextlib.suppress(FileNotFoundError):
                    (work / name).unlink()
        raise
    print(f"{cfg.name}: " + ", ".join(f"test {k} {v:.4f}" for k, v in test.items()))
    print(f"run directory: {out}")
    return 0
