"""The ``torch.distributed`` process group as the tools use it: shard work by cost, gather on the main process."""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import numpy as np

__all__ = ["Distributed"]


class Distributed:
    """The ``torch.distributed`` process group, if one is initialised with more than one process.

    Without one (or with a single process) every method is the identity of one process: ``shard`` returns every
    position, ``gather``/``all_gather`` a one-element list, ``broadcast`` and ``all_reduce`` their argument.
    """

    def __init__(self) -> None:
        try:
            import torch.distributed as td

            active = td.is_available() and td.is_initialized() and td.get_world_size() > 1
        except ImportError:  # pragma: no cover - torch is a dependency
            active = False
        self.active = active
        self.rank = td.get_rank() if active else 0
        self.size = td.get_world_size() if active else 1

    def __repr__(self) -> str:
        return f"Distributed(active={self.active}, rank={self.rank}, size={self.size})"

    @property
    def main(self) -> bool:
        """Whether this is the main process (rank 0; also True without a process group)."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """The process group's backend (``"gloo"``, ``"nccl"``, ...), None when not active."""
        if not self.active:
            return None
        import torch.distributed as td

        return str(td.get_backend())

    def shard(self, lengths: np.ndarray) -> np.ndarray:
        """Return the positions this process evaluates: longest first, each to the least-loaded process."""
        if not self.active:
            return np.arange(len(lengths))
        load = np.zeros(self.size, dtype=np.int64)
        owner = np.empty(len(lengths), dtype=np.int64)
        for i in np.argsort(-lengths, kind="stable"):
            r = int(np.argmin(load))
            owner[i] = r
            load[r] += int(lengths[i])
        return np.flatnonzero(owner == self.rank)

    def slice(self, n: int) -> slice:
        """Return the contiguous share of ``n`` items of this process (``np.array_split`` sizes: within one)."""
        per, extra = divmod(int(n), self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def gather(self, obj: Any) -> list[Any] | None:
        """Return every process's ``obj`` on the main process (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out = [None] * self.size if self.main else None
        td.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Return every process's ``obj``, in rank order, on every process."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.size
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Return the main process's ``obj`` on every process."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, values: Any) -> np.ndarray:
        """Sum numbers (a scalar or an array) over the processes, in float64; every process gets the sum."""
        arr = np.asarray(values, dtype=np.float64)
        if not self.active:
            return arr
        import torch
        import torch.distributed as td

        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.as_tensor(arr.reshape(-1), dtype=torch.float64).to(device)
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
        return tensor.cpu().numpy().reshape(arr.shape)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.active:
            import torch.distributed as td

            td.barrier()

    def check_same(self, obj: Any, what: str) -> None:
        """Raise the same ValueError on every process unless all processes pass an equal ``obj``.

        ``obj`` is compared by the sha256 of its pickle, so it can be large; ``what`` names it in the error.
        """
        if not self.active:
            return
        digest = hashlib.sha256(pickle.dumps(obj, protocol=4)).hexdigest()
        digests = self.all_gather(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ValueError(
                f"torch.distributed: process(es) {differ} of {self.size} hold other {what} than process 0; every "
                "process must make the same call on the same data."
            )
