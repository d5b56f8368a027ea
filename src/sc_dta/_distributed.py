"""The ``torch.distributed`` process group as the tools use it: shard work by cost, gather on the main process."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Distributed"]


class Distributed:
    """The ``torch.distributed`` process group, if one is initialised with more than one process."""

    def __init__(self) -> None:
        try:
            import torch.distributed as td

            active = td.is_available() and td.is_initialized() and td.get_world_size() > 1
        except ImportError:  # pragma: no cover - torch is a dependency
            active = False
        self.active = active
        self.rank = td.get_rank() if active else 0
        self.size = td.get_world_size() if active else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

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

    def gather(self, obj: Any) -> list[Any] | None:
        """Return every process's ``obj`` on the main process (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out = [None] * self.size if self.main else None
        td.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Return the main process's ``obj`` on every process."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]
