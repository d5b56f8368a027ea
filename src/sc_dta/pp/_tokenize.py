"""Geneformer rank-value encoding of raw counts (:func:`sc_dta.pp.tokenize`).

The whole computation runs on chunks of cells in CSR form and is vectorised within a chunk:
the vars of a chunk are mapped to vocabulary columns (duplicates summed through a sparse
aggregation), scaled by ``1 / n_counts * 10,000 / median``, and each cell's non-zero values are
ranked with one row-wise stable sort over a padded (cells x genes-in-cell) array. The full
matrix is never densified, so backed (on-disk) and large inputs work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sc_dta._chunks import RowChunk, cells_mask, chunk_size_or_default, counts_matrix, iter_row_chunks
from sc_dta._utils import get_anndata

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from sc_dta.models.vocab import GeneformerVocab

logger = logging.getLogger(__name__)

__all__ = ["TokenizedCells", "tokenize"]

TARGET_SUM = 10_000.0


# --------------------------------------------------------------------------------------------
# Result container
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedCells:
    """Token sequences of a set of cells, in obs order (the output of :func:`sc_dta.pp.tokenize`).

    Attributes
    ----------
    input_ids
        One int64 array per cell, special tokens included (V2: ``<cls>`` ... ``<eos>``).
    lengths
        Number of tokens of each cell (special tokens included).
    vocab
        The :class:`~sc_dta.models.GeneformerVocab` used.
    genes
        Names of the vars that map to a vocabulary token.
    var_token_ids
        Token id of each var of the input (``-1`` for vars outside the vocabulary).
    obs_names
        Names of the cells.
    empty
        Cells without any count in a vocabulary gene (their sequence is empty, or ``<cls><eos>``).
    n_counts
        Total counts per cell used for normalisation.
    params
        How the tokenization was done (vocabulary version, layer, keys, max_length, tie order).
    """

    input_ids: list[np.ndarray]
    lengths: np.ndarray
    vocab: GeneformerVocab
    genes: pd.Index
    var_token_ids: np.ndarray
    obs_names: pd.Index
    empty: np.ndarray
    n_counts: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __repr__(self) -> str:
        mean = float(self.lengths.mean()) if len(self) else 0.0
        return (
            f"TokenizedCells(n_cells={len(self)}, vocab={self.vocab.version!r}, max_length={self.max_length}, "
            f"mean_length={mean:.1f}, n_empty={int(self.empty.sum())})"
        )

    @property
    def model_version(self) -> str:
        """The vocabulary's version label (``"V1"``, ``"V2"`` or a custom name)."""
        return self.vocab.version

    @property
    def max_length(self) -> int:
        """Maximum sequence length used (special tokens included)."""
        return int(self.params.get("max_length", self.vocab.max_length))

    def token_to_var(self) -> dict[int, int]:
        """Map each token id present in the input to the position of the first var holding it."""
        pos = np.flatnonzero(self.var_token_ids >= 0)
        tokens, first = np.unique(self.var_token_ids[pos], return_index=True)
        return dict(zip(tokens.tolist(), pos[first].tolist(), strict=True))

    def _indices(self, mask: Any) -> np.ndarray:
        arr = np.asarray(mask)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                raise ValueError(f"mask: boolean mask of shape {arr.shape}, expected ({len(self)},).")
            return np.flatnonzero(arr)
        if arr.dtype.kind not in "iu":
            # names of cells
            index = self.obs_names.get_indexer(arr)
            if np.any(index < 0):
                missing = arr[index < 0][:3].tolist()
                raise KeyError(f"mask: cells {missing} are not in obs_names.")
            return index
        arr = arr.astype(np.int64).ravel()
        if arr.size and (arr.min() < -len(self) or arr.max() >= len(self)):
            raise IndexError(f"mask: cell index out of range for {len(self)} cells.")
        return np.where(arr < 0, arr + len(self), arr)

    def subset(self, mask: Any) -> TokenizedCells:
        """Select cells by a boolean mask, integer positions or obs names (in that order)."""
        idx = self._indices(mask)
        return TokenizedCells(
            input_ids=[self.input_ids[i] for i in idx],
            lengths=self.lengths[idx].copy(),
            vocab=self.vocab,
            genes=self.genes,
            var_token_ids=self.var_token_ids,
            obs_names=self.obs_names[idx],
            empty=self.empty[idx].copy(),
            n_counts=self.n_counts[idx].copy(),
            params=dict(self.params),
        )

    def to_padded(
        self, indices: Any = None, *, pad_id: int | None = None, max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stack cells into a padded batch.

        Parameters
        ----------
        indices
            Cells to take (boolean mask, positions or names); all cells when None.
        pad_id
            Padding token id (default the vocabulary's ``<pad>``).
        max_length
            Pad to this length (default: the longest selected sequence); longer sequences are truncated.

        Returns
        -------
        ``(input_ids, attention_mask)``, int64 arrays of shape (n_cells, length); the mask is 1 on tokens.
        """
        idx = np.arange(len(self)) if indices is None else self._indices(indices)
        pad = self.vocab.pad_id if pad_id is None else int(pad_id)
        lens = self.lengths[idx]
        width = int(lens.max()) if idx.size else 0
        if max_length is not None:
            width = int(max_length)
        ids = np.full((idx.size, width), pad, dtype=np.int64)
        mask = np.zeros((idx.size, width), dtype=np.int64)
        for row, i in enumerate(idx):
            seq = self.input_ids[i][:width]
            ids[row, : seq.size] = seq
            mask[row, : seq.size] = 1
        return ids, mask


def _check_raw(data: np.ndarray, name: str) -> None:
    """Raise unless ``data`` holds non-negative integers (raw counts)."""
    if data.size == 0 or data.dtype.kind in "ub":
        return
    if data.dtype.kind == "i":
        if data.min() < 0:
            raise ValueError(f"{name} has negative values; tokenize needs raw counts (pass layer= with raw counts).")
        return
    if data.dtype.kind != "f":
        raise ValueError(f"{name} has dtype {data.dtype}; tokenize needs numeric raw counts.")
    if not data.min() >= 0:  # also catches NaN
        raise ValueError(f"{name} has negative or NaN values; tokenize needs raw counts (pass layer= with raw counts).")
    if not np.array_equal(np.floor(data), data):
        raise ValueError(
            f"{name} has non-integer values (normalised or log-transformed?); tokenize needs raw counts "
            "(pass layer= naming a layer with raw counts)."
        )


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))


def _row_sums(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR data in float64."""
    n_rows = indptr.size - 1
    out = np.zeros(n_rows, dtype=np.float64)
    nonempty = np.diff(indptr) > 0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(data, indptr[:-1][nonempty], dtype=np.float64)
    return out


def _filter(indptr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Return the indptr after dropping the entries where ``keep`` is False."""
    kept = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(keep, out=kept[1:])
    return kept[indptr]


def _to_columns(
    chunk: RowChunk, var_col: np.ndarray, n_cols: int, has_duplicates: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map a chunk over vars to vocabulary columns: returns ``(indptr, cols, data)``.

    Within each row the entries come out ordered by column (= by first var position), duplicates
    summed and zeros dropped.
    """
    cols = var_col[chunk.indices]
    keep = cols >= 0
    indptr, data = chunk.indptr, chunk.data
    if not keep.all():
        indptr = _filter(indptr, keep)
        cols, data = cols[keep], data[keep]
    if has_duplicates or not chunk.sorted_indices:
        rows = _row_ids(indptr)
        agg = sp.csr_matrix(
            (data.astype(np.float64), (rows, cols)), shape=(chunk.n_rows, n_cols)
        )  # COO -> CSR sums duplicates
        agg.sum_duplicates()
        agg.sort_indices()
        indptr, cols, data = agg.indptr.astype(np.int64), agg.indices.astype(np.int64), agg.data
    nonzero = data != 0
    if not nonzero.all():
        indptr = _filter(indptr, nonzero)
        cols, data = cols[nonzero], data[nonzero]
    return indptr, cols, data


_PAD_KEY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_LOW32 = np.uint64(0xFFFF_FFFF)


def _length_groups(lens_sorted: np.ndarray, start: int, budget: int) -> Iterator[tuple[int, int]]:
    """Split ``range(start, len)`` of rows sorted by length into groups whose padded size fits ``budget``."""
    n_rows = lens_sorted.size
    while start < n_rows:
        n = np.arange(1, n_rows - start + 1)
        fits = n * lens_sorted[start:] <= budget
        stop = start + max(1, int(np.count_nonzero(fits)))
        yield start, stop
        start = stop


def _top_ranked(
    indptr: np.ndarray, values: np.ndarray, k: int, *, budget: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank each row's values, highest first, ties in the order of the entries; keep the first ``k``.

    Returns ``(order, kept, ranked)``: the rows sorted by number of entries (``order``), the number kept for
    each of them (``kept``, in that order) and the positions into ``values`` of the kept entries, row after
    row in that order, each row in rank order.

    Rows are sorted with 64-bit keys: the complemented float32 bits of the value (high half, so larger
    values come first) and the entry's position (low half, so ties keep their order), in one row-wise sort
    of a padded array per group of similarly long rows. Rows where float32-equal keys hide a float64 order
    (values within float32 rounding of each other) are then re-sorted exactly.
    """
    lens = np.diff(indptr)
    order = np.argsort(lens, kind="stable")
    lens_p = lens[order]
    kept = np.minimum(lens_p, k)
    n_entries = values.size
    if n_entries == 0:
        return order, kept, np.zeros(0, dtype=np.int64)
    cum = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens_p, out=cum[1:])
    # src[j]: position in ``values`` of the j-th entry in row-length order
    src = np.repeat(indptr[:-1][order] - cum[:-1], lens_p)
    src += np.arange(n_entries, dtype=np.int64)
    key = (~values[src].astype(np.float32).view(np.uint32)).astype(np.uint64)
    key <<= np.uint64(32)
    key |= np.arange(n_entries, dtype=np.uint64)
    for lo, hi in _length_groups(lens_p, int(np.searchsorted(lens_p, 1)), budget):
        width = int(lens_p[hi - 1])
        seg = key[cum[lo] : cum[hi]]
        if int(lens_p[lo]) == width:
            seg.reshape(hi - lo, width).sort(axis=1)
            continue
        valid = np.arange(width)[None, :] < lens_p[lo:hi, None]
        padded = np.full((hi - lo, width), _PAD_KEY, dtype=np.uint64)
        padded[valid] = seg
        padded.sort(axis=1)
        seg[:] = padded[valid]
    pos = (key & _LOW32).astype(np.int64)
    key >>= np.uint64(32)
    same = key[1:] == key[:-1]
    inner = cum[1:-1]
    same[inner[(inner > 0) & (inner < n_entries)] - 1] = False  # pairs across rows do not count
    if same.any():
        at = np.flatnonzero(same)
        wrong = values[src[pos[at]]] < values[src[pos[at + 1]]]
        for row in np.unique(np.searchsorted(cum, at[wrong], side="right") - 1):
            # rare: float32-equal keys hiding a float64 order; sort this row exactly
            seg = np.arange(cum[row], cum[row + 1])
            pos[cum[row] : cum[row + 1]] = seg[np.lexsort((seg, -values[src[seg]]))]
    ranked = src[pos]
    if int(kept[-1]) < int(lens_p[-1]):  # some rows are longer than k
        rank = np.arange(n_entries, dtype=np.int64) - np.repeat(cum[:-1], lens_p)
        ranked = ranked[rank < k]
    return order, kept, ranked


# --------------------------------------------------------------------------------------------
# Gene ids -> vocabulary columns
# --------------------------------------------------------------------------------------------


def _var_ids(adata: AnnData, gene_id_key: str | None) -> pd.Index:
    if gene_id_key is None:
        return adata.var_names
    if gene_id_key not in adata.var.columns:
        raise KeyError(f"gene_id_key={gene_id_key!r} is not a column of adata.var; columns: {list(adata.var.columns)}.")
    return pd.Index(adata.var[gene_id_key].astype(str))


def _columns(var_token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Compact columns (unique tokens ordered by their first var), the var -> column map, duplicates flag."""
    in_vocab = np.flatnonzero(var_token_ids >= 0)
    tokens, first = np.unique(var_token_ids[in_vocab], return_index=True)
    by_first = np.argsort(first)
    col_tokens = tokens[by_first]
    token_to_col = np.full(int(var_token_ids.max()) + 1 if in_vocab.size else 1, -1, dtype=np.int64)
    token_to_col[col_tokens] = np.arange(col_tokens.size)
    var_col = np.full(var_token_ids.size, -1, dtype=np.int64)
    var_col[in_vocab] = token_to_col[var_token_ids[in_vocab]]
    return col_tokens, var_col, col_tokens.size < in_vocab.size


def _resolve_vocab(model_version: str, vocab: GeneformerVocab | str | None) -> GeneformerVocab:
    from sc_dta.models.vocab import GeneformerVocab

    if vocab is None:
        if str(model_version).strip().upper() not in ("V1", "V2"):
            raise ValueError(f"model_version={model_version!r} must be 'V1' or 'V2' (or pass vocab=).")
        return GeneformerVocab.load(str(model_version).strip().upper())
    if isinstance(vocab, GeneformerVocab):
        return vocab
    return GeneformerVocab.load(vocab)


def _n_counts_column(adata: AnnData, n_counts_key: str) -> np.ndarray | None:
    if n_counts_key not in adata.obs.columns:
        return None
    values = pd.to_numeric(adata.obs[n_counts_key], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        raise ValueError(
            f"obs[{n_counts_key!r}] has {int(bad.sum())} missing, non-numeric or negative values "
            f"(e.g. cell {adata.obs_names[np.flatnonzero(bad)[0]]!r})."
        )
    return values


# --------------------------------------------------------------------------------------------
# tokenize
# --------------------------------------------------------------------------------------------


def tokenize(
    adata: AnnData | MuData,
    *,
    model_version: str = "V2",
    layer: str | None = None,
    gene_id_key: str | None = None,
    n_counts_key: str = "n_counts",
    max_length: int | None = None,
    vocab: GeneformerVocab | str | None = None,
    cells: Sequence[str] | np.ndarray | None = None,
    mod: str = "rna",
    chunk_size: int | None = None,
) -> TokenizedCells:
    """Geneformer rank-value encoding of raw counts.

    For each cell, the count of every gene in the vocabulary is normalised as
    ``counts / n_counts * 10,000 / median`` (``median``: the gene's non-zero median over the
    pretraining corpus), zeros are dropped and the genes are ranked by that value, highest first.
    This is exactly Geneformer's ``TranscriptomeTokenizer``:

    * gene ids (``var_names`` or ``var[gene_id_key]``) are upper-cased and mapped through the
      vocabulary's mapping dictionary (Ensembl ids, old ids, symbols and aliases); a versioned
      Ensembl id (such as ``ENSG00000136574.18``) that does not map is retried without its version; vars mapping to
      the same Ensembl id are summed; vars outside the vocabulary are dropped;
    * ``n_counts`` is the cell's total over *all* vars (including those outside the vocabulary),
      read from ``obs[n_counts_key]`` or computed when that column is absent;
    * V2: ``<cls>`` + the first 4,094 genes + ``<eos>`` (at most 4,096 tokens); V1: the first
      2,048 genes, no special tokens. ``max_length`` lowers that cap (special tokens included).

    Ties (equal values, e.g. two genes with the same count and the same median) are ordered by the
    position of the gene in ``adata.var`` (its first var when duplicates are summed), which is what a
    *stable* version of Geneformer's ``np.argsort(-x)`` gives on the same input; Geneformer itself
    uses an unstable sort and may order ties arbitrarily. Values are computed in float64.

    Cells without counts in vocabulary genes are kept, with an empty sequence (V1) or ``<cls><eos>``
    (V2), and flagged in ``empty``. ``obs['filter_pass']`` is not applied: subset the AnnData (or pass
    ``cells=``) instead. The AnnData is never modified.

    The counts are read ``chunk_size`` cells at a time (:func:`sc_dta._chunks.iter_row_chunks`), so a backed
    AnnData (``anndata.read_h5ad(path, backed="r")``, ``X`` a CSR, CSC or dense matrix on disk) is streamed:
    memory holds one chunk of counts plus the token ids of the cells read so far. With ``cells=`` only the
    chunks holding those cells are read. Only ``X`` is on disk in a backed AnnData (anndata reads the layers
    into memory when it opens the file), so ``layer=`` on a backed AnnData works but is not streamed (a
    warning says so).

    Parameters
    ----------
    adata
        AnnData (in memory or backed) or MuData (modality ``mod``) with raw counts.
    model_version
        ``"V1"`` or ``"V2"``: which published vocabulary to use (ignored when ``vocab`` is given).
    layer
        Layer with the raw counts (default ``X``).
    gene_id_key
        ``var`` column with Ensembl ids or symbols (default ``var_names``).
    n_counts_key
        ``obs`` column with each cell's total counts; computed over all genes when absent.
    max_length
        Maximum tokens per cell including special tokens; at most the vocabulary's ``max_length``.
    vocab
        A :class:`~sc_dta.models.GeneformerVocab` (or a path / name for
        :meth:`~sc_dta.models.GeneformerVocab.load`) to use instead of ``model_version``.
    cells
        Cells to tokenize: a boolean mask over ``obs``, obs names, or None for all cells. The result holds
        these cells only, in obs order.
    mod
        MuData modality.
    chunk_size
        Cells read and processed at a time (memory vs speed); default ``sc_dta.settings.chunk_size_cells``
        (2,048).

    Returns
    -------
    The :class:`TokenizedCells` of the selected cells, in obs order.
    """
    adata = get_anndata(adata, mod)
    voc = _resolve_vocab(model_version, vocab)
    specials = 2 if voc.cls_id is not None else 0
    if max_length is None:
        max_length = voc.max_length
    max_length = int(max_length)
    if max_length > voc.max_length or max_length < specials + 1:
        raise ValueError(
            f"max_length={max_length} must be between {specials + 1} and the vocabulary's {voc.max_length} tokens."
        )
    chunk_size = chunk_size_or_default(chunk_size)
    n_genes_max = max_length - specials

    ids = _var_ids(adata, gene_id_key)
    var_token_ids = voc.lookup(ids)
    if not np.any(var_token_ids >= 0):
        source = f"adata.var[{gene_id_key!r}]" if gene_id_key is not None else "adata.var_names"
        raise ValueError(
            f"None of the {len(ids)} genes in {source} (e.g. {list(ids[:3])}) is in the Geneformer {voc.version} "
            "vocabulary; pass gene_id_key= naming a var column with Ensembl gene ids or symbols."
        )
    col_tokens, var_col, has_duplicates = _columns(var_token_ids)
    col_median = voc.median_by_id[col_tokens]
    if has_duplicates:
        logger.info("Several vars map to the same vocabulary gene; their counts are summed.")
    logger.info(
        "%d of %d vars map to %d tokens of the Geneformer %s vocabulary.",
        int((var_token_ids >= 0).sum()),
        len(ids),
        col_tokens.size,
        voc.version,
    )

    n_counts_given = _n_counts_column(adata, n_counts_key)
    if n_counts_given is None:
        logger.info("obs[%r] not found; computing n_counts per cell over all %d vars.", n_counts_key, adata.n_vars)
    X, name = counts_matrix(adata, layer)
    mask = cells_mask(adata, cells)
    rows = None if mask.all() else np.flatnonzero(mask)
    n_out = adata.n_obs if rows is None else rows.size

    input_ids: list[np.ndarray] = []
    lengths = np.zeros(n_out, dtype=np.int64)
    n_counts = np.zeros(n_out, dtype=np.float64)
    empty = np.zeros(n_out, dtype=bool)
    done = 0  # cells of the output filled so far
    store = _TokenStore(_TokenStore.SLAB if n_out > chunk_size else 0)
    for chunk in iter_row_chunks(X, adata.n_obs, rows=rows, chunk_size=chunk_size, desc="tokenize"):
        start, stop = done, done + chunk.n_rows
        _check_raw(chunk.data, name)
        nc = _row_sums(chunk.indptr, chunk.data) if n_counts_given is None else n_counts_given[chunk.rows]
        n_counts[start:stop] = nc
        indptr, cols, data = _to_columns(chunk, var_col, col_tokens.size, has_duplicates)
        lens = np.diff(indptr)
        expressed = lens > 0
        if np.any(nc[expressed] <= 0):
            bad = int(chunk.rows[np.flatnonzero(expressed & (nc <= 0))[0]])
            raise ValueError(
                f"obs[{n_counts_key!r}] is {n_counts_given[bad]} for cell {adata.obs_names[bad]!r}, which has "
                "counts; n_counts must be the cell's total counts."
            )
        values = data.astype(np.float64) / np.repeat(nc, lens)
        values *= TARGET_SUM
        values /= col_median[cols]
        order, kept, ranked = _top_ranked(indptr, values, n_genes_max)
        cell_ids, cell_lengths = _assemble(col_tokens[cols[ranked]], kept, voc, store)
        in_obs_order: list[np.ndarray] = [None] * chunk.n_rows  # type: ignore[list-item]
        for cell, ids in zip(order.tolist(), cell_ids, strict=True):
            in_obs_order[cell] = ids
        input_ids.extend(in_obs_order)
        lengths[start + order] = cell_lengths
        empty[start:stop] = ~expressed
        done = stop

    return TokenizedCells(
        input_ids=input_ids,
        lengths=lengths,
        vocab=voc,
        genes=pd.Index(adata.var_names[var_token_ids >= 0]),
        var_token_ids=var_token_ids,
        obs_names=pd.Index(adata.obs_names if rows is None else adata.obs_names[rows]),
        empty=empty,
        n_counts=n_counts,
        params={
            "model_version": voc.version,
            "layer": layer,
            "gene_id_key": gene_id_key,
            "n_counts_key": n_counts_key,
            "n_counts_computed": n_counts_given is None,
            "max_length": max_length,
            "ties": "var order",
        },
    )


class _TokenStore:
    """Hands out int64 arrays for the token ids of every cell, cut from large buffers ("slabs").

    A slab of :attr:`SLAB` entries (64 MiB) is above glibc's largest dynamic mmap threshold (32 MiB), so it is
    mapped outside the heap: the ids kept from each chunk do not pin the heap between the chunk's freed
    temporaries, which would otherwise make the resident memory grow with the number of chunks (measured: +3 MiB
    per chunk). Pages of a slab not yet written are not resident.
    """

    SLAB = 1 << 23

    def __init__(self, slab: int = SLAB) -> None:
        self._slab = int(slab)  # 0: an array of its own for every take (one chunk: nothing to fragment)
        self._buf = np.zeros(0, dtype=np.int64)
        self._pos = 0

    def take(self, n: int) -> np.ndarray:
        """Return an uninitialised int64 array of ``n`` entries (a view of the current slab)."""
        if self._pos + n > self._buf.size:
            self._buf = np.empty(max(self._slab, n), dtype=np.int64)
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


def _assemble(
    flat_genes: np.ndarray, n_gene_tokens: np.ndarray, voc: GeneformerVocab, store: _TokenStore | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Add ``<cls>``/``<eos>`` around each cell's genes (V2-style vocabularies) and split per cell.

    The cells' arrays are views of one array taken from ``store`` (a fresh array without one).
    """
    n_cells = n_gene_tokens.size
    take = (lambda n: np.empty(n, dtype=np.int64)) if store is None else store.take
    if voc.cls_id is None:
        lengths = n_gene_tokens.copy()
        out = take(flat_genes.size)
        out[:] = flat_genes
    else:
        lengths = n_gene_tokens + 2
        offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out = take(int(offsets[-1]))
        starts = offsets[:-1]
        out[starts] = voc.cls_id
        out[starts + n_gene_tokens + 1] = voc.eos_id
        gene_offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(n_gene_tokens, out=gene_offsets[1:])
        dest = np.repeat(starts + 1 - gene_offsets[:-1], n_gene_tokens) + np.arange(flat_genes.size)
        out[dest] = flat_genes
    bounds = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    b = bounds.tolist()
    return [out[b[i] : b[i + 1]] for i in range(n_cells)], lengths


# --------------------------------------------------------------------------------------------
# Gene medians for custom vocabularies (GeneformerVocab.from_adata)
# --------------------------------------------------------------------------------------------


def _gene_medians(
    adata: AnnData | MuData,
    *,
    layer: str | None,
    gene_id_key: str | None,
    n_counts_key: str,
    mod: str,
    chunk_size: int,
) -> tuple[list[str], np.ndarray]:
    """Upper-case gene ids (first-appearance order) and their non-zero medians of counts/n_counts*1e4.

    Genes never expressed get NaN.
    """
    adata = get_anndata(adata, mod)
    ids = pd.Index(_var_ids(adata, gene_id_key).astype(str).str.upper())
    codes, uniques = pd.factorize(ids)
    var_col = codes.astype(np.int64)
    has_duplicates = uniques.size < ids.size
    n_counts_given = _n_counts_column(adata, n_counts_key)
    X, name = counts_matrix(adata, layer)
    all_cols: list[np.ndarray] = []
    all_values: list[np.ndarray] = []
    for chunk in iter_row_chunks(X, adata.n_obs, chunk_size=chunk_size, desc="gene medians"):
        _check_raw(chunk.data, name)
        if n_counts_given is None:
            nc = _row_sums(chunk.indptr, chunk.data)
        else:
            nc = n_counts_given[chunk.rows]
        indptr, cols, data = _to_columns(chunk, var_col, uniques.size, has_duplicates)
        row_nc = np.repeat(nc, np.diff(indptr))
        ok = row_nc > 0
        all_cols.append(cols[ok])
        all_values.append(data[ok].astype(np.float64) / row_nc[ok] * TARGET_SUM)
    cols = np.concatenate(all_cols) if all_cols else np.zeros(0, dtype=np.int64)
    values = np.concatenate(all_values) if all_values else np.zeros(0)
    order = np.lexsort((values, cols))
    values = values[order]
    counts = np.bincount(cols, minlength=uniques.size)
    starts = np.zeros(uniques.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    medians = np.full(uniques.size, np.nan)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    medians[has] = (values[lo] + values[hi]) / 2
    return [str(u) for u in uniques], medians
