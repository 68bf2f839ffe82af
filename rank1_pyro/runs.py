"""Run directories: what ``rank1-pyro train`` writes and what ``evaluate`` (and friends) read.

A run directory holds

* ``config.json`` -- the resolved :class:`~rank1_pyro.config.RunConfig`,
* ``checkpoint.pt`` -- model, guide, optimizer and RNG state (:mod:`rank1_pyro.inference.checkpoint`),
* ``metrics.json`` -- the training history (rewritten atomically after every epoch, while the
  run trains) and, at the end, the test metrics (``"test"``: present once training has finished),
* ``history.csv`` -- the same per-epoch records, one CSV row appended as each epoch ends, so a
  run can be followed with ``tail -f RUN_DIR/history.csv`` (a resumed run rewrites it from its
  checkpoint when they disagree),
* ``data.json`` -- how the data was prepared (:class:`~rank1_pyro.files.Preprocessing`: the input
  shape, the training-split standardisation statistics, the class names), so that new inputs
  are prepared the same way by :meth:`Run.predict` and ``rank1-pyro predict``,
* ``run.json`` -- the manifest, written last: the run is *finished* when it exists. It records the
  seed, the library versions, a fingerprint of the training data and the SHA-256 of the
  files above, so every file of a finished run is checked to describe the same run.

Post-hoc posteriors fitted on a finished run go beside it, one folder each (:func:`save_posterior`):
``laplace/`` (``rank1-pyro laplace``) and ``projected/`` (``rank1-pyro project``), each holding
``posterior.pt`` (the posterior's state dict) and ``posterior.json`` (its description and the
SHA-256 of ``posterior.pt``, written last). :meth:`Run.posterior` loads them; the network
fingerprint in the state refuses a posterior fitted on other weights.

A run directory is a unit:

* :func:`lock_run` holds an exclusive lock (``.lock``, ``flock``: released by the kernel when the
  process dies, even by SIGKILL) while a process trains into it; a second writer is refused.
* a finished or interrupted run is never replaced without an explicit ``--overwrite``; a
  replacement (and the extension of a finished run by ``--resume``) is trained in a staging
  directory next to it (:func:`staging_dir`) and swapped into place only when it has finished
  (:func:`replace_dir`), so an interruption at any moment leaves the previous run intact.

:func:`load_run` rebuilds the model and guide of a run with its trained weights; its
:meth:`Run.predict` predicts for new inputs, two lines from a run directory to predictions::

    run = load_run("runs/houses")
    table = run.predict("new_houses.csv")     # a RunPrediction: .columns(), .to_csv(), .to_json()
    table = run.predict("new_houses.csv", posterior="laplace")   # after `rank1-pyro laplace runs/houses`

One concept, one module (hence over 400 lines): run directories: their files, locks, staging, manifests, and loading a run back.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path

from .config import RunConfig
from .inference.checkpoint import CHECKPOINT_NAME, load_weights

__all__ = [
    "save_config",
    "read_config",
    "load_run",
    "Run",
    "RunPrediction",
    "POSTERIORS",
    "save_posterior",
    "write_json",
    "write_manifest",
    "read_manifest",
    "run_state",
    "check_run_path",
    "lock_run",
    "staging_dir",
    "replace_dir",
    "library_versions",
    "RunError",
    "CONFIG_FILE",
    "METRICS_FILE",
    "HISTORY_FILE",
    "MANIFEST_FILE",
    "LOCK_FILE",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "run.json"
LOCK_FILE = ".lock"
#: the files whose presence makes a directory (part of) a run
RUN_FILES = (CONFIG_FILE, CHECKPOINT_NAME, METRICS_FILE, MANIFEST_FILE)
#: the files whose hashes the manifest records (``data.json`` too, where the run has one)
HASHED_FILES = (CONFIG_FILE, CHECKPOINT_NAME, METRICS_FILE)
PREPROCESSING_FILE = "data.json"
#: the per-epoch CSV log (hashed by the manifest too, where the run has one)
HISTORY_FILE = "history.csv"
MANIFEST_FORMAT = "rank1-pyro-run"


class RunError(ValueError):
    """A run directory that cannot be used as asked (missing, locked, mixed, in the way)."""


def write_json(obj, path: Path) -> None:
    """Write ``obj`` as JSON atomically (a crash leaves the previous file intact;
    :func:`~rank1_pyro.files.atomic_write`)."""
    from .atomic import atomic_write

    atomic_write(path, json.dumps(obj, indent=2))


def save_config(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(dataclasses.asdict(cfg), run_dir / CONFIG_FILE)


def read_config(run_dir) -> RunConfig:
    """The :class:`RunConfig` of ``run_dir/config.json`` (a clear error when missing or invalid)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{path} not found: {run_dir} is not a rank1-pyro run directory")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: invalid JSON: {e}") from None
    except ValueError as e:
        raise RunError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------
# Paths, state and locks
# ------------------------------------------------------------------------------------------
def check_run_path(path, what: str = "RUN_DIR") -> Path:
    """Refuse a path that cannot become a directory (it, or the nearest existing parent, is a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"{what} {path} is a file, not a run directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise RunError(f"{what} {path} cannot be created: {parent} is a file")
    return path


def run_state(run_dir) -> str:
    """``"missing"`` (no run files), ``"finished"`` (a manifest) or ``"interrupted"`` (run files, no manifest)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any((run_dir / name).exists() for name in RUN_FILES):
        return "missing"
    return "finished" if (run_dir / MANIFEST_FILE).is_file() else "interrupted"


@contextlib.contextmanager
def lock_run(run_dir):
    """Hold the exclusive lock of ``run_dir`` (created when missing); refuse when another process holds it.

    The lock is an ``flock`` on ``run_dir/.lock``: the kernel releases it when the process ends,
    however it ends, so a killed writer never leaves a stale lock behind.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, the directory checks still apply
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise RunError(
                    f"{run_dir} is locked: another process (pid {holder}) is training into it; "
                    "wait for it to finish or choose another --out"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield path
    finally:
        f.close()  # closing the file releases the flock


def staging_dir(run_dir) -> Path:
    """Where a replacement (or extension) of ``run_dir`` is trained before it is swapped in."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.staging"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory ``new`` at ``target`` and delete what was there.

    An atomic exchange where the system has one; otherwise two renames, the previous run kept
    under ``.<name>.replaced`` until the new one is in place.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the previous run
        return
    old = target.parent / f".{target.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# The manifest
# ------------------------------------------------------------------------------------------
def library_versions() -> dict:
    import numpy
    import pyro
    import torch

    from . import __version__

    return {
        "rank1_pyro": __version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(run_dir, cfg: RunConfig, **extra) -> dict:
    """Write ``run_dir/run.json`` (last: it marks the run finished) with the hashes of its files."""
    run_dir = Path(run_dir)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "name": cfg.name,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "versions": library_versions(),
        **extra,
        "files": {
            name: _sha256(run_dir / name)
            for name in (*HASHED_FILES, PREPROCESSING_FILE, HISTORY_FILE)
            if name in HASHED_FILES or (run_dir / name).is_file()
        },
    }
    write_json(manifest, run_dir / MANIFEST_FILE)
    return manifest


def read_manifest(run_dir, verify: bool = True) -> dict | None:
    """The manifest of a finished run (``None`` for an unfinished one); with ``verify``, check that
    every file still has the hash the manifest recorded."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: invalid JSON: {e}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise RunError(f"{path} is not a rank1-pyro run manifest")
    if verify:
        for name, digest in manifest["files"].items():
            file = run_dir / name
            if not file.is_file():
                raise RunError(f"{run_dir}: {name} is missing but the run's manifest ({MANIFEST_FILE}) lists it")
            if _sha256(file) != digest:
                raise RunError(
                    f"{run_dir}: {name} does not belong to this run (it changed after the run finished; "
                    f"{MANIFEST_FILE} records another SHA-256)"
                )
    return manifest


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def missing_run_files(run_dir) -> list[str]:
    run_dir = Path(run_dir)
    return [name for name in (CONFIG_FILE, CHECKPOINT_NAME) if not (run_dir / name).is_file()]


def check_run_dir(run_dir) -> Path:
    """A directory holding a run (config and checkpoint), or a :class:`RunError` naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist: {run_dir} is not a rank1-pyro run directory")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file: {run_dir} is not a rank1-pyro run directory")
    missing = missing_run_files(run_dir)
    if missing:
        raise RunError(f"{run_dir} is not a rank1-pyro run directory: missing {', '.join(missing)}")
    return run_dir


#: the command that makes a run, named by every command that needs one
TRAIN_HINT = "rank1-pyro train --config digits_mlp --out {run_dir}"


def require_run(run_dir) -> Path:
    """RUN_DIR when it holds a run; else a :class:`RunError` naming what is missing and the
    ``rank1-pyro train`` command that makes a run there (no command trains a stand-in)."""
    check_run_path(run_dir)
    try:
        return check_run_dir(run_dir)
    except RunError as e:
        raise RunError(f"{e}; train one first: {TRAIN_HINT.format(run_dir=run_dir)}") from None


class _Splits(Sequence):
    """``(train_set, test_set)``, read from the data only when first used (prediction needs no data)."""

    def __init__(self, cfg, data_root, loaded=None):
        self._cfg, self._root, self._loaded = cfg, data_root, loaded

    def _load(self):
        if self._loaded is None:
            self._loaded = tuple(self._cfg.datasets(self._root))
        return self._loaded

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self._load()[i]

    def __repr__(self):
        return "(train_set, test_set)" + ("" if self._loaded is not None else " (not read yet)")


class Run(tuple):
    """A loaded run: unpacks as ``(config, model, guide, (train_set, test_set))``.

    Its attributes: ``config``, ``model``, ``guide``, ``datasets`` (read on first use: prediction
    needs no data), ``run_dir``, ``preprocessing`` (:class:`~rank1_pyro.files.Preprocessing`, or
    ``None`` for a run written before it existed), ``input_shape``, :meth:`posterior` and :meth:`predict`.
    """

    def __new__(cls, cfg, model, guide, splits, run_dir, preprocessing, input_shape):
        self = super().__new__(cls, (cfg, model, guide, splits))
        self.run_dir, self.preprocessing, self.input_shape = Path(run_dir), preprocessing, tuple(input_shape)
        return self

    config = property(lambda self: self[0])
    model = property(lambda self: self[1])
    guide = property(lambda self: self[2])
    datasets = property(lambda self: self[3])

    def posterior(self, kind: str = "rank1", **overrides):
        """The posterior to predict with (:data:`POSTERIORS`): ``"rank1"``, the trained model and guide;
        ``"laplace"`` or ``"projected"``, the post-hoc posterior that ``rank1-pyro laplace`` or
        ``rank1-pyro project`` saved in the run (``RUN_DIR/<kind>/``, :func:`save_posterior`), on the
        run's rank-1 model at its factor means (:func:`~rank1_pyro.laplace.rank1_point_network`).
        ``overrides`` replace saved settings of a post-hoc posterior (e.g. ``predictive="glm-mc"``)."""
        from .inference.predictive import Rank1Posterior

        if kind not in POSTERIORS:
            raise ValueError(f"posterior: unknown name {kind!r}; valid: {list(POSTERIORS)}")
        if kind == "rank1":
            if overrides:
                raise TypeError(f"posterior 'rank1' takes no settings, got {sorted(overrides)}")
            return Rank1Posterior(self.model, self.guide)
        return load_saved_posterior(self, kind, **overrides)

    def predict(
        self,
        inputs,
        *,
        num_samples: int = 32,
        posterior: str = "rank1",
        batch_size: int = 256,
        temperature: float | None = None,
        conformal: float | None = None,
    ) -> RunPrediction:
        """Predictions for new ``inputs``: a file (``.csv``, ``.parquet``, ``.npy``, ``.npz``), an image or a
        folder of images (:func:`~rank1_pyro.files.read_inputs`), or an array/tensor of raw inputs.

        Raw inputs are prepared as the training data was (the run's ``data.json``); regression
        outputs are returned in the target's units. ``temperature`` divides the logits (post-hoc
        calibration, see :func:`~rank1_pyro.calibration.fit_temperature`; default: the one
        ``rank1-pyro calibrate`` saved in the run, if any); ``conformal`` (e.g. 0.1) adds split
        conformal prediction sets with 1 − ``conformal`` coverage, calibrated when the run was
        calibrated. ``posterior``: ``"rank1"`` (the trained model), or ``"laplace"`` / ``"projected"``,
        saved in the run by ``rank1-pyro laplace`` / ``rank1-pyro project`` (:meth:`posterior`).
        """
        from .calibration import load_calibration
        from .files import read_inputs
        from .inference.predictive import predict as mc_predict

        post = self.posterior(posterior)  # first: a missing posterior is reported before any input is read
        if isinstance(inputs, (str, Path)):
            x, ids = read_inputs(inputs, self.preprocessing, self.input_shape)
        else:
            x = self.preprocessing.inputs(inputs) if self.preprocessing is not None else inputs
            ids = list(range(len(x)))
        saved = load_calibration(self.run_dir, posterior)
        if temperature is None and saved is not None:
            temperature = saved.get("temperature")
        most = getattr(post, "max_samples", None)
        if most is not None and num_samples > most:
            raise ValueError(
                f"num_samples={num_samples}: the {posterior} posterior of {self.run_dir} holds {most} saved draws; "
                f"run `rank1-pyro {POSTERIORS[posterior]} {self.run_dir} --samples {num_samples}` to save more"
            )
        # the closed-form GLM predictive folds the epistemic variance into each sample's variance
        noise_variance = (
            post.sigma_noise**2
            if posterior == "laplace" and post.likelihood == "normal" and post.predictive == "glm"
            else None
        )
        if temperature is not None and temperature != 1.0:
            from .calibration import TemperatureScaled

            post = TemperatureScaled(post, temperature)
        prediction = mc_predict(post, x, num_samples=num_samples, batch_size=batch_size)
        threshold = None
        if conformal is not None:
            if saved is None or str(conformal) not in saved.get("conformal", {}):
                raise ValueError(
                    f"conformal={conformal}: this run has no conformal threshold for it; run "
                    f"`rank1-pyro calibrate {self.run_dir} --conformal {conformal}` first"
                )
            threshold = saved["conformal"][str(conformal)]
        return RunPrediction(
            prediction, ids, self.preprocessing, conformal=conformal, threshold=threshold, noise_variance=noise_variance
        )


#: the posteriors a run can predict with -> the command that saves it in the run (``None``: trained)
POSTERIORS = {"rank1": None, "laplace": "laplace", "projected": "project"}
#: the files of a saved post-hoc posterior, in ``RUN_DIR/<kind>/``: the state (written first) and its
#: description with the state's SHA-256 (written last: the posterior is complete when it exists)
POSTERIOR_STATE_FILE = "posterior.pt"
POSTERIOR_INFO_FILE = "posterior.json"


def save_posterior(run_dir, posterior, info: dict | None = None, **options) -> Path:
    """Save a fitted :class:`~rank1_pyro.laplace.SubnetLaplace` or :class:`~rank1_pyro.laplace.ProjectedPosterior`
    of a run's point network into ``run_dir/<kind>/`` (``options`` go to its ``state_dict``).

    Two files, each written atomically: ``posterior.pt`` (the state dict) and then
    ``posterior.json`` (``info``, the kind, the number of saved draws, the library versions and the
    SHA-256 of ``posterior.pt``). Returns the directory.
    """
    import torch

    from .atomic import atomic_write

    kind = posterior.KIND
    if POSTERIORS.get(kind) is None:
        raise ValueError(f"save_posterior: a {type(posterior).__name__} is not a post-hoc posterior of a run")
    folder = Path(run_dir) / kind
    state = posterior.state_dict(**options)
    path = atomic_write(folder / POSTERIOR_STATE_FILE, lambda f: torch.save(state, f))
    draws = state["draws"]
    description = {
        "kind": kind,
        "command": POSTERIORS[kind],
        **(info or {}),
        "saved_draws": 0 if draws is None else int(draws.shape[0]),
        "versions": library_versions(),
        "files": {POSTERIOR_STATE_FILE: _sha256(path)},
    }
    write_json(description, folder / POSTERIOR_INFO_FILE)
    return folder


def load_saved_posterior(run, kind: str, **overrides):
    """The ``kind`` posterior saved in a loaded :class:`Run` (see :meth:`Run.posterior`)."""
    from .laplace import load_posterior, rank1_point_network

    folder = run.run_dir / kind
    redo = f"run `rank1-pyro {POSTERIORS[kind]} {run.run_dir}`"
    state, info = folder / POSTERIOR_STATE_FILE, folder / POSTERIOR_INFO_FILE
    if not info.is_file():
        if state.is_file():
            raise RunError(f"{state} has no {POSTERIOR_INFO_FILE} (saving it was interrupted): {redo} again")
        raise RunError(f"{run.run_dir} holds no {kind} posterior ({folder}/ not found): {redo} first")
    try:
        digest = json.loads(info.read_text())["files"][POSTERIOR_STATE_FILE]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RunError(f"{info} is not a saved posterior's description ({type(e).__name__}): {redo} again") from None
    if not state.is_file():
        raise RunError(f"{state} is missing but {info} describes it: {redo} again")
    if _sha256(state) != digest:
        raise RunError(f"{state} does not belong to {info} (it changed after it was saved): {redo} again")
    net = rank1_point_network(run.model, run.guide).eval()
    try:
        return load_posterior(state, net, **overrides)
    except ValueError as e:
        if "fitted on another network" in str(e):
            raise RunError(
                f"{state} was fitted on other weights than this run's (was the run trained again?): {redo} again"
            ) from None
        raise


class RunPrediction:
    """Per-example predictions of :meth:`Run.predict`, with the uncertainty split.

    Classification: ``prediction`` (the class name), ``prob_<class>`` per class, ``confidence``,
    and ``total`` = ``aleatoric`` + ``epistemic`` (predictive entropy = expected entropy + mutual
    information, in nats). Regression: ``mean``, ``std`` (predictive), and ``total`` =
    ``aleatoric`` + ``epistemic`` as variances in the target's units² (mean noise variance +
    variance of the means; with ``noise_variance``, the observation noise's variance in training
    units, the aleatoric part is that and the epistemic part the rest of the total, for posteriors
    whose samples carry epistemic variance of their own, as the closed-form Laplace GLM). With
    conformal sets: ``set``, the classes of the prediction set.
    """

    def __init__(self, prediction, ids, preprocessing=None, conformal=None, threshold=None, noise_variance=None):
        self.prediction, self.ids, self.preprocessing = prediction, list(ids), preprocessing
        self.conformal, self.threshold, self.noise_variance = conformal, threshold, noise_variance

    @property
    def likelihood(self) -> str:
        return self.prediction.likelihood

    def columns(self) -> dict[str, list]:
        """Column name -> one value per example."""
        p = self.prediction
        cols: dict[str, list] = {"id": self.ids}
        if p.likelihood == "categorical":
            probs = p.probs
            names = (
                self.preprocessing.classes
                if self.preprocessing is not None and self.preprocessing.classes
                else [str(c) for c in range(probs.shape[1])]
            )
            cols["prediction"] = [names[i] for i in probs.argmax(1).tolist()]
            cols["confidence"] = probs.max(1).values.tolist()
            for c, name in enumerate(names):
                cols[f"prob_{name}"] = probs[:, c].tolist()
            cols["total"] = p.total_entropy.tolist()
            cols["aleatoric"] = p.expected_entropy.tolist()
            cols["epistemic"] = p.mutual_information.tolist()
            if self.threshold is not None:
                from .calibration import conformal_sets

                sets = conformal_sets(probs, self.threshold)
                cols["set"] = [" ".join(names[c] for c in row.nonzero().flatten().tolist()) for row in sets]
        else:
            scale = self.preprocessing.y_std if self.preprocessing is not None else 1.0
            shift = self.preprocessing.y_mean if self.preprocessing is not None else 0.0
            means, variances = p.samples[..., 0], p.samples[..., 1]
            if self.noise_variance is None:
                aleatoric = variances.mean(dim=(0, 1)) * scale**2
                epistemic = means.var(dim=(0, 1), unbiased=False) * scale**2
            else:
                total = (variances.mean(dim=(0, 1)) + means.var(dim=(0, 1), unbiased=False)) * scale**2
                aleatoric = total.new_full(total.shape, self.noise_variance * scale**2)
                epistemic = (total - aleatoric).clamp_min(0.0)
            cols["mean"] = (p.mean * scale + shift).tolist()
            cols["std"] = (aleatoric + epistemic).sqrt().tolist()
            cols["total"] = (aleatoric + epistemic).tolist()
            cols["aleatoric"] = aleatoric.tolist()
            cols["epistemic"] = epistemic.tolist()
        return cols

    def rows(self) -> list[dict]:
        cols = self.columns()
        return [dict(zip(cols, values)) for values in zip(*cols.values())]

    def to_csv(self, path=None) -> str:
        """The table as CSV (written to ``path`` when given); returns the text."""
        import csv
        import io

        cols = self.columns()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(cols)
        for row in zip(*cols.values()):
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_json(self, path=None) -> str:
        text = json.dumps(self.rows(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def __len__(self):
        return len(self.ids)

    def __repr__(self):
        return f"RunPrediction({len(self)} examples, likelihood={self.likelihood!r})"


def load_run(run_dir, data_root=None, device="cpu") -> Run:
    """The :class:`Run` of a finished or interrupted run directory: unpacks as
    ``(config, model, guide, (train_set, test_set))``, and :meth:`Run.predict` predicts for new inputs.

    A finished run's files are checked against its manifest first. The data sets are read (from
    ``data_root`` for the data sets that need one) only when first used; a run that recorded its
    data (``data.json``) is rebuilt without reading any data.
    """
    from .files import Preprocessing

    run_dir = check_run_dir(run_dir)
    read_manifest(run_dir)
    cfg = read_config(run_dir)
    prep = Preprocessing.load(run_dir)
    splits = _Splits(cfg, data_root)
    if prep is not None:
        num_data, input_shape = prep.num_train, tuple(prep.input_shape)
    else:  # written before data.json existed: the data tells
        train_set = splits[0]
        num_data, input_shape = len(train_set), tuple(train_set[0][0].shape)
    model, guide = cfg.build(num_data=num_data, input_shape=input_shape)
    load_weights(run_dir / CHECKPOINT_NAME, model, guide)
    return Run(cfg, model.to(device), guide.to(device), splits, run_dir, prep, input_shape)
