"""Global settings of :mod:`sc_dta` (``dta.settings``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

logger = logging.getLogger("sc_dta")

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _default_cache_dir() -> Path:
    env = os.environ.get("SC_DTA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sc_dta"


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in {"0", "false", "no", "off", ""}


class Settings:
    """Settings shared by all of :mod:`sc_dta`.

    Each attribute can also be set through an environment variable read at import:
    ``SC_DTA_DEVICE``, ``SC_DTA_DTYPE``, ``SC_DTA_CACHE_DIR``, ``SC_DTA_PROGRESS``,
    ``SC_DTA_DETERMINISTIC`` and ``SC_DTA_VERBOSITY``.
    """

    def __init__(self) -> None:
        self.device = os.environ.get("SC_DTA_DEVICE", "auto")
        self.dtype = os.environ.get("SC_DTA_DTYPE", "auto")
        self.cache_dir = _default_cache_dir()
        self.batch_size_dna = 4
        self.batch_size_cells = 16
        self.chunk_size_cells = 2048
        self.progress: bool = _env_bool("SC_DTA_PROGRESS", True)
        """Whether to show progress bars."""
        self.deterministic: bool = _env_bool("SC_DTA_DETERMINISTIC", True)
        """Whether model runs on the CPU use torch's deterministic algorithms (``torch.use_deterministic_algorithms``).

        Multi-threaded CPU kernels otherwise add in an order that varies from run to run; training amplifies the
        last-digit differences, so the same seed could give a different model (and early-stopping epoch) on each
        run. With this on, a seed reproduces a run exactly for a given number of threads. GPUs are not affected
        (their deterministic kernels need ``CUBLAS_WORKSPACE_CONFIG``; set it and call
        ``torch.use_deterministic_algorithms(True)`` yourself).
        """
        self.verbosity = os.environ.get("SC_DTA_VERBOSITY", "WARNING")

    @property
    def device(self) -> str:
        """Default compute device: ``"auto"`` (CUDA, else Apple MPS, else CPU) or a :class:`torch.device` string."""
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        value = str(value)
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except RuntimeError as e:
                raise ValueError(f"settings.device: {value!r} is not 'auto' or a torch device string.") from e
        self._device = value

    @property
    def dtype(self) -> Literal["auto", "float32", "bfloat16", "float16"]:
        """Compute precision: ``"auto"`` is bfloat16 autocast on CUDA and float32 elsewhere; ``"float32"`` everywhere."""
        return self._dtype

    @dtype.setter
    def dtype(self, value: str) -> None:
        if value not in _DTYPES:
            raise ValueError(f"settings.dtype must be one of {_DTYPES}, got {value!r}.")
        self._dtype = value

    @property
    def cache_dir(self) -> Path:
        """Where downloads, decompressed genomes and DNA embedding caches live."""
        return self._cache_dir

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike) -> None:
        self._cache_dir = Path(value).expanduser()

    @property
    def batch_size_dna(self) -> int:
        """Default number of DNA windows per encoder batch."""
        return self._batch_size_dna

    @batch_size_dna.setter
    def batch_size_dna(self, value: int) -> None:
        self._batch_size_dna = _positive_int("batch_size_dna", value)

    @property
    def batch_size_cells(self) -> int:
        """Default number of cells per cell-model batch."""
        return self._batch_size_cells

    @batch_size_cells.setter
    def batch_size_cells(self, value: int) -> None:
        self._batch_size_cells = _positive_int("batch_size_cells", value)

    @property
    def chunk_size_cells(self) -> int:
        """Cells read at a time from ``X`` or a layer by streamed reads (backed AnnData, tokenization).

        Tokenizing a chunk holds about 60 bytes per stored count: ~130 MB for 2,048 cells of ~1,000 expressed genes
        (10,000 cells: ~650 MB, and slower, as the sorts leave the CPU caches).
        """
        return self._chunk_size_cells

    @chunk_size_cells.setter
    def chunk_size_cells(self, value: int) -> None:
        self._chunk_size_cells = _positive_int("chunk_size_cells", value)

    @property
    def verbosity(self) -> str:
        """Logging level of the ``sc_dta`` logger."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: str | int) -> None:
        level = logging.getLevelName(value) if isinstance(value, str) else value
        if not isinstance(level, int):
            raise ValueError(f"settings.verbosity: unknown logging level {value!r}.")
        logger.setLevel(level)
        self._verbosity = logging.getLevelName(level)

    def __repr__(self) -> str:
        fields = ["device", "dtype", "cache_dir", "batch_size_dna", "batch_size_cells", "progress", "verbosity"]
        return "Settings(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ")"


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"settings.{name} must be a positive integer, got {value!r}.")
    return value


settings = Settings()
