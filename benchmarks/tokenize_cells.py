"""Tokenizer throughput: cells/s of ``sc_dta.pp.tokenize`` on sparse raw counts.

Usage: ``python benchmarks/tokenize_cells.py [--cells 20000] [--genes 20000] [--nnz 2000] [--version V2]``.
Uses the real Geneformer dictionaries when found (``SC_DTA_GENEFORMER_DATA`` or ../shared/data/geneformer),
else a custom vocabulary built from the simulated counts.
"""

from __future__ import annotations

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
    """Sparse UMI-like counts: ~nnz_per_cell expressed genes per cell, geometric counts (mostly 1-3).

    Gene g is expressed in cell c with probability min(1, size_c * p_g): skewed gene popularity p_g and
    log-normal cell sizes.
    """
    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.5, n_genes) + 0.05
    popularity = popularity / popularity.sum() * nnz_per_cell
    for _ in range(20):  # probabilities are capped at 1: rescale until the expected genes per cell match
        popularity *= nnz_per_cell / np.minimum(popularity, 1).sum()
    popularity = popularity.astype(np.float32)
    blocks = []
    for start in range(0, n_cells, 1000):
        n = min(1000, n_cells - start)
        size = rng.lognormal(0.0, 0.3, size=(n, 1)).astype(np.float32)
        size /= np.exp(0.3**2 / 2)
        expressed = rng.random((n, n_genes), dtype=np.float32) < popularity[None, :] * size
        block = sp.csr_matrix(expressed, dtype=np.float32)
        block.data = rng.geometric(0.5, block.nnz).astype(np.float32)
        blocks.append(block)
    return ad.AnnData(sp.vstack(blocks, format="csr"), var=pd.DataFrame(index=var_names))


def _time(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock and best CPU (process) time of ``repeats`` calls."""
    wall, cpu = np.inf, np.inf
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


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

    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall-clock figures are shared-machine figures)"
    )
    with_n_counts = adata.copy()
    with_n_counts.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    dense = adata[: min(2000, adata.n_obs)].copy()
    dense.X = dense.X.toarray()
    cases = [
        ("csr", adata, args.repeats),
        ("csr + n_counts", with_n_counts, args.repeats),
        ("csc", csc, 1),
        ("dense", dense, 1),
    ]
    for label, data, repeats in cases:
        result = None

        def run(data=data):
            nonlocal result
            result = dta.pp.tokenize(data, vocab=vocab, chunk_size=args.chunk_size)

        wall, cpu = _time(run, repeats)
        print(
            f"{label:>15}: {data.n_obs / wall:7.0f} cells/s wall, {data.n_obs / cpu:7.0f} cells/s CPU time "
            f"({data.n_obs} cells, {wall:.2f}s; mean length {result.lengths.mean():.0f} tokens)"
        )


if __name__ == "__main__":
    main()
