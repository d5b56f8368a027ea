"""``tl.embed_dna``: DNA embedding of every gene's TSS window into ``adata.varm``."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sc_dta._distributed import Distributed
from sc_dta._settings import settings
from sc_dta._utils import get_anndata, progress

from ._dna_cache import embed_windows, encoder_description, encoder_key, tss_window

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData

    from sc_dta.genome import Genome
    from sc_dta.models.dna import DNAEncoder

logger = logging.getLogger(__name__)

TSS_COLUMNS = ("tss_chrom", "tss_pos", "tss_strand")
#: Genes whose windows are built and embedded together (bounds memory: 64 official windows are ~12 MB of text).
_MIN_CHUNK = 64


def _as_genome(genome: Genome | str | PathLike | Sequence[str | PathLike]) -> Genome:
    from sc_dta.genome import Genome

    if isinstance(genome, Genome):
        return genome
    if isinstance(genome, str | PathLike) or (
        isinstance(genome, Sequence) and all(isinstance(g, str | PathLike) for g in genome)
    ):
        return Genome(genome)
    raise TypeError(f"genome must be a sc_dta.genome.Genome or FASTA path(s), got {type(genome).__name__}.")


def _resolve_encoder(encoder: DNAEncoder, window: int | None) -> DNAEncoder:
    """Return the encoder to embed with: ``encoder`` itself, or its copy with ``window`` bp windows.

    An encoder without a window of its own (``encoder.window is None``, e.g. an
    :class:`~sc_dta.models.EnformerEncoder` of an uncropped Enformer) needs ``window``.
    """
    from sc_dta.models.dna import DNAEncoder

    own_window = getattr(encoder, "window", None)
    if own_window is None and hasattr(encoder, "with_window"):
        if window is None:
            name = getattr(encoder, "name", type(encoder).__name__)
            raise ValueError(
                f"encoder {name!r} has no window of its own (e.g. an Enformer built with target_length=-1, no "
                "crop); pass the window length in bp as embed_dna(window=...)."
            )
        encoder = encoder.with_window(window)
    if not isinstance(encoder, DNAEncoder):
        raise TypeError(
            f"encoder must implement sc_dta.models.DNAEncoder (name, weights_id, window, dim, center_shift, "
            f"pooling, embed), got {type(encoder).__name__}."
        )
    if window is None or window == encoder.window:
        return encoder
    with_window = getattr(encoder, "with_window", None)
    if with_window is None:
        raise ValueError(
            f"window={window!r}: encoder {encoder.name!r} has a fixed window of {encoder.window} bp and cannot be "
            "changed; leave window=None."
        )
    return with_window(window)


def _selected_genes(adata: AnnData, genes: Sequence[str] | str | None) -> np.ndarray:
    """Boolean mask over var of the genes to embed."""
    if genes is None:
        return np.ones(adata.n_vars, dtype=bool)
    if isinstance(genes, str):
        genes = [genes]
    genes = list(genes)
    index = adata.var_names
    unknown = [g for g in genes if g not in index]
    if unknown:
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise KeyError(f"genes: {len(unknown)} name(s) not in adata.var_names: {shown}.")
    return index.isin(genes)


def _tss_table(adata: AnnData) -> pd.DataFrame:
    missing = [c for c in TSS_COLUMNS if c not in adata.var.columns]
    if missing:
        raise KeyError(f"adata.var lacks the TSS column(s) {missing}; run sc_dta.pp.annotate_tss(adata, gtf) first.")
    return adata.var[list(TSS_COLUMNS)]


def embed_dna(
    adata: AnnData | MuData,
    *,
    genome: Genome | str | PathLike | Sequence[str | PathLike],
    encoder: DNAEncoder,
    window: int | None = None,
    genes: Sequence[str] | None = None,
    key_added: str = "dna_emb",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    cache: bool = True,
    copy: bool = False,
    mod: str = "rna",
) -> AnnData | MuData | None:
    """Embed the DNA window around every gene's transcription start site.

    For each gene with a TSS (``adata.var[['tss_chrom', 'tss_pos', 'tss_strand']]``, written by
    :func:`sc_dta.pp.annotate_tss`) the transcription-oriented window of ``encoder.window`` bp is cut from the genome
    (reverse complemented on the minus strand, N-padded beyond chromosome ends, its centre moved by
    ``encoder.center_shift`` from the TSS) and embedded with ``encoder``. Embeddings are cached on disk (see
    :class:`~sc_dta.tl._dna_cache.DNAEmbeddingCache`), so re-runs and later perturbations never recompute a window
    already embedded with the same encoder.

    Distributed: under an initialised :mod:`torch.distributed` process group of more than one process (NCCL on
    GPUs, gloo on CPUs; e.g. ``torchrun``), every process must call :func:`embed_dna` with the same arguments on
    its own copy of the same AnnData (a mismatch is a ValueError on every process). The windows to compute are
    shared out: the main process looks every window up in the cache, and the batches of ``batch_size`` windows
    not cached are dealt out to the processes in turn (all windows have the same length, so equal counts); each
    process embeds its batches and writes only those to the cache (atomic renames, so a shared cache directory is
    safe). The embeddings are gathered and every process gets the same ``adata.varm[key_added]`` and
    ``adata.uns[key_added]`` as one process would (the same batches are run, so the numbers are identical). Only
    the main process draws progress bars. Pass each process its own ``device`` (e.g. ``f"cuda:{local_rank}"``, after
    ``torch.cuda.set_device(local_rank)``, which NCCL's object collectives need).

    Parameters
    ----------
    adata
        Annotated data matrix (or a MuData, whose ``mod`` modality is used).
    genome
        A :class:`sc_dta.genome.Genome`, or FASTA path(s) to open as one.
    encoder
        A DNA encoder, e.g. :class:`sc_dta.models.EnformerEncoder` or :class:`sc_dta.models.KmerEncoder`.
    window
        Window length in bp, overriding ``encoder.window`` (only for encoders with a ``with_window`` method).
        Required when the encoder has no window of its own, e.g. ``EnformerEncoder(model)`` for an Enformer built
        with ``target_length=-1`` (no crop, hence no native input length).
    genes
        Subset of ``adata.var_names`` to embed; the other rows are NaN. Default: all genes.
    key_added
        Key in ``adata.varm`` and ``adata.uns``.
    batch_size
        Windows per encoder batch (default ``settings.batch_size_dna``).
    device
        Compute device (default ``settings.device``).
    cache
        Use the on-disk embedding cache under ``settings.cache_dir / "dna_embeddings"``.
    copy
        Return a modified copy instead of writing to ``adata``.
    mod
        Modality used when ``adata`` is a MuData.

    Returns
    -------
    ``None`` (or the copy when ``copy=True``); sets

    ``adata.varm[key_added]``
        float32 ``(n_vars, dim)``; NaN rows for genes without a TSS or outside ``genes``.
    ``adata.uns[key_added]['params']``
        encoder name and weights id, genome name, window, center_shift, pooling, n_bins (0 for encoders without
        bins), precision, number of genes embedded and the date.

    Raises
    ------
    KeyError
        Missing TSS columns, ``genes`` not in ``var_names``, or TSS chromosomes absent from the genome.
    ValueError
        A ``window`` the encoder cannot use, no ``window`` for an encoder without one, a strand other than
        ``+``/``-``, or a TSS beyond its chromosome.
    """
    data = adata.copy() if copy else adata
    ad = get_anndata(data, mod)
    tss = _tss_table(ad)
    selected = _selected_genes(ad, genes)
    encoder = _resolve_encoder(encoder, window)
    genome = _as_genome(genome)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")

    has_tss = (
        tss["tss_chrom"].notna().to_numpy() & tss["tss_pos"].notna().to_numpy() & tss["tss_strand"].notna().to_numpy()
    )
    rows = np.flatnonzero(selected & has_tss)
    chroms = tss["tss_chrom"].to_numpy()[rows].astype(str)
    positions = tss["tss_pos"].to_numpy()[rows].astype(np.int64)
    strands = tss["tss_strand"].to_numpy()[rows].astype(str)
    _check_tss(ad.var_names[rows], chroms, positions, strands, genome)
    n_no_tss = int((selected & ~has_tss).sum())
    if n_no_tss:
        logger.info("embed_dna: %d selected gene(s) have no TSS and get NaN rows", n_no_tss)

    batch_size = settings.batch_size_dna if batch_size is None else batch_size
    chunk = max(batch_size, _MIN_CHUNK)
    dist = Distributed()
    if dist.active:
        # every process builds the same windows, chunk by chunk; embed_windows deals out the batches to compute
        dist.check_same(
            (list(ad.var_names[rows]), list(chroms), positions.tolist(), list(strands), encoder_key(encoder, device)),
            "genes, TSS positions or DNA encoder",
        )
        logger.info("embed_dna: process %d of %d shares the windows to compute", dist.rank, dist.size)
    emb = np.full((ad.n_vars, int(encoder.dim)), np.nan, dtype=np.float32)
    pending: list[int] = []
    windows: list[str] = []

    def flush() -> None:
        if pending:
            emb[rows[pending]] = embed_windows(
                windows, encoder, batch_size=batch_size, device=device, cache=cache, show_progress=False, dist=dist
            )
            pending.clear()
            windows.clear()

    desc = f"embed_dna ({encoder.name}, {encoder.window} bp)"
    genes = progress(range(len(rows)), total=len(rows), desc=desc, unit="gene") if dist.main else range(len(rows))
    for i in genes:
        windows.append(tss_window(genome, chroms[i], int(positions[i]), strands[i], encoder))
        pending.append(i)
        if len(pending) >= chunk:
            flush()
    flush()

    params = dist.broadcast(_params(encoder, genome, device, n_embedded=len(rows)))  # one date on every process
    ad.varm[key_added] = emb
    ad.uns[key_added] = {"params": params}
    logger.info(
        "embed_dna: embedded %d of %d genes with %s into varm[%r] (%d dims)",
        len(rows),
        ad.n_vars,
        encoder.name,
        key_added,
        encoder.dim,
    )
    return data if copy else None


def _check_tss(names: pd.Index, chroms: np.ndarray, positions: np.ndarray, strands: np.ndarray, genome: Genome) -> None:
    """Validate every TSS before anything is computed (unknown chromosome, bad strand, position out of range)."""
    available = list(genome.chromosomes)
    absent = sorted(c for c in set(chroms) if c not in genome)
    if absent:
        example = names[np.flatnonzero(chroms == absent[0])[0]]
        shown = available[:10] + (["..."] if len(available) > 10 else [])
        raise KeyError(
            f"genome {genome.name!r} has no chromosome(s) {absent} (e.g. gene {example!r}); available: {shown}. "
            "Pass genes= to embed a subset, or a genome with those chromosomes."
        )
    bad_strand = ~np.isin(strands, ["+", "-"])
    if bad_strand.any():
        i = np.flatnonzero(bad_strand)[0]
        raise ValueError(f"adata.var['tss_strand'] of gene {names[i]!r} is {strands[i]!r}; expected '+' or '-'.")
    lengths = {c: genome.chrom_length(c) for c in set(chroms)}
    out = np.fromiter(
        ((p < 0 or p >= lengths[c]) for c, p in zip(chroms, positions, strict=True)), dtype=bool, count=len(chroms)
    )
    if out.any():
        i = np.flatnonzero(out)[0]
        raise ValueError(
            f"adata.var['tss_pos'] of gene {names[i]!r} is {positions[i]}, outside {chroms[i]} "
            f"(length {lengths[chroms[i]]}) in genome {genome.name!r}: do the annotation and genome builds match?"
        )


def _params(encoder: DNAEncoder, genome: Genome, device: Any, *, n_embedded: int) -> dict[str, Any]:
    desc = encoder_description(encoder, device)
    params: dict[str, Any] = {
        "encoder": desc["name"],
        "weights_id": desc["weights_id"],
        "genome": str(genome.name),
        "window": desc["window"],
        "center_shift": desc["center_shift"],
        "pooling": desc["pooling"],
        "n_bins": int(desc.get("n_bins", 0)),
        "dim": desc["dim"],
        "n_genes_embedded": int(n_embedded),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if "tag" in desc:
        params["encoder_tag"] = desc["tag"]
    return params
