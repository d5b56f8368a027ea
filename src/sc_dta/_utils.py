"""Small helpers shared across :mod:`sc_dta` (devices, precision, progress bars, MuData)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ._settings import settings

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData

logger = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn ``device`` (or ``settings.device`` when None) into a :class:`torch.device`.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU.
    """
    import torch

    device = settings.device if device is None else device
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {device!r} is not 'auto' or a torch device string.") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available on this machine.")
    return resolved


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for ``device`` under ``settings.dtype`` (None means full float32)."""
    import torch

    if settings.dtype == "float32":
        return None
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return getattr(torch, settings.dtype)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for ``device``: bf16 on CUDA by default, a no-op on the CPU."""
    import torch

    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def reproducible(device: torch.device) -> Iterator[None]:
    """Run the block with torch's deterministic algorithms on the CPU when ``settings.deterministic`` is on.

    The previous global setting is restored afterwards; other devices run unchanged.
    """
    import torch

    if device.type != "cpu" or not settings.deterministic:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def progress(
    iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None, **kwargs: Any
) -> Iterator[T]:
    """Wrap ``iterable`` in a :mod:`tqdm.auto` progress bar unless ``settings.progress`` is off.

    The bar itself is returned, so callers can ``set_postfix`` (e.g. a running loss) or ``update`` it.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not settings.progress, **kwargs)


def get_anndata(data: AnnData | MuData, mod: str = "rna") -> AnnData:
    """Return the AnnData to work on: ``data`` itself, or ``data[mod]`` for a MuData."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    try:
        from mudata import MuData
    except ImportError:  # pragma: no cover - mudata is a dependency
        MuData = ()
    if isinstance(data, MuData):
        if mod not in data.mod:
            raise KeyError(f"mod={mod!r} is not a modality of this MuData; it has {list(data.mod)}.")
        return data.mod[mod]
    raise TypeError(f"Expected an AnnData or MuData, got {type(data).__name__}.")
