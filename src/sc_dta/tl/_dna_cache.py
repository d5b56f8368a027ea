"""On-disk cache of DNA window embeddings, and the helper that builds TSS windows.

Layout: ``settings.cache_dir / "dna_embeddings" / <encoder key> / <aa> / <sha256>.npy`` — one float32 ``.npy`` per
window, sharded by the first two hex digits of the sha256 of the window sequence. The encoder key is a readable
prefix plus a hash of everything that changes the numbers: encoder name, weights id, window, pooling (including
``n_bins``), centre shift, dimension and the encoder's ``cache_tag`` (for Enformer: positional features and
compute precision, so bf16 GPU and float32 CPU results are kept apart). A ``meta.json`` next to the shards
describes the encoder. Files are written to a temporary name in the same directory and renamed into place
(``os.replace``), so concurrent processes can share a cache: readers never see partial files, and two writers of
the same window write identical bytes (under :mod:`torch.distributed`, :func:`embed_windows` has each process
write only the windows it computed). Unreadable entries count as misses and are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sc_dta._settings import settings
from sc_dta._utils import progress

if TYPE_CHECKING:
    import torch

    from sc_dta._distributed import Distributed
    from sc_dta.genome import Genome
    from sc_dta.models.dna import DNAEncoder

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def encoder_description(encoder: DNAEncoder, device: str | torch.device | None = None) -> dict[str, Any]:
    """Everything about ``encoder`` that determines its embeddings (JSON-serialisable)."""
    from sc_dta.models.dna import encoder_info

    desc = encoder_info(encoder)
    cache_tag = getattr(encoder, "cache_tag", None)
    if callable(cache_tag):
        desc["tag"] = str(cache_tag(device))
    return desc


def encoder_key(encoder: DNAEncoder, device: str | torch.device | None = None) -> str:
    """Directory name of ``encoder``'s cache: ``<name>-w<window>-<16 hex digits of the description hash>``."""
    desc = encoder_description(encoder, device)
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.]+", "_", desc["name"])[:40] or "encoder"
    return f"{safe}-w{desc['window']}-{digest}"


def sequence_key(sequence: str) -> str:
    """sha256 hex digest of a window sequence (upper-cased first, so soft-masking does not matter)."""
    return hashlib.sha256(sequence.upper().encode("utf-8")).hexdigest()


#: Serialises ``np.load`` across threads (CPython 3.11's ``ast`` raises SystemError under concurrent parsing).
_LOAD_LOCK = threading.Lock()


class DNAEmbeddingCache:
    """Disk cache of one encoder's window embeddings, keyed by the sha256 of the window sequence.

    Parameters
    ----------
    encoder
        The encoder whose embeddings are stored.
    device
        Compute device the embeddings are computed on (part of the key through the encoder's precision).
    root
        Cache root (default ``settings.cache_dir / "dna_embeddings"``).
    """

    def __init__(
        self, encoder: DNAEncoder, *, device: str | torch.device | None = None, root: str | Path | None = None
    ) -> None:
        self.description = encoder_description(encoder, device)
        self.dim = self.description["dim"]
        root = Path(settings.cache_dir) / "dna_embeddings" if root is None else Path(root)
        self.directory = root / encoder_key(encoder, device)

    def __repr__(self) -> str:
        return f"DNAEmbeddingCache({str(self.directory)!r})"

    def path(self, key: str) -> Path:
        """File holding the embedding of the window with sha256 ``key``."""
        if not _SHA256.match(key):
            raise ValueError(f"key must be a lower-case sha256 hex digest, got {key!r}.")
        return self.directory / key[:2] / f"{key}.npy"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def __len__(self) -> int:
        if not self.directory.is_dir():
            return 0
        return sum(1 for _ in self.directory.glob("??/*.npy"))

    def get(self, key: str) -> np.ndarray | None:
        """Return the stored embedding (float32, ``(dim,)``) or None when absent or unreadable."""
        path = self.path(key)
        try:
            with _LOAD_LOCK:  # numpy parses .npy headers with ast, which CPython 3.11 cannot do in parallel threads
                value = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:
            logger.warning("Ignoring unreadable DNA embedding cache entry %s: %s", path, e)
            return None
        if value.shape != (self.dim,) or value.dtype != np.float32:
            logger.warning("Ignoring DNA embedding cache entry %s with shape %s %s", path, value.shape, value.dtype)
            return None
        return value

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Return the stored embeddings among ``keys``."""
        found = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                found[key] = value
        return found

    def put(self, key: str, value: np.ndarray) -> None:
        """Store one embedding atomically (write a temporary file, then rename it into place)."""
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.shape != (self.dim,):
            raise ValueError(f"value has shape {value.shape}, expected ({self.dim},).")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, value, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            with _suppress_os_error():
                os.unlink(tmp)
            raise

    def put_many(self, keys: Sequence[str], values: np.ndarray) -> None:
        """Store ``values[i]`` under ``keys[i]``."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values.")
        for key, value in zip(keys, values, strict=True):
            self.put(key, value)

    def _write_meta(self) -> None:
        meta = self.directory / "meta.json"
        if meta.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".meta.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.description, fh, indent=1, sort_keys=True)
        os.replace(tmp, meta)

    def clear(self) -> None:
        """Delete all entries of this encoder."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def embed_windows(
    sequences: Sequence[str],
    encoder: DNAEncoder,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    cache: bool = True,
    show_progress: bool = True,
    desc: str | None = None,
    dist: Distributed | None = None,
) -> np.ndarray:
    """Embed window sequences with ``encoder``, using the on-disk cache.

    Identical sequences are embedded once; windows already in the cache are read back; the others are embedded in
    batches (with a progress bar) and stored batch by batch, so an interrupted run keeps what it computed.

    Parameters
    ----------
    sequences
        Window sequences (normally :attr:`encoder.window` bp each, from :func:`tss_window`).
    encoder
        A :class:`~sc_dta.models.DNAEncoder`.
    batch_size
        Windows per encoder call (default ``settings.batch_size_dna``).
    device
        Compute device (default ``settings.device``).
    cache
        Read and write the cache under ``settings.cache_dir / "dna_embeddings"``.
    show_progress
        Show a progress bar over batches (also subject to ``settings.progress``; only on the main process).
    desc
        Progress-bar label.
    dist
        A :class:`sc_dta._distributed.Distributed` process group to share the work with: every process passes the
        same ``sequences``; the main process looks them up in the cache, the batches to compute are dealt out in
        turn (each process embeds and caches its own), and every process returns the whole result, equal to one
        process's (the batches are the ones one process would run). None (default): this process alone.

    Returns
    -------
    float32 array ``(len(sequences), encoder.dim)``.
    """
    sequences = list(sequences)
    for i, seq in enumerate(sequences):
        if not isinstance(seq, str):
            raise TypeError(f"sequences[{i}] is a {type(seq).__name__}, expected str.")
    batch_size = settings.batch_size_dna if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    keys = [sequence_key(s) for s in sequences]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    shared = dist is not None and dist.active
    if shared:
        dist.check_same((keys, batch_size, bool(cache)), "DNA windows to embed")
    store = DNAEmbeddingCache(encoder, device=device) if cache else None
    main = not shared or dist.main
    # Only the main process reads the cache: the others may not share its file system, and a process that has
    # already written its batches must not change what another one finds.
    found = store.get_many(first) if store is not None and main else {}
    missing = [key for key in first if key not in found] if main else None
    if shared:
        missing = dist.broadcast(missing)
    logger.info(
        "embed_windows(%s): %d windows, %d unique, %d cached, %d to compute",
        encoder.name,
        len(sequences),
        len(first),
        len(first) - len(missing),
        len(missing),
    )
    batches = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]
    if shared:
        batches = batches[dist.rank :: dist.size]
    show = show_progress and main and bool(batches)
    label = desc or f"Embedding {len(missing)} DNA windows ({encoder.name})"
    bar = progress(batches, total=len(batches), desc=label, unit="batch") if show else batches
    if not shared:
        for batch in bar:
            values, store = _embed_batch(batch, sequences, first, encoder, batch_size, device, store)
            found.update(zip(batch, values, strict=True))
        return _assemble(keys, found, int(encoder.dim))

    computed: dict[str, np.ndarray] = {}
    failure: BaseException | None = None
    try:
        for batch in bar:
            values, store = _embed_batch(batch, sequences, first, encoder, batch_size, device, store)
            computed.update(zip(batch, values, strict=True))
    except Exception as e:  # every process must reach the gather below, or the others wait forever
        failure = e
    parts = dist.gather((computed, None if failure is None else f"{type(failure).__name__}: {failure}"))
    result = None
    if dist.main:
        errors = [(r, err) for r, (_, err) in enumerate(parts) if err is not None]
        if errors:
            result = (None, errors)
        else:
            for part, _ in parts:
                found.update(part)
            result = (_assemble(keys, found, int(encoder.dim)), [])
    out, errors = dist.broadcast(result)
    if errors:
        rank, err = errors[0]
        raise RuntimeError(f"embed_windows: process {rank} of {dist.size} failed: {err}") from failure
    return out


def _embed_batch(
    batch: list[str],
    sequences: list[str],
    first: dict[str, int],
    encoder: DNAEncoder,
    batch_size: int,
    device: str | torch.device | None,
    store: DNAEmbeddingCache | None,
) -> tuple[np.ndarray, DNAEmbeddingCache | None]:
    """Embed the windows of ``batch`` (sequence keys) and cache them; returns the values and the cache still usable."""
    dim = int(encoder.dim)
    values = np.asarray(
        encoder.embed([sequences[first[k]] for k in batch], batch_size=batch_size, device=device), dtype=np.float32
    )
    if values.shape != (len(batch), dim):
        raise ValueError(f"encoder {encoder.name!r} returned shape {values.shape}, expected ({len(batch)}, {dim}).")
    if store is not None:
        try:
            store.put_many(batch, values)
        except OSError as e:  # the cache is an optimisation: a read-only or full cache must not lose work
            logger.warning("DNA embedding cache not writable (%s); continuing without it.", e)
            store = None
    return values, store


def _assemble(keys: list[str], found: dict[str, np.ndarray], dim: int) -> np.ndarray:
    out = np.empty((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        out[i] = found[key]
    return out


def oriented_center(tss: int, strand: str, center_shift: int) -> int:
    """Genomic position of the window centre: ``TSS + center_shift`` in transcription orientation."""
    if strand == "+":
        return int(tss) + int(center_shift)
    if strand == "-":
        return int(tss) - int(center_shift)
    raise ValueError(f"strand must be '+' or '-', got {strand!r}.")


def tss_window(
    genome: Genome,
    chrom: str,
    tss: int,
    strand: str,
    encoder: DNAEncoder,
    *,
    mutations: Sequence[Any] | None = None,
    seed: int = 0,
) -> str:
    """Build the transcription-oriented window ``encoder`` embeds for a TSS, optionally with mutations applied.

    The result equals ``genome.window(chrom, tss + center_shift_oriented, encoder.window, strand)`` (see
    :func:`oriented_center`): the TSS lies at window index ``window // 2 - center_shift``. It is computed by cutting
    it from the window centred on the TSS itself, extended by ``|center_shift|`` bp on both sides, which also works
    for a TSS within ``|center_shift|`` bp of a chromosome end. With mutations the extended window comes from
    ``genome.mutated_window`` (which interprets TSS-relative specs such as ``"delete:-100:+50"`` relative to the
    TSS and keeps a TSS shifted by indels centred), so reference and mutated windows are cut the same way.

    Parameters
    ----------
    genome
        A :class:`sc_dta.genome.Genome`.
    chrom, tss, strand
        TSS position (0-based first transcribed base) and strand (``"+"``/``"-"``).
    encoder
        Supplies ``window`` and ``center_shift``.
    mutations
        Mutation objects or spec strings (see :func:`sc_dta.genome.parse_mutation`).
    seed
        Seed for random mutations.
    """
    window = int(encoder.window)
    shift = int(encoder.center_shift)
    # Cut the window from one centred on the TSS itself, extended by |shift| on both sides: the TSS must land at
    # index window // 2 - shift. This also works when TSS + shift falls off the chromosome end.
    extended = window + 2 * abs(shift)
    if isinstance(mutations, str) or (mutations is not None and not isinstance(mutations, list | tuple)):
        mutations = [mutations]
    if mutations:
        seq = genome.mutated_window(chrom, int(tss), extended, strand, list(mutations), seed=seed)
    else:
        seq = genome.window(chrom, int(tss), extended, strand)
    offset = extended // 2 - (window // 2 - shift)
    return seq[offset : offset + window]
