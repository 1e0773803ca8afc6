"""Data parallel under ``torchrun`` or ``accelerate launch``, with torch.distributed.

Coefficients are sums and counts, so they reduce exactly: each rank measures its
share of every batch (:meth:`World.shard`), and one all-reduce per batch gives
every rank the sums of the whole batch, hence the same gate. The launcher starts
the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; :meth:`World.from_env` joins them (gloo on the CPU, nccl on
CUDA). No process pool or scheduler lives here.

A rank that fails must not leave the others waiting in a collective forever, so
every failure travels: :meth:`World.together` shares each rank's outcome of a
block and makes every rank raise the same error, and :meth:`World.all_reduce`
carries a failure flag beside the sums.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kvw_ledger import errors
from kvw_ledger.errors import BadInputError, KVWLedgerError, PeerFailedError

__all__ = ["LOCAL", "Shared", "Step", "World", "is_shared", "mark_shared"]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

# Seconds a collective waits for the other ranks before failing: long enough for the
# slowest rank to load a large model and hash its files, short enough not to hang a job.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class Shared:
    """What :meth:`World.together` hands the block: rank 0 sets ``value``, every rank reads ``main``."""

    value: Any = None  # set by the block on rank 0 (on the others it is ignored)
    main: Any = None  # rank 0's value, on every rank, once the block has ended


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one data-parallel job (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank on this machine: its GPU index under nccl
    backend: str | None = None  # "gloo" or "nccl" once joined; None for one process

    @property
    def is_main(self) -> bool:
        """Whether this rank is rank 0, the only one that writes the ledger."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """Whether there is more than one rank."""
        return self.size > 1

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives run: its own GPU under nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
        """Joins the job the launcher describes in the environment; one process without one.

        Raises:
            BadInputError: the launcher's variables are malformed.
        """
        size = _env_int("WORLD_SIZE", 1)
        if size <= 1:
            return LOCAL
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < size:
            raise BadInputError(f"RANK={rank} is outside WORLD_SIZE={size}; start the job with torchrun")
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
            except (RuntimeError, ValueError) as e:
                raise BadInputError(
                    f"rank {rank} of {size} could not join the data-parallel job ({e}); start it "
                    "with torchrun or accelerate launch, which set MASTER_ADDR and MASTER_PORT"
                ) from e
        return cls(rank, size, local_rank, backend)

    def close(self) -> None:
        """Leaves the job (destroys the process group), if this process joined one."""
        if self.parallel:
            import torch.distributed as dist

            if dist.is_initialized():
                # Every rank past its last collective first: a rank that tears gloo down
                # while another still talks to it can abort ("terminate called without
                # an active exception", exit -6), seen about once in five 2-rank runs.
                self.meet()
                dist.destroy_process_group()

    def meet(self, timeout_s: float = 60.0) -> bool:
        """Waits (up to ``timeout_s``) until every rank got here; False if one never came.

        Ranks that fail meet before they exit, so that they leave together: a launcher
        stops the whole job when its first process fails, and a rank still on its way
        out would be killed (exit -15) instead of exiting with its own status.
        """
        if not self.parallel:
            return True
        import torch.distributed as dist

        try:
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=_dt.timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except RuntimeError:
            return False
        return True

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``size``-th one, from position ``rank``."""
        return list(items[self.rank :: self.size])

    def all_reduce(self, tensors: Sequence[torch.Tensor], *, failed: bool = False) -> None:
        """Sums each tensor over all ranks, in place, in one collective (float64 on the wire).

        ``failed`` says that this rank could not measure its share; every rank then
        learns it, and the others raise PeerFailedError (the failing rank raises its own
        error after this returns).
        """
        if not self.parallel:
            return
        import torch.distributed as dist

        flat = torch.cat(
            [t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors]
            + [torch.tensor([1.0 if failed else 0.0], dtype=torch.float64, device=self.device)]
        )  # (sum of numels + 1,): the last element counts the failed ranks
        dist.all_reduce(flat)
        if int(flat[-1].item()) and not failed:
            raise mark_shared(
                PeerFailedError(
                    "another rank failed while measuring its share of a batch (its error is above); "
                    "nothing was committed"
                )
            )
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape))  # float64 -> the tensor's dtype and device
            offset += n

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on every rank, inside :meth:`together`: a failure on one fails all."""
        with self.together():
            return fn(*args)
        raise AssertionError("unreachable")  # together() re-raises or the body returned

    def total(self, n: int) -> int:
        """The sum of an integer over all ranks."""
        value = torch.tensor([n], dtype=torch.float64)
        self.all_reduce([value])
        return round(float(value))

    @contextlib.contextmanager
    def together(self) -> Iterator[Shared]:
        """Runs a block on every rank and shares how it ended; every rank then fails alike.

        Every rank must enter and leave the block (it is a collective). If any rank
        raised inside it, every rank raises: the rank whose error it was re-raises it,
        the others an error of the same class and message (so every rank prints the
        same message and exits with the same code). The first rank's error that is
        not itself a PeerFailedError wins. ``Shared.main`` is rank 0's ``value``.
        """
        shared = Shared()
        if not self.parallel:
            yield shared
            shared.main = shared.value
            return
        failure: BaseException | None = None
        try:
            yield shared
        except Exception as e:  # shared with the others below, then raised again
            failure = e
        import torch.distributed as dist

        mine = (_status(failure) if failure is not None else None, shared.value if self.is_main else None)
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, mine)
        statuses = [(rank, status) for rank, (status, _) in enumerate(gathered) if status is not None]
        shared.main = gathered[0][1]
        if not statuses:
            return
        rank, status = next(((r, s) for r, s in statuses if s["class"] != "PeerFailedError"), statuses[0])
        if rank == self.rank and failure is not None:
            raise mark_shared(failure)
        raise mark_shared(_rebuild(status, rank)) from failure


LOCAL = World()  # one process: shards are everything, reductions do nothing


class Step:
    """One write of a data-parallel job: rank 0 writes, the others wait for its outcome.

    The ranks meet at :meth:`ready` (before the forward passes, so a rank that could
    not load its model or data fails every rank) and at :meth:`finish` (rank 0's
    commit, or its error, reaches every rank). ``head`` is the journal entry rank 0
    found under its writer lock; every rank works from it.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.head: Any = None  # the Entry every rank starts from
        self.finished = False

    def ready(self) -> None:
        """Waits until every rank got here; raises on every rank if one failed on the way."""
        with self.world.together():
            pass

    def finish(self, value: Any = None, error: BaseException | None = None) -> Any:
        """Shares rank 0's ``value`` (or any rank's ``error``, raised on every rank) and returns it."""
        self.finished = True
        with self.world.together() as outcome:
            if error is not None:
                raise error
            outcome.value = value
        return outcome.main


def is_shared(error: BaseException) -> bool:
    """Whether every rank already knows of ``error`` (it came out of a collective)."""
    return bool(getattr(error, "_kvw_shared", False))


def mark_shared(error: E) -> E:
    """Marks ``error`` as known to every rank (see :func:`is_shared`) and returns it."""
    error._kvw_shared = True  # type: ignore[attr-defined]
    return error


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError as e:
        raise BadInputError(f"{name}={text!r} is not an integer; start the job with torchrun") from e


def _status(error: BaseException) -> dict[str, Any]:
    """An error as plain data another rank can raise again."""
    code = error.exit_code if isinstance(error, KVWLedgerError) else 1
    return {"class": type(error).__name__, "code": code, "message": str(error), "ours": isinstance(error, KVWLedgerError)}


def _rebuild(status: dict[str, Any], rank: int) -> KVWLedgerError:
    """The error another rank raised, as one of ours with the same message and exit code."""
    cls = getattr(errors, status["class"], None) if status["ours"] else None
    if isinstance(cls, type) and issubclass(cls, KVWLedgerError):
        try:
            rebuilt = cls(status["message"])
        except TypeError:  # a class whose constructor wants more than a message
            rebuilt = PeerFailedError(status["message"])
    else:
        rebuilt = PeerFailedError(f"rank {rank} failed: {status['class']}: {status['message']}")
    rebuilt.exit_code = status["code"]
    return rebuilt
