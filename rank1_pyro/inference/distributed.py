r"""Data-parallel training over processes started by ``torchrun``.

Launch any script that calls :func:`~rank1_pyro.inference.train.train` (``distributed="auto"``,
the default, or ``True``) with::

    torchrun --nproc_per_node=N script.py          # or: python -m torch.distributed.run ...

Each process trains on its shard of every global batch; after ``backward`` the gradients are
averaged over the processes, so every process applies the same update and the model stays one
model. The pieces:

* **Process group** -- from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and
  ``MASTER_ADDR``/``MASTER_PORT``), ``env://`` initialisation; backend NCCL when the training
  device is CUDA (process ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``), gloo on the CPU. An already
  initialised process group is used as it is.
* **Same start, same draws** -- model and guide state are broadcast from rank 0, and every
  rank runs with the same seed, so the rank-1 factors drawn in a step are the same on every
  rank (one draw per member per step, as in a single process).
* **Data** -- :class:`ShardedSampler` (a seeded :class:`~torch.utils.data.DistributedSampler`):
  epoch e's order is ``randperm(N, seed + e)`` and rank r takes positions r, r + W, r + 2W, ...
  With ``batch_size = B`` (the *global* batch) each rank takes batches of B / W, so global
  batch j is exactly the single-process batch j of the same seed.
* **Gradients** -- rank r's loss is :math:`-\big(\tfrac{N}{B/W}\sum_{n \in \text{shard}_r}
  \ell_n - \beta\,\mathrm{KL}\big)` (the model's data plate scales by N over the rank's batch).
  Averaging over the W ranks,

  .. math:: \frac1W \sum_r \nabla \mathcal L_r
            = -\frac{N}{B} \sum_{n \in \text{global batch}} \nabla \ell_n + \beta\, \nabla \mathrm{KL},

  the global batch's likelihood with the KL counted once (every rank holds the same KL,
  analytic or computed from the shared draws). :func:`average_gradients` all-reduces one flat
  buffer of every ``p.grad`` (W, biases, guide parameters) after ``backward``. This is what
  ``DistributedDataParallel`` computes; it is written out because DDP wraps one module's
  ``forward``, while a Pyro model and its guide are two modules called through an ELBO's
  traces. (DDP also overlaps the communication with ``backward``; here it follows it.)
* **Buffers** -- BatchNorm running statistics are broadcast from rank 0 before every forward
  and at each epoch end, as DDP does by default.
* **Stopping together** -- a non-finite loss on any rank is counted in the same all-reduce, so
  all ranks raise :class:`~rank1_pyro.inference.train.NonFiniteLossError` at the same step.
* **Files** -- rank 0 writes checkpoints and shows progress; every rank reads the checkpoint
  when resuming (the run directory must be on a file system all processes see).

Where the training loop runs and how its data reaches it live here too, single process or not:
the device (:func:`resolve_device`) and the data loading (:func:`training_loader`,
:func:`set_position`; a world of one is the single-process case of the same sharded sampler).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pyro
import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

__all__ = [
    "DistributedContext",
    "SINGLE_PROCESS",
    "DISTRIBUTED_MODES",
    "torchrun_env",
    "resolve_device",
    "setup",
    "ShardedSampler",
    "training_loader",
    "set_position",
    "first_batch",
    "seed_ranks",
    "sum_over_ranks",
    "average_gradients",
    "broadcast_tensors",
    "all_reduce_sum",
    "broadcast_int",
]

#: accepted values of ``train(..., distributed=...)``
DISTRIBUTED_MODES = (False, True, "auto")
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` (``enabled`` when data-parallel)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and shows progress."""
        return self.rank == 0


#: the context of ordinary single-process training
SINGLE_PROCESS = DistributedContext()


def torchrun_env() -> dict[str, int] | None:
    """``{"RANK", "WORLD_SIZE", "LOCAL_RANK"}`` from the environment torchrun sets, or ``None``."""
    if not all(k in os.environ for k in _ENV_KEYS):
        return None
    try:
        env = {k: int(os.environ[k]) for k in _ENV_KEYS}
    except ValueError:
        found = {k: os.environ[k] for k in _ENV_KEYS}
        raise ValueError(
            f"torchrun environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {found}"
        ) from None
    if env["WORLD_SIZE"] < 1 or not 0 <= env["RANK"] < env["WORLD_SIZE"] or env["LOCAL_RANK"] < 0:
        raise ValueError(f"torchrun environment: inconsistent RANK, WORLD_SIZE, LOCAL_RANK {env}")
    return env


def check_mode(distributed) -> None:
    """Raise :class:`ValueError` unless ``distributed`` is one of :data:`DISTRIBUTED_MODES`."""
    if not (distributed is False or distributed is True or (isinstance(distributed, str) and distributed == "auto")):
        raise ValueError(f"distributed must be False, True or 'auto', got {distributed!r}")


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else goes to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} was requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def setup(distributed, device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Decide on data-parallel training, initialise the process group, pick this rank's device.

    ``distributed=False``: single process. ``"auto"``: data-parallel when a process group is
    initialised or torchrun's environment says ``WORLD_SIZE > 1``. ``True``: data-parallel,
    and an error when neither is there. A CUDA ``device`` without an index becomes
    ``cuda:LOCAL_RANK``.
    """
    check_mode(distributed)
    if distributed is False:
        return SINGLE_PROCESS, device
    initialised = dist.is_available() and dist.is_initialized()
    env = torchrun_env()
    if not initialised and (env is None or (distributed == "auto" and env["WORLD_SIZE"] < 2)):
        if distributed is True:
            raise ValueError(
                "distributed=True needs torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or an "
                "initialised torch.distributed process group; launch with "
                "`torchrun --nproc_per_node=N script.py`"
            )
        return SINGLE_PROCESS, device
    if not dist.is_available():
        raise ValueError("distributed training needs torch.distributed, which this build of torch lacks")
    local_rank = env["LOCAL_RANK"] if env is not None else 0
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if not initialised:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=env["RANK"], world_size=env["WORLD_SIZE"])
    return DistributedContext(dist.get_world_size(), dist.get_rank(), local_rank, True), device


class ShardedSampler(DistributedSampler):
    """A seeded :class:`~torch.utils.data.DistributedSampler` that can start mid-epoch.

    The order of epoch e is a function of ``(seed, e)`` alone (``randperm(N, seed + e)``, rank r
    taking positions r, r + W, ...; the tail is padded by repeating the first indices so every
    rank has ``ceil(N / W)``), and :meth:`set_position` skips the first ``start`` of this rank's
    indices, so a resumed run reads exactly the batches an uninterrupted one would.
    With ``num_replicas=1`` it is the single-process shuffler.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Read epoch ``epoch`` from this rank's index ``start`` on."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def rebuildable(loader: DataLoader) -> bool:
    """A loader over a map-style data set with the default sampler, which train can re-shard and re-order."""
    return (
        not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size is not None
        and type(loader.batch_sampler) is BatchSampler
        and type(loader.sampler) in (RandomSampler, SequentialSampler)
    )


def training_loader(data, batch_size: int, ctx: DistributedContext, data_seed: int):
    """``(loader, sampler)`` reading epoch e in the order of ``ShardedSampler(seed=data_seed)``.

    ``data`` is ``(x, y)`` tensors or a DataLoader. ``batch_size`` (or a given loader's) is the
    global batch; each of the ``ctx.world_size`` ranks reads ``batch_size // world_size`` examples
    per step. ``sampler`` is ``None`` for a loader train cannot re-order (custom sampler, iterable
    data set), which is used as it is.
    """
    if isinstance(data, DataLoader):
        if not rebuildable(data):
            if ctx.enabled:
                raise ValueError(
                    "distributed training needs (x, y) tensors or a DataLoader over a map-style data set with the "
                    "default sampler (shuffle=True/False), so that it can shard the data"
                )
            return data, None
        dataset, batch_size, shuffle = data.dataset, data.batch_size, isinstance(data.sampler, RandomSampler)
        options = dict(
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            drop_last=data.drop_last,
            timeout=data.timeout,
            worker_init_fn=data.worker_init_fn,
        )
        if data.num_workers > 0:
            options.update(
                persistent_workers=data.persistent_workers,
                prefetch_factor=data.prefetch_factor,
                multiprocessing_context=data.multiprocessing_context,
            )
    else:
        dataset, shuffle, options = TensorDataset(*data), True, {}
    if batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must be divisible by the number of processes "
            f"({ctx.world_size})"
        )
    sampler = ShardedSampler(dataset, ctx.world_size, ctx.rank, shuffle=shuffle, seed=data_seed)
    # the loader's own generator: creating its iterator never draws from the global RNG
    loader = DataLoader(dataset, batch_size // ctx.world_size, sampler=sampler, generator=torch.Generator(), **options)
    return loader, sampler


def set_position(loader, sampler, data_seed: int, epoch: int, batch: int):
    """An iterator over epoch ``epoch`` from batch ``batch`` on."""
    if sampler is None:  # a loader train cannot re-order: skip consumed batches by reading them
        with torch.random.fork_rng(devices=[]):  # its iterator's worker seed is not drawn from the training stream
            iterator = iter(loader)
        return itertools.islice(iterator, batch, None)
    sampler.seed = data_seed
    sampler.set_position(epoch, batch * loader.batch_size)
    loader.generator.manual_seed((data_seed * 1_000_003 + epoch) % 2**63)  # worker seeds: a function of (seed, epoch)
    return iter(loader)


def first_batch(loader: Iterable):
    for batch in loader:
        return batch
    raise ValueError("the training data set is empty")


def seed_ranks(seed: int | None, ctx: DistributedContext, device: torch.device) -> int:
    """Seed Pyro's (and torch's) random state with ``seed``, the same on every rank (without a
    seed, rank 0 draws one for all), and return the data-order seed (``seed`` when given)."""
    if seed is not None:
        pyro.set_rng_seed(seed)
    elif ctx.enabled:  # every rank draws the same factors: one seed for all
        pyro.set_rng_seed(broadcast_int(int(torch.randint(0, 2**31, ()).item()), device))
    return seed if seed is not None else int(torch.randint(0, 2**31, ()).item())


def sum_over_ranks(totals: dict, ctx: DistributedContext, device) -> dict:
    """Running sums (floats) summed over the ranks (each rank's loss sums already carry its share b / N)."""
    if not ctx.enabled:
        return dict(totals)
    keys = sorted(totals)
    return dict(zip(keys, all_reduce_sum([float(totals[k]) for k in keys], device)))


def _groups(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device): one flat buffer per group."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def average_gradients(params: list[torch.Tensor], world_size: int, flag: float = 0.0) -> float:
    """Replace every ``p.grad`` by its average over the ranks; return the sum of ``flag`` over the ranks.

    One all-reduce per (dtype, device) group of a flat buffer of the gradients (missing
    gradients count as zeros and are then set). ``flag`` (e.g. 1.0 for "my loss was not
    finite") travels in the same all-reduce, so the ranks agree on it at no extra cost.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    total = flag
    for n, ((dtype, device), idx) in enumerate(_groups(grads).items()):
        parts = [grads[i].reshape(-1) for i in idx]
        if n == 0:
            parts.append(torch.tensor([flag], dtype=dtype, device=device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if n == 0:
            total = float(flat[-1])
            flat = flat[:-1]
        flat.div_(world_size)
        offset = 0
        for i in idx:
            g, p = grads[i], params[i]
            view = flat[offset : offset + g.numel()].view_as(g)
            if p.grad is None:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)
            offset += g.numel()
    return total


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one broadcast per dtype group)."""
    tensors = [t.data if isinstance(t, torch.nn.Parameter) else t for t in tensors]
    for (_, _), idx in _groups(tensors).items():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.broadcast(flat, src=src)
        offset = 0
        for i in idx:
            t = tensors[i]
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sums of ``values`` over the ranks (float64)."""
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


def broadcast_int(value: int, device: torch.device, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank."""
    buf = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(buf, src=src)
    return int(buf.item())
