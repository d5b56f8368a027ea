"""Rows of a counts matrix, chunk by chunk, from an AnnData in memory or backed by an h5ad file.

Everything that reads counts cell by cell (:func:`sc_dta.pp.tokenize`, and through it ``tl.perturb_gene``,
``tl.perturb_tss`` and ``tl.screen``) goes through :func:`iter_row_chunks`, so that only ``chunk_size`` cells of
the matrix are in memory at a time when ``X`` is on disk (``anndata.read_h5ad(path, backed="r")``):

- in-memory CSR: zero-copy slices of ``data`` / ``indices``;
- in-memory CSC: converted to CSR once (the matrix is already in memory);
- in-memory dense: each chunk converted to CSR;
- backed CSR (the h5ad default): each chunk read with one contiguous slice of the file;
- backed dense (``h5py.Dataset``): each chunk read as a dense block (``chunk_size x n_vars`` values);
- backed CSC: each chunk assembled from blocks of columns, so the whole file is read once per chunk (memory stays
  bounded, time grows with ``n_obs / chunk_size``; a warning recommends CSR).

Only ``X`` of a backed AnnData is on disk: anndata (0.12) reads ``layers`` into memory when the file is opened.
:func:`counts_matrix` therefore warns when ``layer=`` is used on a backed AnnData whose layer is in memory (the
results are still exact, the memory is not bounded).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sc_dta._utils import progress

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)

__all__ = ["RowChunk", "cells_mask", "chunk_size_or_default", "counts_matrix", "iter_row_chunks"]

#: A backed range of rows holding fewer than 1 / SPARSE_SELECTION selected rows is read row by row (one read per
#: selected row) instead of as one slice.
SPARSE_SELECTION = 8

#: Stored entries per block of columns when rows are cut out of a backed CSC matrix.
CSC_BLOCK_ENTRIES = 1 << 22


#: Every this many chunks, free heap memory is handed back to the operating system (glibc ``malloc_trim``): the
#: arrays a caller keeps from each chunk (token ids) sit between the chunk's freed temporaries and would otherwise
#: make the resident memory grow with the number of chunks.
TRIM_EVERY = 8


@functools.cache
def _malloc_trim() -> Any:
    """Return the C library's ``malloc_trim`` (glibc), or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> None:
    """Hand free heap memory back to the operating system (a no-op without glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class RowChunk:
    """Some rows of a counts matrix in CSR form (the arrays may be views of the matrix).

    Attributes
    ----------
    rows
        Positions (int64, increasing) in the matrix of the chunk's rows.
    indptr
        CSR row pointer of the chunk, starting at 0 (int64, ``len(rows) + 1``).
    indices, data
        Column indices and values of the stored entries.
    sorted_indices
        Whether the column indices are sorted within each row.
    """

    rows: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    sorted_indices: bool

    @property
    def n_rows(self) -> int:
        """Number of rows in the chunk."""
        return int(self.rows.size)

    @property
    def start(self) -> int:
        """First row of the chunk."""
        return int(self.rows[0]) if self.rows.size else 0


def chunk_size_or_default(chunk_size: int | None) -> int:
    """Return ``chunk_size``, or ``settings.chunk_size_cells`` when None; refuse anything but a positive integer."""
    if chunk_size is None:
        from sc_dta._settings import settings

        chunk_size = settings.chunk_size_cells
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (cells read at a time).")
    return int(chunk_size)


def is_backed(adata: AnnData) -> bool:
    """Whether ``adata`` (or the AnnData it is a view of) reads ``X`` from a file."""
    return bool(getattr(adata, "isbacked", False))


def _in_memory(X: Any) -> bool:
    return isinstance(X, np.ndarray | sp.spmatrix | sp.sparray)


def counts_matrix(adata: AnnData, layer: str | None) -> tuple[Any, str]:
    """Return the counts of ``adata`` (``X`` or ``layers[layer]``, in memory or on disk) and a name for messages.

    An in-memory CSC matrix is converted to CSR once (row chunks of CSC would each cost a pass over the matrix);
    a backed CSC matrix stays on disk, with a warning that reading it row-wise is slow. A layer of a backed AnnData
    that anndata holds in memory is used as it is, with a warning that it is not streamed.
    """
    if layer is None:
        X, name = adata.X, "adata.X"
    else:
        if not isinstance(layer, str):
            raise TypeError(f"layer: expected the name of a layer (str) or None, got {type(layer).__name__}.")
        if layer not in adata.layers:
            raise KeyError(f"layer={layer!r} is not in adata.layers; available: {list(adata.layers)}.")
        X, name = adata.layers[layer], f"layer {layer!r}"
        if is_backed(adata) and _in_memory(X):
            warnings.warn(
                f"layer={layer!r}: this AnnData is backed, but anndata holds its layers in memory (only X is read "
                "from the file), so the layer is not streamed. To read counts chunk by chunk from disk, store the "
                "raw counts in X of the h5ad file.",
                UserWarning,
                stacklevel=3,
            )
    if X is None:
        raise ValueError(f"{name} is empty (None); raw counts are needed.")
    if len(getattr(X, "shape", ())) != 2:
        raise TypeError(f"{name}: expected a 2-d matrix, got {type(X).__name__}.")
    if isinstance(X, sp.spmatrix | sp.sparray):
        if X.format == "csc":
            logger.info("%s is CSC; converting it to CSR once for row-wise reading.", name)
        if X.format != "csr":
            X = sp.csr_matrix(X)
    elif getattr(X, "format", None) == "csc":
        warnings.warn(
            f"{name} is a backed CSC matrix: each chunk of cells reads the whole file (slow for large files); "
            "write the counts as CSR (adata.X = scipy.sparse.csr_matrix(adata.X)) to stream them quickly.",
            UserWarning,
            stacklevel=3,
        )
    return X, name


def cells_mask(adata: AnnData, cells: Any) -> np.ndarray:
    """Boolean mask over ``adata.obs`` of ``cells``: a boolean mask, obs names, one obs name, or None (all cells)."""
    if cells is None:
        return np.ones(adata.n_obs, dtype=bool)
    if isinstance(cells, str):
        cells = [cells]
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (adata.n_obs,):
            raise ValueError(f"cells: a boolean mask must have length n_obs={adata.n_obs}, got shape {arr.shape}.")
        return arr.copy()
    idx = adata.obs_names.get_indexer(pd.Index(arr.astype(str)))
    if (idx < 0).any():
        bad = arr[idx < 0][:5].tolist()
        raise KeyError(f"cells: {bad} not in adata.obs_names.")
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[idx] = True
    return mask


def _read_rows(X: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a matrix that is not an in-memory CSR, as CSR."""
    if getattr(X, "format", None) == "csc" and not _in_memory(X):
        return _backed_csc_rows(X, start, stop)
    block = X[start:stop]
    if isinstance(block, sp.spmatrix | sp.sparray):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def _read_selected(X: Any, rows: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` (increasing) of a backed CSR or dense matrix, as CSR."""
    block = X[rows]
    if isinstance(block, sp.spmatrix | sp.sparray):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def _backed_csc_rows(X: Any, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a backed CSC matrix, read in blocks of columns of bounded size."""
    n_vars = int(X.shape[1])
    col_ptr = np.asarray(X.group["indptr"][...], dtype=np.int64) if hasattr(X, "group") else None
    if col_ptr is None:  # a backed CSC without a visible indptr: one column block per ~256 columns
        bounds = list(range(0, n_vars, 256)) + [n_vars]
    else:
        bounds = [0]
        while bounds[-1] < n_vars:
            lo = bounds[-1]
            hi = int(np.searchsorted(col_ptr, col_ptr[lo] + CSC_BLOCK_ENTRIES, side="right")) - 1
            bounds.append(min(n_vars, max(hi, lo + 1)))
    blocks = [sp.csc_matrix(X[:, lo:hi])[start:stop].tocsr() for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    out = sp.hstack(blocks, format="csr") if blocks else sp.csr_matrix((stop - start, n_vars))
    out.sort_indices()
    return out


def _chunk(block: sp.csr_matrix, rows: np.ndarray, local: np.ndarray | None) -> RowChunk:
    if local is not None:
        block = block[local]
    return RowChunk(rows, block.indptr.astype(np.int64), block.indices, block.data, bool(block.has_sorted_indices))


def iter_row_chunks(
    X: Any,
    n_obs: int,
    *,
    rows: np.ndarray | Sequence[int] | None = None,
    chunk_size: int | None = None,
    desc: str | None = None,
) -> Iterator[RowChunk]:
    """Yield rows of ``X`` in CSR form, at most ``chunk_size`` rows of the matrix read at a time.

    Parameters
    ----------
    X
        The matrix from :func:`counts_matrix`: in-memory CSR or dense, or backed CSR, CSC or dense.
    n_obs
        Number of rows of ``X``.
    rows
        Increasing row positions to read (default all rows). Only the row ranges of ``chunk_size`` rows holding
        them are read; from a backed CSR or dense matrix, a range holding few of them is read row by row.
    chunk_size
        Rows of the matrix per read (default ``sc_dta.settings.chunk_size_cells``).
    desc
        Label of the progress bar.

    Yields
    ------
    :class:`RowChunk` objects in row order; their ``rows`` together are ``rows``.
    """
    size = chunk_size_or_default(chunk_size)
    if rows is None:
        ranges = [(s, min(s + size, n_obs), None) for s in range(0, n_obs, size)]
    else:
        sel = np.asarray(rows, dtype=np.int64)
        if sel.size and (np.any(np.diff(sel) <= 0) or sel[0] < 0 or sel[-1] >= n_obs):
            raise ValueError(f"rows: expected increasing positions within 0..{n_obs - 1}.")
        bins = sel // size
        cuts = np.flatnonzero(np.diff(bins)) + 1
        ranges = [(int(g[0]), int(g[-1]) + 1, g) for g in np.split(sel, cuts) if g.size]
    in_memory_csr = isinstance(X, sp.spmatrix | sp.sparray) and X.format == "csr"
    sorted_all = bool(X.has_sorted_indices) if in_memory_csr else False
    for i, (start, stop, sel) in enumerate(progress(ranges, total=len(ranges), desc=desc)):
        if i and i % TRIM_EVERY == 0:
            release_free_memory()
        chunk_rows = np.arange(start, stop, dtype=np.int64) if sel is None else sel
        local = None if sel is None or sel.size == stop - start else sel - start
        if in_memory_csr:
            if local is None:
                lo, hi = int(X.indptr[start]), int(X.indptr[stop])
                indptr = X.indptr[start : stop + 1].astype(np.int64) - lo
                yield RowChunk(chunk_rows, indptr, X.indices[lo:hi], X.data[lo:hi], sorted_all)
            else:
                yield _chunk(sp.csr_matrix(X[sel]), chunk_rows, None)
            continue
        if local is not None and getattr(X, "format", None) != "csc" and SPARSE_SELECTION * sel.size <= stop - start:
            yield _chunk(_read_selected(X, sel), chunk_rows, None)  # a few rows of a long range: read just those
        else:
            yield _chunk(_read_rows(X, start, stop), chunk_rows, local)
