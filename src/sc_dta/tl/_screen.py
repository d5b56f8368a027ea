"""In-silico screens: many perturbations of many genes in one pass, a perturbations × genes AnnData."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from sc_dta._chunks import cells_mask
from sc_dta._distributed import Distributed
from sc_dta._utils import get_anndata
from sc_dta.models._perturb_engine import KINDS, PerturbSpec, holds_tokens, run_perturbations
from sc_dta.tl._perturb import (
    _as_encoder,
    _as_model,
    _assemble,
    _assemble_expression,
    _check_dna,
    _check_readout,
    _check_tokens_fit,
    _gene_tss,
    _h5ad_safe,
    _model_info,
    _mutation_text,
    _refuse_foreign_slots,
    _resolve_gene,
    _select_cells,
    _special_ids,
    _token_columns,
    _tokenize,
    _vocab_of,
)

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData
    from torch import nn

    from sc_dta.genome import Genome
    from sc_dta.models.dna import DNAEncoder

logger = logging.getLogger(__name__)

__all__ = ["screen"]

#: Version of the checkpoint layout (a directory written by another layout is refused).
CHECKPOINT_VERSION = 2


# --------------------------------------------------------------------------------------------- perturbation table


@dataclass
class _Perturbation:
    """One row of the screen: a gene and what is done to it."""

    gene: str
    kind: str  # "delete", "overexpress" or "tss_mutation"
    mutations: list[Any] | None  # the mutation group of a TSS mutation
    text: str


def _one(gene: Any, perturbation: Any) -> _Perturbation:
    if not isinstance(gene, str) or not gene:
        raise TypeError(f"perturbations: gene must be a non-empty string, got {gene!r}.")
    if isinstance(perturbation, str) and perturbation in KINDS:
        return _Perturbation(gene, perturbation, None, perturbation)
    if perturbation is None or (isinstance(perturbation, float) and np.isnan(perturbation)):
        raise ValueError(f"perturbations: no perturbation given for gene {gene!r}.")
    if isinstance(perturbation, str) or not isinstance(perturbation, Sequence):
        group = [perturbation]
    else:
        group = list(perturbation)
        if not group:
            raise ValueError(f"perturbations: an empty group of mutations was given for gene {gene!r}.")
    from sc_dta.genome import parse_mutation

    for m in group:
        try:
            parse_mutation(m)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"perturbations: {m!r} for gene {gene!r} is neither 'delete', 'overexpress' nor a mutation spec: {e}"
            ) from e
    return _Perturbation(gene, "tss_mutation", group, _mutation_text(group))


def _genes_near(adata: AnnData, variant: Any, genome: Genome | None, encoder: DNAEncoder | None) -> list[str]:
    """Var names of the genes whose TSS window (``encoder.window``) contains ``variant``."""
    if genome is None or encoder is None:
        raise ValueError(
            f"perturbations: the bare variant {variant} (a VCF record) is assigned to the genes whose TSS window "
            "contains it, which needs genome= and encoder=; or pass (gene, variant) tuples."
        )
    if "tss_chrom" not in adata.var.columns:
        raise KeyError("adata.var lacks 'tss_chrom'; run sc_dta.pp.annotate_tss(adata, gtf) first.")
    chrom = genome.resolve_chrom(variant.chrom)
    var = adata.var
    ok = var["tss_chrom"].notna().to_numpy() & var["tss_pos"].notna().to_numpy()
    same = np.zeros(adata.n_vars, dtype=bool)
    names = var["tss_chrom"].astype(str).to_numpy()
    for c in np.unique(names[ok]):
        try:
            if genome.resolve_chrom(str(c)) == chrom:
                same |= names == c
        except KeyError:
            continue
    same &= ok
    half = int(encoder.window) // 2 + abs(int(getattr(encoder, "center_shift", 0)))
    pos0 = int(variant.pos) - 1
    tss = pd.to_numeric(var["tss_pos"], errors="coerce").to_numpy()
    near = same & (np.abs(np.where(same, tss, np.inf) - pos0) <= half)
    return [str(g) for g in adata.var_names[near]]


def _perturbation_table(
    perturbations: Any, adata: AnnData, genome: Genome | None, encoder: DNAEncoder | None
) -> list[_Perturbation]:
    """Normalise ``perturbations`` (a DataFrame, (gene, perturbation) tuples, bare VCF records) to rows."""
    from sc_dta.genome import Variant

    if isinstance(perturbations, pd.DataFrame):
        missing = [c for c in ("gene", "perturbation") if c not in perturbations.columns]
        if missing:
            raise KeyError(
                f"perturbations: the DataFrame lacks the column(s) {missing}; expected 'gene' and 'perturbation'."
            )
        items: Iterable[Any] = zip(perturbations["gene"], perturbations["perturbation"], strict=True)
    elif isinstance(perturbations, str | Variant) or not isinstance(perturbations, Iterable):
        raise TypeError(
            "perturbations: expected a list of (gene, perturbation) tuples, VCF records or a DataFrame with columns "
            f"'gene' and 'perturbation', got {type(perturbations).__name__}."
        )
    else:
        items = perturbations
    rows: list[_Perturbation] = []
    n_far = 0
    for item in items:
        if isinstance(item, Variant):
            genes = _genes_near(adata, item, genome, encoder)
            n_far += not genes
            rows += [_one(g, item) for g in genes]
        elif isinstance(item, tuple | list) and len(item) == 2:
            rows.append(_one(item[0], item[1]))
        else:
            raise TypeError(
                f"perturbations: each element must be a (gene, perturbation) pair or a Variant, got {item!r}."
            )
    if n_far:
        warnings.warn(
            f"perturbations: {n_far} variant(s) lie outside every gene's TSS window and were left out.",
            UserWarning,
            stacklevel=3,
        )
    if not rows:
        raise ValueError("perturbations: no perturbation to run.")
    return rows


# --------------------------------------------------------------------------------------------- the cells


class _Cells:
    """The tokenized, selected cells shared by every perturbation (as ``_Run`` selects them for one gene).

    Only the selected cells' counts are read, chunk by chunk (a backed ``adata`` is streamed from its file).
    """

    def __init__(self, adata: AnnData, model: nn.Module, tokens: Any, cells: Any, layer: str | None) -> None:
        mask = cells_mask(adata, cells)
        self.adata_like = adata  # only its shape is used by the assemblers
        self.tokens = _tokenize(adata, model, tokens, layer, mask)
        self.vocab = _vocab_of(model, self.tokens)
        if tokens is not None:
            _check_tokens_fit(model, self.tokens)
        self.rows, self.cells = _select_cells(adata, self.tokens, mask)
        self.n_selected = int(mask.sum())
        size = len(self.vocab) if hasattr(self.vocab, "__len__") else 0
        self.tok2col = _token_columns(self.tokens, size)
        tok2var = self.tokens.token_to_var()
        self.columns = np.asarray(sorted(int(t) for t in tok2var), dtype=np.int64)
        self.specials = _special_ids(self.vocab)


# --------------------------------------------------------------------------------------------- checkpoints


class _Checkpoint:
    """One ``.npz`` per finished perturbation in a directory, with a manifest of what the screen is."""

    def __init__(self, directory: str | os.PathLike | None, fingerprint: dict[str, Any]) -> None:
        self.dir = None if directory is None else Path(directory).expanduser()
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        if manifest.exists():
            old = manifest.read_text()
            if old != text:
                raise ValueError(
                    f"checkpoint_dir={str(self.dir)!r} holds another screen (different perturbations, cells, model "
                    "or settings); use an empty directory or the original arguments."
                )
        else:
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, manifest)

    def _path(self, i: int) -> Path:
        return self.dir / f"perturbation_{i:07d}.npz"

    def done(self, n: int) -> set[int]:
        if self.dir is None:
            return set()
        return {i for i in range(n) if self._path(i).exists()}

    def save(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        if self.dir is None:
            return
        tmp = self.dir / f".perturbation_{i:07d}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, self._path(i))

    def load(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self._path(i), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------- statistics


def _partial(
    layer: Any, obs: dict[str, np.ndarray], groups: list[np.ndarray], per_cell: bool, cell_values: bool
) -> dict[str, Any]:
    """Return the sums one process keeps of one perturbation on its cells (added over processes).

    ``cell_values``: also each cell's mean gene shift and cell-embedding shift; ``per_cell``: also the gene layer.
    """
    n_vars = layer.shape[1]
    layer = layer.tocsr()

    def sums(sub: Any) -> tuple[np.ndarray, np.ndarray]:
        n = np.bincount(sub.indices, minlength=n_vars).astype(np.int64)
        return np.bincount(sub.indices, weights=sub.data.astype(np.float64), minlength=n_vars), n

    total, n = sums(layer)
    g = [sums(layer[rows]) for rows in groups]
    out = {
        "total": total,
        "n": n,
        "n_cells": int(obs["_evaluated"].sum()),
        "group_total": np.stack([t for t, _ in g]) if g else np.zeros((0, n_vars)),
        "group_n": np.stack([c for _, c in g]) if g else np.zeros((0, n_vars), dtype=np.int64),
    }
    if cell_values or per_cell:
        out["cell"] = obs["_cell"]
        out["cell_emb"] = obs.get("_cell_emb", np.full(layer.shape[0], np.nan, dtype=np.float32))
    if per_cell:
        out["layer"] = layer
    return out


def _mean(total: np.ndarray, n: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan).astype(np.float32)


def _combine(parts: list[dict[str, Any]], per_cell: bool) -> dict[str, np.ndarray]:
    """Return what the screen keeps of one perturbation (means, counts, group means, per-cell values if asked)."""
    total = sum(p["total"] for p in parts)
    n = sum(p["n"] for p in parts)
    g_total = sum(p["group_total"] for p in parts)
    g_n = sum(p["group_n"] for p in parts)
    out = {
        "mean": _mean(total, n),
        "n": n.astype(np.int64),
        "n_cells": np.int64(sum(p["n_cells"] for p in parts)),
        "group_mean": _mean(g_total, g_n),
        "group_n": np.asarray(g_n, dtype=np.int64),
    }
    for k in ("cell", "cell_emb") if "cell" in parts[0] else ():  # disjoint cells: one value per cell at most
        values = np.stack([p[k] for p in parts])
        seen = ~np.isnan(values)
        out[k] = np.where(seen.any(axis=0), np.where(seen, values, 0).sum(axis=0), np.nan).astype(np.float32)
    if per_cell:
        layer = parts[0]["layer"]
        for p in parts[1:]:
            layer = layer + p["layer"]  # the processes' cells are disjoint rows
        layer = layer.tocsr()
        layer.sort_indices()
        out |= {"data": layer.data, "indices": layer.indices, "indptr": layer.indptr}
    return out


# --------------------------------------------------------------------------------------------- public


def screen(
    adata: AnnData | MuData,
    perturbations: Sequence[Any] | pd.DataFrame,
    *,
    model: nn.Module,
    genome: Genome | None = None,
    encoder: DNAEncoder | None = None,
    layer: str | None = None,
    cells: Sequence[str] | np.ndarray | None = None,
    groupby: str | None = None,
    readout: Literal["expression", "cosine"] = "expression",
    per_cell: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    mod: str = "rna",
    tokens: Any = None,
    emb_layer: int | str = -1,
    n_folds: int = 7,
    chunk_size: int = 32,
    key_added: str | None = "screen",
) -> AnnData | None:
    """Run many perturbations of many genes and return a perturbations × genes AnnData.

    Each row gives what :func:`perturb_gene` (``"delete"``, ``"overexpress"``) or :func:`perturb_tss` (a TSS
    mutation, through ``encoder`` and the model's adapter) would write to ``var[key + '_mean']`` for that gene
    and perturbation on the same cells and readout, but the cells are tokenized once and each cell's
    unperturbed forward pass is shared:

    - ``readout="cosine"``: by every perturbation of a chunk of ``chunk_size`` perturbations, whatever the gene
      (k perturbations of a cell cost about ``k + k / chunk_size`` forwards instead of ``2 k``);
    - ``readout="expression"``: by every perturbation of the same gene. Here the unperturbed readout depends on
      the gene itself (its position is held out of the masked folds and it is excluded from the predicted
      distribution), so it cannot be shared across genes without changing the readout.

    Perturbations are processed gene by gene in chunks of ``chunk_size``; only one chunk's per-cell results are
    in memory at a time (memory bounded by ``chunk_size`` and the cells, not by the number of perturbations),
    and finished perturbations are written to ``checkpoint_dir`` as they complete.

    Parameters
    ----------
    adata
        AnnData with raw counts (TSS annotation from :func:`sc_dta.pp.annotate_tss` for TSS mutations), or a MuData.
        Only its ``key_added`` slots are written, after success. It may be backed
        (``anndata.read_h5ad(path, backed="r")``): the selected cells' counts are then read from the file chunk by
        chunk (``sc_dta.settings.chunk_size_cells`` cells at a time).
    perturbations
        A list of ``(gene, perturbation)`` pairs or a DataFrame with columns ``gene`` and ``perturbation``. A
        perturbation is ``"delete"``, ``"overexpress"``, a mutation spec accepted by :func:`perturb_tss`
        (``"chr8:11676959:C>T"``, ``"delete:-100:+50"``, a :class:`~sc_dta.genome.Variant`, ...) or a list of
        them applied together (a haplotype). A bare :class:`~sc_dta.genome.Variant` (e.g. each record of
        :func:`sc_dta.genome.read_vcf`) becomes one row for every gene whose TSS window (``encoder.window``)
        contains it. :func:`sc_dta.genome.saturation` gives every SNV of a TSS-relative range.
    model
        A Geneformer ``BertForMaskedLM`` or :class:`~sc_dta.models.BioDTA` (required for TSS mutations), or its
        folder.
    genome, encoder
        The genome and DNA encoder for TSS mutations (as in :func:`perturb_tss`); unused otherwise.
    layer
        Layer with the raw counts (default ``X``). Of a backed AnnData only ``X`` is streamed from disk; anndata
        holds its layers in memory (a warning says so).
    cells
        Boolean mask over ``obs``, obs names, or None for all cells. Only these cells' counts are read.
    groupby
        An ``obs`` column: also the mean shift within each of its groups.
    readout
        ``"expression"`` or ``"cosine"`` (see :func:`perturb_tss`).
    per_cell
        Also return the per-cell shifts (memory grows with the number of perturbations).
    checkpoint_dir
        Directory for finished perturbations (one ``.npz`` each, and a ``manifest.json`` of the screen). Rerunning
        with the same arguments skips those done; another screen's directory is refused.
    batch_size
        Sequences per forward pass (default ``settings.batch_size_cells``).
    device
        Compute device (default ``settings.device``).
    seed
        Seed of random mutations and of the expression readout's folds.
    mod
        Modality of a MuData.
    tokens
        A :class:`~sc_dta.pp.TokenizedCells` to reuse.
    emb_layer
        Layer compared by the cosine readout (``-1`` second-to-last).
    n_folds
        Folds of masked positions of the expression readout.
    chunk_size
        Perturbations evaluated together (they share the unperturbed forward; their per-cell results are held
        at the same time).
    key_added
        Where the per-cell results go in ``adata`` (see below); None leaves ``adata`` unchanged. Slots that are not
        a previous screen's are never overwritten (an error, nothing written).

    Returns
    -------
    AnnData (None on the processes other than rank 0 of a process group) with one observation per perturbation and the variables of ``adata``:

    ``X``
        float32 mean shift over the evaluated cells where the gene was measured (NaN where none).
    ``obs``
        ``gene`` (as given), ``gene_id``, ``perturbation`` (text), ``kind`` (``"delete"``, ``"overexpress"``,
        ``"tss_mutation"``), ``n_cells`` (cells evaluated).
    ``var``
        ``adata.var_names`` and the gene-name columns of ``adata.var`` (``gene_symbols``, ...).
    ``layers['n']``
        Number of cells behind each value of ``X``.
    ``layers[f'mean_{group}']``, ``layers[f'n_{group}']``
        With ``groupby``: the same within each group.
    ``obsm['cell_shift']``, ``obsm['cell_emb_shift']``, ``uns['per_cell']``
        With ``per_cell=True``: DataFrames (perturbations × cells, columns ``adata.obs_names``) of the mean gene
        shift of each cell and (cosine) its cell-embedding shift, NaN where not evaluated; and
        ``uns['per_cell']['shift']``, a dict from each ``obs_name`` of the result to the CSR
        ``n_obs × n_vars`` layer :func:`perturb_gene` would write.
    ``uns['screen']['params']``
        readout, model, cells, groupby and its groups, seed, n_folds, emb_layer.

    In ``adata`` (unless ``key_added=None``; on rank 0 of a process group), one column per perturbation, in the
    result's order, NaN for cells not evaluated:

    ``obsm[f'{key_added}_cell_shift']``
        float32 cells × perturbations: each cell's mean gene shift (what :func:`perturb_gene` writes to
        ``obs[key + '_cell']``).
    ``obsm[f'{key_added}_cell_emb_shift']``
        With ``readout="cosine"``: each cell's cell-embedding shift (``obs[key + '_cell_emb']`` of
        :func:`perturb_gene`).
    ``uns[key_added]``
        ``perturbations`` (the result's ``obs_names``, naming the columns) and ``params``.

    These grow with cells × perturbations (4 bytes each, twice with the cosine readout: 1.6 GB for 200,000 cells ×
    1,000 perturbations); pass ``key_added=None`` when a screen is that large and only the means are needed.

    The result can be added to a MuData (``mudata.MuData({'rna': adata, 'screen': result})``) and written with
    ``write_h5ad``.

    Notes
    -----
    Under an initialised :mod:`torch.distributed` process group (NCCL on GPUs, gloo on CPUs) of more than one
    process, every process must call :func:`screen` with the same arguments: the cells are sharded by token count
    (longest first, each to the least-loaded process) so that the processes finish together, each process runs
    all perturbations on its cells, and the sums are gathered on rank 0, which writes ``checkpoint_dir`` and
    returns the result (the other processes return None). Results equal one process up to float32 rounding of
    differently padded batches. Pass each process its own ``device`` (e.g. ``f"cuda:{local_rank}"``). With
    ``torchrun``::

        # screen.py
        import torch.distributed as dist

        dist.init_process_group("nccl")  # or "gloo" on CPUs
        rank = dist.get_rank()
        result = dta.tl.screen(adata, perturbations, model=model, device=f"cuda:{rank % torch.cuda.device_count()}")
        if rank == 0:
            result.write_h5ad("screen.h5ad")

        # torchrun --nproc-per-node 4 screen.py
    """
    from tqdm.auto import tqdm

    from sc_dta._settings import settings

    _check_readout(readout, n_folds)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}.")
    ad = get_anndata(adata, mod)
    model = _as_model(model, device)
    if encoder is not None:
        encoder = _as_encoder(encoder)
    if genome is not None:
        from sc_dta.tl._embed_dna import _as_genome

        genome = _as_genome(genome)
    _check_key_added(ad, key_added)
    table = _perturbation_table(perturbations, ad, genome, encoder)
    run = _Cells(ad, model, tokens, cells, layer)

    # resolve every gene (and TSS facts) before any compute
    gene_info: dict[str, tuple[int, int | None, str]] = {}
    tss_of: dict[str, tuple[str, int, str]] = {}
    for p in table:
        if p.gene not in gene_info:
            gene_info[p.gene] = _resolve_gene(ad, p.gene, run.tokens, run.vocab)
        if p.kind == "tss_mutation" and p.gene not in tss_of:
            if genome is None or encoder is None:
                raise ValueError(
                    f"perturbations: the TSS mutation {p.text!r} of {p.gene!r} needs genome= and encoder=."
                )
            if not (hasattr(model, "embed_tokens") and hasattr(model, "backbone")):
                raise TypeError(
                    f"model: TSS mutations need a BioDTA (DNA-aware token embeddings), got {type(model).__name__}."
                )
            tid, pos, _ = gene_info[p.gene]
            if pos is None:
                raise KeyError(f"gene: {p.gene!r} is not in adata.var_names.")
            tss_of[p.gene] = _gene_tss(ad, p.gene, pos)
            _check_dna(model, tid, p.gene, encoder)

    groups, group_rows = _groups(ad, groupby, run.rows)
    insert = bool(getattr(model, "position_free", False))
    n = len(table)
    fingerprint = {
        "version": CHECKPOINT_VERSION,
        "perturbations": [[p.gene, p.text] for p in table],
        "readout": readout,
        "n_folds": int(n_folds),
        "emb_layer": str(emb_layer),
        "seed": int(seed),
        "per_cell": bool(per_cell),
        "cell_values": key_added is not None,
        "groupby": groupby or "",
        "groups": groups,
        "layer": layer or "X",
        "cells": hashlib.sha256(np.asarray(ad.obs_names[run.rows]).astype(str).tobytes()).hexdigest(),
        "n_vars": int(ad.n_vars),
        "var_names": hashlib.sha256(np.asarray(ad.var_names).astype(str).tobytes()).hexdigest(),
        "model": _model_info(model),
    }
    dist = Distributed()
    failure: Exception | None = None
    done: set[int] | None = None
    if dist.main:
        try:
            ckpt = _Checkpoint(checkpoint_dir, fingerprint)
            done = ckpt.done(n)
        except (ValueError, OSError) as e:
            failure = e
    done, error = dist.broadcast((done, None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    if error is not None:
        raise RuntimeError(f"screen: the main process refused checkpoint_dir: {error}")
    if done:
        logger.info("screen: %d of %d perturbations already in %s", len(done), n, checkpoint_dir)
    token_ids = np.asarray([tid for tid, _, _ in gene_info.values()], dtype=np.int64)
    present = dict(zip(token_ids.tolist(), holds_tokens(run.cells, token_ids).any(axis=1).tolist(), strict=True))
    if dist.active:
        mine = dist.shard(np.asarray([len(c) for c in run.cells], dtype=np.int64))
        run.cells = [run.cells[j] for j in mine]
        run.rows = run.rows[mine]
        logger.info("screen: process %d of %d evaluates %d cells", dist.rank, dist.size, len(mine))

    order = sorted((i for i in range(n) if i not in done), key=lambda i: (table[i].gene, i))
    show = settings.progress and dist.main
    progress = settings.progress
    settings.progress = show  # the engines' bars too: only the main process draws them
    try:
        summaries = _run_chunks(
            run, model, table, order, chunk_size, gene_info, tss_of, genome, encoder, seed, device, present, readout,
            insert, emb_layer, n_folds, batch_size, group_rows, per_cell, key_added is not None, dist,
            ckpt if dist.main else None,
            tqdm(total=n, initial=len(done), desc="screen", unit="perturbation", disable=not show),
        )  # fmt: skip
    finally:
        settings.progress = progress
    if not dist.main:
        return None
    for i in done:
        summaries[i] = ckpt.load(i)
    result = _result(ad, table, gene_info, summaries, groups, per_cell, readout, run, model, fingerprint)
    if key_added is not None:
        _write_cell_results(ad, key_added, result, summaries, readout)
    return result


def _cell_slots(adata: AnnData, key: str) -> list[str]:
    slots = [f"obsm[{key + s!r}]" for s in ("_cell_shift", "_cell_emb_shift") if key + s in adata.obsm]
    return slots + ([f"uns[{key!r}]"] if key in adata.uns else [])


def _check_key_added(adata: AnnData, key: str | None) -> None:
    """Refuse a ``key_added`` whose slots hold something other than a previous screen's per-cell results."""
    if key is None:
        return
    if not isinstance(key, str) or not key:
        raise ValueError(f"key_added: expected a non-empty string or None, got {key!r}.")
    _refuse_foreign_slots(adata, key, _cell_slots(adata, key), ("screen",), "screen")


def _write_cell_results(
    adata: AnnData, key: str, result: AnnData, summaries: Mapping[int, dict[str, np.ndarray]], readout: str
) -> None:
    """Write the cells × perturbations shifts into ``adata`` (after the screen succeeded)."""
    n = result.n_obs
    previous = _cell_slots(adata, key)
    for slot in ("_cell_shift", "_cell_emb_shift"):
        adata.obsm.pop(key + slot, None)
    adata.obsm[f"{key}_cell_shift"] = np.stack([summaries[i]["cell"] for i in range(n)], axis=1).astype(np.float32)
    if readout == "cosine":
        emb = np.stack([summaries[i]["cell_emb"] for i in range(n)], axis=1).astype(np.float32)
        adata.obsm[f"{key}_cell_emb_shift"] = emb
    adata.uns[key] = {
        "params": {**result.uns["screen"]["params"], "kind": "screen"},
        "perturbations": np.asarray(result.obs_names, dtype=str),
    }
    if previous:
        logger.warning("screen: overwrote the previous screen's %s.", ", ".join(previous))


def _run_chunks(
    run, model, table, order, chunk_size, gene_info, tss_of, genome, encoder, seed, device, present, readout,
    insert, emb_layer, n_folds, batch_size, group_rows, per_cell, cell_values, dist, ckpt, bar,
) -> dict[int, dict[str, np.ndarray]]:  # fmt: skip
    """Evaluate the perturbations chunk by chunk; return their summaries (on the main process)."""
    summaries: dict[int, dict[str, np.ndarray]] = {}
    references: dict[str, str] = {}
    with bar:
        for start in range(0, len(order), int(chunk_size)):
            chunk = order[start : start + int(chunk_size)]
            specs = _specs(chunk, table, gene_info, tss_of, references, genome, encoder, seed, device)
            parts = {
                i: _partial(layer_, obs, group_rows, per_cell, cell_values)
                for i, layer_, obs, var in _evaluate(
                    run,
                    model,
                    chunk,
                    table,
                    specs,
                    present,
                    readout,
                    insert,
                    emb_layer,
                    n_folds,
                    seed,
                    batch_size,
                    device,
                )  # fmt: skip
            }
            gathered = dist.gather(parts)
            if dist.main:
                for i in chunk:
                    summaries[i] = _combine([g[i] for g in gathered], per_cell)
                    ckpt.save(i, summaries[i])
            bar.update(len(chunk))
    return summaries


def _groups(adata: AnnData, groupby: str | None, rows: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Group names and the adata rows of each (selected cells only)."""
    if groupby is None:
        return [], []
    if groupby not in adata.obs.columns:
        raise KeyError(f"groupby: {groupby!r} is not a column of adata.obs.")
    col = adata.obs[groupby]
    cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.Index(pd.unique(col.dropna()))
    names = [str(c) for c in cats]
    if len(set(names)) != len(names):
        raise ValueError(f"groupby: the groups of {groupby!r} are not distinct as text: {names}.")
    selected = np.zeros(adata.n_obs, dtype=bool)
    selected[rows] = True
    values = col.astype(object).to_numpy()
    return names, [np.flatnonzero(selected & (values == c)) for c in cats]


def _specs(
    chunk: list[int],
    table: list[_Perturbation],
    gene_info: dict,
    tss_of: dict,
    references: dict,
    genome: Any,
    encoder: Any,
    seed: int,
    device: Any,
) -> dict[int, PerturbSpec]:
    """Return the engine spec of each perturbation of a chunk (TSS mutations embedded through the encoder)."""
    from sc_dta.tl._dna_cache import embed_windows, tss_window

    specs: dict[int, PerturbSpec] = {}
    windows, owners = [], []
    for i in chunk:
        p = table[i]
        tid = gene_info[p.gene][0]
        if p.kind != "tss_mutation":
            specs[i] = PerturbSpec(kind=p.kind, token_id=tid)
            continue
        chrom, tss, strand = tss_of[p.gene]
        if p.gene not in references:
            references[p.gene] = tss_window(genome, chrom, tss, strand, encoder)
        reference = references[p.gene]
        try:
            seq = tss_window(genome, chrom, tss, strand, encoder, mutations=p.mutations, seed=seed)
        except (ValueError, KeyError) as e:
            raise type(e)(f"mutation {p.text!r} of {p.gene!r}: {e}") from e
        if len(seq) != len(reference):
            raise ValueError(f"mutation {p.text!r}: mutated window has {len(seq)} bp, expected {len(reference)}.")
        if seq == reference:
            raise ValueError(
                f"mutation {p.text!r} does not change the {len(reference)} bp window around the TSS of {p.gene!r} "
                f"({chrom}:{tss} {strand}); it lies outside the window or restores the reference."
            )
        windows.append(seq)
        owners.append(i)
    if windows:
        embeddings = embed_windows(windows, encoder, device=device)
        for i, e in zip(owners, embeddings, strict=True):
            specs[i] = PerturbSpec(kind="embedding", token_id=gene_info[table[i].gene][0], dna_override=e)
    return specs


def _evaluate(
    run: _Cells,
    model: Any,
    chunk: list[int],
    table: list[_Perturbation],
    specs: dict[int, PerturbSpec],
    present: dict[int, bool],
    readout: str,
    insert: bool,
    emb_layer: Any,
    n_folds: int,
    seed: int,
    batch_size: Any,
    device: Any,
) -> Iterable[tuple[int, Any, dict, dict]]:
    """Yield ``(perturbation index, layer, obs, var)`` as :func:`perturb_gene` would assemble them."""
    inserted = {i for i in chunk if insert and specs[i].kind == "overexpress"}  # evaluated where absent too
    todo = [i for i in chunk if present[specs[i].token_id] or i in inserted]
    for i in chunk:
        if i not in todo:
            logger.warning("screen: %r is in none of the selected cells' tokens; its row is NaN.", table[i].gene)
    held = holds_tokens(run.cells, np.asarray([specs[i].token_id for i in todo], dtype=np.int64)).any(axis=1)
    local = [i for i, h in zip(todo, held, strict=True) if run.cells and (i in inserted or h)]
    for i in chunk:
        if i not in local:  # absent everywhere, or from this process's cells
            yield i, *_empty(run)
    todo = local
    if not todo:
        return
    if readout == "cosine":
        over = insert and any(specs[i].kind == "overexpress" for i in todo)
        results = run_perturbations(
            model, run.cells, [specs[i] for i in todo], **run.specials, emb_layer=emb_layer, batch_size=batch_size,
            device=device, desc=f"screen ({len(todo)} perturbations)", overexpress_absent=over,
        )  # fmt: skip
        for i, res in zip(todo, results, strict=True):
            yield i, *_assemble(run.adata_like, res, run.rows, run.tok2col)
        return
    from sc_dta.models._expression_readout import run_expression_readout

    sp = {k: v for k, v in run.specials.items() if k != "max_length"}
    by_gene: dict[int, list[int]] = {}
    for i in todo:
        by_gene.setdefault(specs[i].token_id, []).append(i)
    for members in by_gene.values():
        results = run_expression_readout(
            model, run.cells, [specs[i] for i in members], mask_id=int(run.vocab.mask_id), columns=run.columns,
            cell_ids=run.rows, n_folds=n_folds, seed=seed, batch_size=batch_size, device=device,
            insert_absent=insert, desc=f"screen {table[members[0]].gene}", **sp,
        )  # fmt: skip
        for i, res in zip(members, results, strict=True):
            yield i, *_assemble_expression(run.adata_like, res, run.rows, run.tok2col)


def _empty(run: _Cells) -> tuple[Any, dict, dict]:
    from scipy import sparse

    n_obs, n_vars = run.adata_like.shape
    layer = sparse.csr_matrix((n_obs, n_vars), dtype=np.float32)
    obs = {"_cell": np.full(n_obs, np.nan, np.float32), "_evaluated": np.zeros(n_obs, dtype=bool)}
    var = {"_mean": np.full(n_vars, np.nan, np.float32), "_n": np.zeros(n_vars, dtype=np.int64)}
    return layer, obs, var


def _result(
    adata: AnnData,
    table: list[_Perturbation],
    gene_info: dict,
    summaries: Mapping[int, dict[str, np.ndarray]],
    groups: list[str],
    per_cell: bool,
    readout: str,
    run: _Cells,
    model: Any,
    fingerprint: dict,
) -> AnnData:
    """Build the perturbations × genes AnnData from the per-perturbation summaries."""
    from anndata import AnnData
    from scipy import sparse

    from sc_dta.tl._rank import NAME_COLUMNS

    n = len(table)
    x = np.stack([summaries[i]["mean"] for i in range(n)]).astype(np.float32)
    obs = pd.DataFrame(
        {
            "gene": [p.gene for p in table],
            "gene_id": [gene_info[p.gene][2] for p in table],
            "perturbation": [p.text for p in table],
            "kind": pd.Categorical([p.kind for p in table]),
            "n_cells": np.asarray([int(summaries[i]["n_cells"]) for i in range(n)], dtype=np.int64),
        },
        index=pd.Index([f"{p.gene}|{p.text}" for p in table]),
    )
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    for col in NAME_COLUMNS:
        if col in adata.var.columns:
            var[col] = adata.var[col].astype(str).to_numpy()
    out = AnnData(X=x, obs=obs, var=var)
    out.obs_names_make_unique()
    out.layers["n"] = np.stack([summaries[i]["n"] for i in range(n)]).astype(np.int32)
    for k, g in enumerate(groups):
        out.layers[f"mean_{g}"] = np.stack([summaries[i]["group_mean"][k] for i in range(n)]).astype(np.float32)
        out.layers[f"n_{g}"] = np.stack([summaries[i]["group_n"][k] for i in range(n)]).astype(np.int32)
    if per_cell:
        cell_names = pd.Index(adata.obs_names.astype(str))
        cell = np.stack([summaries[i]["cell"] for i in range(n)]).astype(np.float32)
        out.obsm["cell_shift"] = pd.DataFrame(cell, index=out.obs_names, columns=cell_names)
        if readout == "cosine":
            emb = np.stack([summaries[i]["cell_emb"] for i in range(n)]).astype(np.float32)
            out.obsm["cell_emb_shift"] = pd.DataFrame(emb, index=out.obs_names, columns=cell_names)
        shape = (adata.n_obs, adata.n_vars)
        out.uns["per_cell"] = {
            "shift": {
                name: sparse.csr_matrix(
                    (summaries[i]["data"], summaries[i]["indices"], summaries[i]["indptr"]), shape=shape
                )
                for i, name in enumerate(out.obs_names)
            }
        }
    params = {
        "readout": readout,
        "model": _model_info(model),
        "cells": run.n_selected,
        "groupby": fingerprint["groupby"],
        "groups": groups,
        "seed": fingerprint["seed"],
        "n_folds": fingerprint["n_folds"],
        "emb_layer": fingerprint["emb_layer"],
        "layer": fingerprint["layer"],
    }
    out.uns["screen"] = {"params": _h5ad_safe(params)}
    return out
