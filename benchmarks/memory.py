"""Peak memory of streamed (backed) input against the number of cells.

Writes synthetic raw-count h5ad files of increasing size (CSR, ``--genes`` genes, about ``--nnz`` expressed genes
per cell), block by block so that the writer itself stays small (``anndata.io.write_elem`` for the first block,
then ``sparse_dataset(...).append``). Then, in a fresh subprocess per file and mode, it runs

- ``tokenize``: ``dta.pp.tokenize`` of every cell (the token ids of every cell are an output that necessarily
  grows with the cells; the table shows it separately and the peak without it);
- ``perturb``: ``dta.tl.perturb_gene`` and a 3-gene ``dta.tl.screen`` (cosine readout, a tiny random-weight
  ``BertForMaskedLM`` of 256 positions) on ``--subset`` cells spread over the file,

on the backed file (``anndata.read_h5ad(path, backed="r")``) and, as the baseline, on the file read into memory.
Each child reports its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the RSS after
its imports (what any Python process with sc_dta and torch holds).

Examples
--------
    python benchmarks/memory.py                                  # 25k..200k cells (about 5 min of CPU)
    python benchmarks/memory.py --sizes 5000,10000 --keep /tmp/m  # quick; keep the files
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SC_DTA_GENEFORMER_DATA", REPO.parent / "shared" / "data" / "geneformer"))
BLOCK = 5_000  # cells simulated and appended at a time by the writer


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_mib()


def _peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _var_names(n_genes: int) -> list[str]:
    from sc_dta.models import GeneformerVocab

    if (DATA / "token_dictionary_gc104M.pkl").exists():
        vocab = GeneformerVocab.load(DATA, version="V2")
        genes = sorted(t for t in vocab.token_ids if t.startswith("ENSG"))
        return list(np.random.default_rng(1).choice(genes, size=n_genes, replace=False))
    return [f"ENSG{j:011d}" for j in range(n_genes)]


def _block(rng: np.random.Generator, n: int, popularity: np.ndarray):
    """Sparse UMI-like counts: gene g expressed in cell c with probability ``size_c * p_g``, geometric counts."""
    import scipy.sparse as sp

    size = rng.lognormal(0.0, 0.3, size=(n, 1)).astype(np.float32) / np.float32(np.exp(0.045))
    block = sp.csr_matrix(rng.random((n, popularity.size), dtype=np.float32) < popularity[None, :] * size)
    block = block.astype(np.float32)
    block.data = rng.geometric(0.5, block.nnz).astype(np.float32)
    return block


def write_counts(path: Path, n_cells: int, var_names: list[str], nnz: int, seed: int = 0) -> float:
    """Write an h5ad of ``n_cells`` synthetic raw counts block by block; return the writer's peak RSS (MiB)."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    n_genes = len(var_names)
    popularity = rng.pareto(1.5, n_genes) + 0.05
    popularity = popularity / popularity.sum() * nnz
    for _ in range(20):  # probabilities are capped at 1: rescale until the expected genes per cell match
        popularity *= nnz / np.minimum(popularity, 1).sum()
    popularity = np.minimum(popularity, 0.95).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "X", _block(rng, min(BLOCK, n_cells), popularity))
        X = sparse_dataset(f["X"])
        for start in range(BLOCK, n_cells, BLOCK):
            X.append(_block(rng, min(BLOCK, n_cells - start), popularity))
        write_elem(f, "obs", pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)])))
        write_elem(f, "var", pd.DataFrame(index=pd.Index(var_names)))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    check = ad.read_h5ad(path, backed="r")
    if check.shape != (n_cells, n_genes):
        raise RuntimeError(f"{path}: wrote {check.shape}, expected {(n_cells, n_genes)}")
    check.file.close()
    return _peak_mib()


# ----------------------------------------------------------------------------- the child process


def _model(vocab, max_positions: int = 256):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from sc_dta.models.cell import attach_vocab

    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        pad_token_id=int(vocab.pad_id),
    )
    torch.manual_seed(0)
    model = BertForMaskedLM._from_config(cfg, attn_implementation="sdpa").eval()
    attach_vocab(model, vocab)
    return model


def child(path: str, mode: str, task: str, subset: int) -> dict:
    """Run ``task`` on the file at ``path`` (``mode``: backed or memory) and return the measurements."""
    import anndata as ad
    import torch

    import sc_dta as dta
    from sc_dta.models import GeneformerVocab

    torch.set_num_threads(1)
    dta.settings.progress = False
    n_var = ad.read_h5ad(path, backed="r").n_vars
    if (DATA / "token_dictionary_gc104M.pkl").exists():
        vocab = GeneformerVocab.load(DATA, version="V2")
    else:
        small = ad.read_h5ad(path, backed="r")
        vocab = GeneformerVocab.from_adata(small[: min(2000, small.n_obs)].to_memory(), name="bench")
    model = _model(vocab) if task == "perturb" else None
    base = _rss_mib()
    t0 = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
    out: dict = {"n_cells": adata.n_obs, "n_vars": n_var, "mode": mode, "task": task, "base_mib": base}
    if task == "tokenize":
        tokens = dta.pp.tokenize(adata, vocab=vocab)
        n_tokens = int(tokens.lengths.sum())
        out["tokens_mib"] = (n_tokens * 8 + len(tokens) * 112) / 2**20  # int64 ids + one array object per cell
        out["mean_length"] = n_tokens / len(tokens)
    else:
        cells = adata.obs_names[np.linspace(0, adata.n_obs - 1, subset).astype(np.int64)]
        sub = dta.pp.tokenize(adata, vocab=vocab, cells=cells, max_length=256)
        counts: dict[int, int] = {}
        for ids in sub.input_ids:
            for t in ids[1:-1].tolist():
                counts[t] = counts.get(t, 0) + 1
        top = sorted(counts, key=lambda t: (-counts[t], t))[:3]
        genes = [vocab.id_to_token[t] for t in top]
        dta.tl.perturb_gene(adata, genes[0], model=model, cells=cells, readout="cosine", batch_size=32)
        res = dta.tl.screen(
            adata, [(g, "delete") for g in genes], model=model, cells=cells, readout="cosine", batch_size=32
        )
        out["screen_finite"] = int(np.isfinite(res.X).sum())
        out["n_evaluated"] = int(adata.obs["dta_shift_delete_evaluated"].sum())
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time()
    out["peak_mib"] = _peak_mib()
    return out


# ----------------------------------------------------------------------------- the parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25000,50000,100000,200000", help="numbers of cells, comma-separated")
    parser.add_argument("--genes", type=int, default=4000)
    parser.add_argument("--nnz", type=int, default=1200, help="expressed genes per cell (about)")
    parser.add_argument("--subset", type=int, default=200, help="cells of the perturb / screen task")
    parser.add_argument("--memory-up-to", type=int, default=200_000, help="largest file also read into memory")
    parser.add_argument("--keep", default=None, help="folder for the h5ad files (default: a temporary one)")
    parser.add_argument("--child", nargs=4, metavar=("PATH", "MODE", "TASK", "SUBSET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, mode, task, subset = args.child
        print(json.dumps(child(path, mode, task, int(subset))))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sc_dta_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    var_names = _var_names(args.genes)
    print(f"{args.genes} genes, ~{args.nnz} expressed per cell; files in {folder}; {os.cpu_count()} CPUs")
    rows = []
    for n in sizes:
        path = folder / f"counts_{n}.h5ad"
        t0 = time.perf_counter()
        writer_peak = write_counts(path, n, var_names, args.nnz)
        print(
            f"wrote {n} cells ({path.stat().st_size / 2**20:.0f} MiB on disk) in {time.perf_counter() - t0:.1f}s, "
            f"writer peak RSS {writer_peak:.0f} MiB",
            flush=True,
        )
        for task in ("tokenize", "perturb"):
            for mode in ("backed", "memory"):
                if mode == "memory" and n > args.memory_up_to:
                    continue
                cmd = [sys.executable, __file__, "--child", str(path), mode, task, str(args.subset)]
                env = dict(os.environ, OMP_NUM_THREADS="1", SC_DTA_PROGRESS="0")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:])
                    raise SystemExit(f"child {mode} {task} on {n} cells failed")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(json.dumps(r), flush=True)
        if not args.keep:
            path.unlink()

    print()
    print("peak RSS (MiB) of one process per run; 'above imports' = peak - RSS after importing sc_dta/torch and")
    print("loading the vocabulary (and the tiny model); 'without tokens' also subtracts the token ids returned")
    header = (
        f"{'task':>9} {'n_cells':>8} {'mode':>7} {'peak':>7} {'above imports':>14} {'tokens':>7} "
        f"{'without tokens':>15} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        above = r["peak_mib"] - r["base_mib"]
        tokens = r.get("tokens_mib", 0.0)
        print(
            f"{r['task']:>9} {r['n_cells']:>8} {r['mode']:>7} {r['peak_mib']:7.0f} {above:14.0f} {tokens:7.0f} "
            f"{above - tokens:15.0f} {r['seconds']:7.1f}"
        )


if __name__ == "__main__":
    main()
