"""Length-sorted batches of cells for the perturbation engines, with out-of-memory handling.

Both readouts (:mod:`sc_dta.models._perturb_engine`, :mod:`sc_dta.models._expression_readout`) walk their cells
longest first in batches padded to their longest member. This module holds that loop and what it does when memory
runs out:

- CUDA out-of-memory (:class:`torch.OutOfMemoryError`, or a ``CUDA error: out of memory`` on a CUDA device): the
  batch is halved and retried, so a run that does not fit goes on with smaller batches;
- any other allocation failure (the CPU's ``DefaultCPUAllocator: can't allocate memory``, MPS's ``out of memory``,
  a Python :class:`MemoryError`): a clear :class:`MemoryError` naming the device, the batch and what to change. It
  is not retried: on the CPU a failed allocation usually means the machine is already swapping or about to be
  killed, and halving would only postpone that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from sc_dta._settings import settings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["MIN_FILL", "host_memory_error", "is_memory_error", "length_sorted_batches"]

#: A batch ends where a cell is shorter than this fraction of the batch's longest cell (bounds the padding).
#: On the CPU batching buys little (the matrices of one cell are already large), so padding is kept tighter.
MIN_FILL = {"cpu": 0.97, "default": 0.9}

#: What to do about a failed allocation, when the engine gives no advice of its own.
DEFAULT_ADVICE = (
    "pass a smaller batch_size=, or fewer cells per call (for a long screen, dta.tl.screen with checkpoint_dir= "
    "keeps what is finished and resumes)"
)

#: Texts of the allocation failures that torch raises as a plain RuntimeError (CPU and MPS allocators).
_MEMORY_TEXTS = ("can't allocate memory", "not enough memory", "out of memory", "failed to allocate")


def _batch_len(lengths_desc: np.ndarray, batch_size: int, min_fill: float = MIN_FILL["default"]) -> int:
    """Return the size of the next batch: at most ``batch_size``, padding bounded by ``1 - min_fill``."""
    n = min(batch_size, len(lengths_desc))
    if n <= 1:
        return n
    return max(1, int(np.count_nonzero(lengths_desc[:n] >= min_fill * lengths_desc[0])))


def _cuda_oom_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types of a CUDA out-of-memory (the ones worth retrying with a smaller batch)."""
    import torch

    errs = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        errs.append(torch.OutOfMemoryError)
    return tuple(errs)


def _is_cuda_oom(err: BaseException, device: torch.device, oom: tuple[type[BaseException], ...]) -> bool:
    """Whether ``err`` is a CUDA out-of-memory: its own type, or a plain ``CUDA error: out of memory`` on CUDA."""
    if isinstance(err, oom):
        return True
    text = str(err).lower()
    return device.type == "cuda" and isinstance(err, RuntimeError) and "cuda" in text and "out of memory" in text


def is_memory_error(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure that is not CUDA's (those are retried with a smaller batch).

    True for :class:`MemoryError` and for the :class:`RuntimeError` texts of torch's CPU and MPS allocators
    (``"DefaultCPUAllocator: can't allocate memory: ..."``, ``"... not enough memory ..."``, ``"MPS backend out of
    memory ..."``); False for anything else, CUDA's out-of-memory included.
    """
    if isinstance(err, _cuda_oom_errors()):
        return False
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return "defaultcpuallocator" in text or any(t in text for t in _MEMORY_TEXTS)
    return False


def host_memory_error(
    err: BaseException, device: torch.device, lengths: np.ndarray, *, what: str = "cell", advice: str = DEFAULT_ADVICE
) -> MemoryError:
    """Return the :class:`MemoryError` to raise (``from err``) for an allocation failure while running a batch.

    Parameters
    ----------
    err
        The original error (its text is quoted).
    device
        The compute device.
    lengths
        Token count of each sequence of the batch.
    what
        What one sequence is (``"cell"``; an ``s`` is added for several).
    advice
        What the caller can change, e.g. ``"pass a smaller batch_size="``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    longest = int(lengths.max()) if lengths.size else 0
    return MemoryError(
        f"Out of memory on {device} running a batch of {lengths.size} {what}{'s' * (lengths.size != 1)} of up to {longest} tokens "
        f"({int(lengths.sum())} tokens in all; {lengths.size * longest} padded): {type(err).__name__}: {err}. "
        f"Not retried on {device.type!r} (only CUDA out-of-memory halves the batch); {advice}."
    )


def length_sorted_batches(
    order: np.ndarray,
    sorted_lengths: np.ndarray,
    batch_size: int,
    device: torch.device,
    process: Callable[[np.ndarray], Any],
    *,
    desc: str,
    on_oom: Callable[[], bool] | None = None,
    min_fill: Mapping[str, float] | None = None,
    advice: str = DEFAULT_ADVICE,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(batch, process(batch))`` over the cells ``order`` (longest first), with a progress bar.

    Batches hold at most ``batch_size`` cells and are cut where the padding would exceed ``min_fill`` (default
    :data:`MIN_FILL`, by device type). Everything runs in one inference-mode and autocast region (autocast keeps its
    low-precision weight copies across batches).

    Parameters
    ----------
    order
        Cell indices, longest first.
    sorted_lengths
        Token count of each cell of ``order``.
    batch_size
        Most cells per batch.
    device
        The compute device (for autocast, the fill and the messages).
    process
        Computes the result of one batch (an array of cell indices).
    desc
        Progress-bar label.
    on_oom
        Called on CUDA out-of-memory; may shrink something else (e.g. sequences per forward pass) and returns
        whether it did. A single cell that does not fit is retried only while it returns True.
    min_fill
        ``{device type or "default": fraction}`` overriding :data:`MIN_FILL`.
    advice
        What the user can change, quoted by the :class:`MemoryError` of a failed allocation.

    Raises
    ------
    MemoryError
        On an allocation failure that is not CUDA's (see :func:`is_memory_error`), raised from the original error.
    """
    import torch
    from tqdm.auto import tqdm

    from sc_dta._utils import autocast, reproducible

    oom = _cuda_oom_errors()
    fills = MIN_FILL if min_fill is None else min_fill
    fill = fills.get(device.type, fills["default"])
    pos, bs = 0, batch_size
    with (
        torch.inference_mode(),
        autocast(device),
        reproducible(device),
        tqdm(total=len(order), desc=desc, unit="cell", disable=not settings.progress) as bar,
    ):
        while pos < len(order):
            n = _batch_len(sorted_lengths[pos:], bs, fill)
            batch = order[pos : pos + n]
            try:
                result = process(batch)
            except (MemoryError, RuntimeError) as e:
                if _is_cuda_oom(e, device, oom):
                    shrunk = on_oom() if on_oom is not None else False
                    if len(batch) == 1 and not shrunk:
                        raise
                    bs = max(1, len(batch) // 2)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    logger.warning("Out of memory on %s; retrying with batch_size=%d.", device, bs)
                    continue
                if not is_memory_error(e):
                    raise
                raise host_memory_error(e, device, sorted_lengths[pos : pos + n], advice=advice) from e
            yield batch, result
            pos += len(batch)
            bar.update(len(batch))
