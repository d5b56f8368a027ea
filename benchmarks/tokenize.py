"""Tokenizer throughput: cells/s of ``sc_dta.pp.tokenize`` on sparse raw counts.

Usage: ``python benchmarks/tokenize.py [--cells 20000] [--genes 20000] [--nnz 2000] [--version V2]``.
Uses the real Geneformer dictionaries when found (``SC_DTA_GENEFORMER_DATA`` or ../shared/data/geneformer),
else a custom vocabulary built from the simulated counts.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# this file is named like the standard library's ``tokenize``: keep its folder off the import path
sys.path[:] = [
    p for p in sys.path if p not in ("", __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
]

import argparse
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import sc_dta as dta
from sc_dta.models import GeneformerVocab

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SC_DTA_GENEFORMER_DATA", REPO.parent / "shared" / "data" / "geneformer"))


def simulate(n_cells: int, n_genes: int, nnz_per_cell: int, var_names: list[str], seed: int = 0) -> ad.AnnData:
    """Sparse UMI-like counts: ~nnz_per_cell expressed genes per cell, geometric counts (mostly 1-3)."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.normal(nnz_per_cell, nnz_per_cell * 0.3, n_cells).astype(np.int64), 1, n_genes)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    # gene popularity: a few genes are expressed in most cells
    weights = rng.pareto(1.0, n_genes) + 1
    weights /= weights.sum()
    indices = np.empty(indptr[-1], dtype=np.int32)
    for i in range(n_cells):
        indices[indptr[i] : indptr[i + 1]] = np.sort(rng.choice(n_genes, lens[i], replace=False, p=weights))
    data = rng.geometric(0.5, indptr[-1]).astype(np.float32)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    return ad.AnnData(X, var=pd.DataFrame(index=var_names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="expressed genes per cell")
    parser.add_argument("--version", default="V2")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dta.settings.progress = False

    if (DATA / "token_dictionary_gc104M.pkl").exists():
        vocab = GeneformerVocab.load(DATA, version=args.version)
        genes = [t for t in vocab.token_ids if t.startswith("ENSG")]
        rng = np.random.default_rng(1)
        var_names = list(rng.choice(genes, size=min(args.genes, len(genes)), replace=False))
        var_names += [f"NOTAGENE{i}" for i in range(args.genes - len(var_names))]
    else:
        vocab = None
        var_names = [f"GENE{i}" for i in range(args.genes)]

    t0 = time.perf_counter()
    adata = simulate(args.cells, args.genes, args.nnz, var_names)
    if vocab is None:
        vocab = GeneformerVocab.from_adata(adata, name="bench")
    print(
        f"simulated {adata.n_obs} cells x {adata.n_vars} genes, {adata.X.nnz / adata.n_obs:.0f} nnz/cell "
        f"in {time.perf_counter() - t0:.1f}s; vocabulary {vocab.version} ({len(vocab)} tokens)"
    )

    for label, data in (("csr", adata), ("csr + n_counts", None)):
        if data is None:
            data = adata.copy()
            data.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
        best = np.inf
        for _ in range(args.repeats):
            t = time.perf_counter()
            tok = dta.pp.tokenize(data, vocab=vocab, chunk_size=args.chunk_size)
            best = min(best, time.perf_counter() - t)
        print(f"{label:>16}: {adata.n_obs / best:8.0f} cells/s  ({best:.2f}s, mean length {tok.lengths.mean():.0f})")

    dense = adata[:2000].copy()
    dense.X = dense.X.toarray()
    t = time.perf_counter()
    dta.pp.tokenize(dense, vocab=vocab, chunk_size=args.chunk_size)
    print(f"{'dense':>16}: {dense.n_obs / (time.perf_counter() - t):8.0f} cells/s (2,000 cells)")


if __name__ == "__main__":
    main()
