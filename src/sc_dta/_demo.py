"""The ``sc-dta demo`` pipeline on simulated data, and helpers shared with the command line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

    from .models.dna import DNAEncoder

logger = logging.getLogger(__name__)

#: Window of the DNA encoders in the demo: 512 bp, so that the promoter motifs weigh in the k-mer spectrum.
DEMO_WINDOW = 512
#: Cell passes of the demo's training (epochs = DEMO_CELL_PASSES / n_cells, at least 1).
DEMO_CELL_PASSES = 45_000
#: Small random-weight Enformer used by ``--encoder enformer-small``.
ENFORMER_SMALL = {
    "dim": 96,
    "depth": 2,
    "heads": 4,
    "num_downsamples": 5,
    "dim_divisible_by": 16,
    "target_length": 4,
    "output_heads": {"human": 8},
}


def make_encoder(
    name: str = "kmer",
    *,
    window: int | None = None,
    k: int = 4,
    seed: int = 0,
    revision: str | None = None,
) -> DNAEncoder:
    """Build a DNA encoder from its command-line name.

    Parameters
    ----------
    name
        ``"kmer"`` (:class:`~sc_dta.models.KmerEncoder` with ``k``), ``"enformer"`` (official weights via
        :meth:`~sc_dta.models.EnformerEncoder.from_pretrained`), ``"enformer-small"`` (a small Enformer with
        random weights drawn from ``seed``, for demos and tests) or a local directory of Enformer weights.
    window
        Window in bp (default: :data:`DEMO_WINDOW` for ``kmer`` and ``enformer-small``, the native window for
        Enformer).
    k
        k-mer length.
    seed
        Seed of the random ``enformer-small`` weights.
    revision
        Revision of the Enformer weights.
    """
    from .models import EnformerEncoder, KmerEncoder

    if name == "kmer":
        return KmerEncoder(k=k, window=window or DEMO_WINDOW)
    if name == "enformer-small":
        import torch
        from enformer_pytorch import Enformer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Enformer.from_hparams(**ENFORMER_SMALL)
        return EnformerEncoder(model, window=window or DEMO_WINDOW, name="enformer-small")
    if name == "enformer" or Path(name).expanduser().is_dir():
        source = name if name != "enformer" else "EleutherAI/enformer-official-rough"
        encoder = EnformerEncoder.from_pretrained(source, revision=revision)
        return encoder.with_window(window) if window else encoder
    raise ValueError(
        f"encoder={name!r}: expected 'kmer', 'enformer', 'enformer-small' or an existing Enformer weights directory."
    )


def new_biodta(
    adata: AnnData,
    *,
    dna_key: str = "dna_emb",
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    intermediate_size: int | None = None,
    dropout: float = 0.0,
    max_length: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Any:
    """Build a small :class:`~sc_dta.models.BioDTA` to train from scratch, with a vocabulary made from ``adata``.

    The vocabulary (:meth:`~sc_dta.models.GeneformerVocab.from_adata`) has one token per expressed gene;
    cells are truncated to their ``max_length`` top-ranked tokens (default: room for every gene,
    ``n_vars + 2``). The DNA embeddings ``adata.varm[dna_key]`` are loaded into the model. ``kwargs`` go to
    :meth:`~sc_dta.models.BioDTA.from_config` (e.g. ``adapter_dropout``).
    """
    from .models import BioDTA, GeneformerVocab

    if dna_key not in adata.varm:
        raise KeyError(f"dna_key={dna_key!r} is not in adata.varm; run sc_dta.tl.embed_dna first.")
    emb = np.asarray(adata.varm[dna_key], dtype=np.float32)
    max_length = adata.n_vars + 2 if max_length is None else int(max_length)
    vocab = GeneformerVocab.from_adata(adata, max_length=max_length, name="custom")
    params = dict(adata.uns.get(dna_key, {}).get("params", {}) or {})
    info = {k: params[k] for k in ("encoder", "weights_id", "window", "pooling", "center_shift") if k in params}
    if "encoder" in info:
        info["name"] = info.pop("encoder")
    model = BioDTA.from_config(
        vocab,
        d_dna=emb.shape[1],
        hidden_size=hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_length,
        dropout=dropout,
        seed=seed,
        dna_encoder_info=info,
        **kwargs,
    )
    ids, rows = [], []
    for gene, row in zip(adata.var_names, emb, strict=True):
        tid = vocab.token_ids.get(str(gene).upper())
        if tid is not None and np.isfinite(row).all():
            ids.append(tid)
            rows.append(row)
    model.set_dna_embeddings(np.asarray(ids, dtype=np.int64), np.stack(rows))
    return model


def _echo(verbose: bool, *args: Any) -> None:
    if verbose:
        print(*args, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _torch_runtime(threads: int | None):
    """Deterministic torch kernels and ``threads`` CPU threads while the demo runs; restored afterwards.

    Multi-threaded CPU backward passes are not bitwise reproducible without deterministic kernels. The demo's
    model is so small that one thread is as fast as several on an idle machine and much faster on a busy one
    (threads waiting for each other at every tiny matrix product).
    """
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.set_num_threads(previous_threads)


def run_demo(
    out: str | os.PathLike = "sc_dta_demo",
    *,
    seed: int = 0,
    encoder: str = "kmer",
    n_cells: int = 3000,
    n_genes: int = 300,
    epochs: int | None = None,
    window: int | None = None,
    k: int = 4,
    hidden_size: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    max_length: int = 128,
    batch_size: int = 32,
    lr: float = 5e-3,
    top_k: int = 20,
    device: str | None = None,
    threads: int | None = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """Simulate, train and perturb: the whole Bio-DTA method on data with a planted regulatory network.

    Steps: :func:`~sc_dta.datasets.simulated_grn` → :func:`~sc_dta.pp.annotate_tss` →
    :func:`~sc_dta.tl.embed_dna` (``encoder``) → a small :class:`~sc_dta.models.BioDTA` with a vocabulary made
    from the data, trained from scratch (:func:`~sc_dta.tl.train_adapter`, ``freeze_backbone=False``) →
    :func:`~sc_dta.tl.perturb_tss` deleting the TF's promoter motifs → :func:`~sc_dta.tl.perturb_gene`
    (``kind="delete"``, the adapter-free baseline) → :func:`~sc_dta.tl.rank_targets` against the planted direct and
    indirect targets. Writes ``demo.h5ad``, ``target_shift.png``, ``metrics.csv`` and the model into ``out``.

    Parameters
    ----------
    out
        Output directory (created).
    seed
        Seed of the simulation, the model initialisation and training.
    encoder
        ``"kmer"`` or ``"enformer-small"``.
    n_cells, n_genes
        Size of the simulated data.
    epochs
        Training epochs (default: about 45,000 cell passes in all, i.e. 15 epochs of 3,000 cells).
    window
        DNA window in bp around each TSS (default :data:`DEMO_WINDOW`).
    k
        k-mer length of the ``kmer`` encoder.
    hidden_size, n_layers, n_heads
        Size of the BioDTA backbone.
    max_length
        Tokens per cell (the top-ranked genes, special tokens included).
    batch_size, lr
        Training batch size and learning rate.
    top_k
        k of the hits@k metric.
    device
        Compute device (default ``settings.device``).
    threads
        CPU threads of torch during the demo (None: leave torch's setting). Results are reproducible for a
        given ``seed`` and number of threads.
    verbose
        Print progress and the results table to stderr/stdout.

    Returns
    -------
    dict with ``metrics`` (DataFrame), ``adata``, ``sim``, ``model``, ``paths`` and ``timings`` (seconds per step).
    """
    if encoder not in ("kmer", "enformer-small"):
        raise ValueError(f"encoder={encoder!r}: the demo supports 'kmer' and 'enformer-small'.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}.")
    with _torch_runtime(threads):
        return _run_demo(
            out,
            seed=seed,
            encoder=encoder,
            n_cells=n_cells,
            n_genes=n_genes,
            epochs=epochs,
            window=window,
            k=k,
            hidden_size=hidden_size,
            n_layers=n_layers,
            n_heads=n_heads,
            max_length=max_length,
            batch_size=batch_size,
            lr=lr,
            top_k=top_k,
            device=device,
            verbose=verbose,
        )


def _run_demo(
    out: str | os.PathLike,
    *,
    seed: int,
    encoder: str,
    n_cells: int,
    n_genes: int,
    epochs: int | None,
    window: int | None,
    k: int,
    hidden_size: int,
    n_layers: int,
    n_heads: int,
    max_length: int,
    batch_size: int,
    lr: float,
    top_k: int,
    device: str | None,
    verbose: bool,
) -> dict[str, Any]:
    import pandas as pd

    from . import datasets, pl, pp, tl
    from ._utils import resolve_device
    from .genome import Genome

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = now - t
        _echo(verbose, f"  {name}: {now - t:.1f} s")
        t = now

    _echo(verbose, f"[1/7] simulating {n_cells} cells x {n_genes} genes (seed {seed})")
    sim = datasets.simulated_grn(n_cells, n_genes, seed=seed, out_dir=out / "genome")
    adata = sim.adata
    lap("simulate")

    _echo(verbose, "[2/7] annotating TSSs and embedding promoter DNA")
    pp.annotate_tss(adata, sim.gtf)
    genome = Genome(sim.fasta)
    enc = make_encoder(encoder, window=window, k=k, seed=seed)
    tl.embed_dna(adata, genome=genome, encoder=enc, device=device)
    lap("embed_dna")

    _echo(verbose, "[3/7] training a small Bio-DTA model from scratch")
    model = new_biodta(
        adata,
        hidden_size=hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        max_length=max_length,
        seed=seed,
        adapter_dropout=0.0,
    )
    if epochs is None:
        epochs = max(1, round(DEMO_CELL_PASSES / n_cells))
    tl.train_adapter(
        adata,
        model,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        freeze_backbone=False,
        seed=seed,
        device=device,
    )
    model.save_pretrained(out / "model")
    lap("train")

    cells = (adata.obs["cell_type"] == "cardiomyocyte").to_numpy()
    _echo(
        verbose,
        f"[4/7] deleting the {sim.tf_symbol} promoter motifs ({sim.mutation}) in the {cells.sum()} cardiomyocytes",
    )
    tl.perturb_tss(adata, sim.tf, sim.mutation, model=model, genome=genome, encoder=enc, cells=cells, device=device)
    lap("perturb_tss")

    _echo(verbose, f"[5/7] baseline: deleting the {sim.tf_symbol} token (Geneformer in-silico deletion)")
    tl.perturb_gene(adata, sim.tf, model=model, kind="delete", cells=cells, device=device)
    lap("perturb_gene")

    _echo(verbose, "[6/7] ranking genes against the planted targets")
    targets = {"direct": sim.truth["direct"], "indirect": sim.truth["indirect"]}
    metrics = _evaluate(
        adata,
        targets,
        top_k=top_k,
        methods={"Bio-DTA (TSS motif deletion)": "dta_shift", "baseline (TF token deletion)": "dta_shift_delete"},
    )
    lap("rank")

    _echo(verbose, "[7/7] writing results")
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    fig = pl.target_shift(
        adata,
        "dta_shift",
        compare="dta_shift_delete",
        highlight=targets,
        gene_symbols="gene_symbol",
        n_top=30,
        show=False,
        return_fig=True,
    )
    png = out / "target_shift.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    h5ad = out / "demo.h5ad"
    adata.uns["demo_metrics"] = {c: metrics[c].to_numpy() for c in metrics.columns if c not in ("method", "targets")}
    adata.uns["demo_metrics"]["method"] = metrics["method"].to_numpy().astype(str)
    adata.uns["demo_metrics"]["targets"] = metrics["targets"].to_numpy().astype(str)
    adata.write_h5ad(h5ad)
    csv = out / "metrics.csv"
    metrics.to_csv(csv, index=False)
    lap("write")
    total = time.perf_counter() - t_start
    timings["total"] = total

    if verbose:
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print()
            print(format_metrics(metrics, top_k=top_k))
            print()
            print(
                f"TF {sim.tf_symbol} ({sim.tf}); {len(targets['direct'])} direct and {len(targets['indirect'])} "
                f"indirect targets among {int(metrics['n_ranked'].iloc[0])} ranked genes; device "
                f"{resolve_device(device)}; total {total:.0f} s"
            )
            print(f"results: {h5ad}, {png}, {csv}, {out / 'model'}")
    return {
        "metrics": metrics,
        "adata": adata,
        "sim": sim,
        "model": model,
        "paths": {"h5ad": h5ad, "figure": png, "metrics": csv, "model": out / "model", "genome": sim.fasta},
        "timings": timings,
    }


def _evaluate(adata: AnnData, targets: dict[str, list[str]], *, top_k: int, methods: dict[str, str]) -> Any:
    """Metrics of each method (perturbation key) for each target list, from :func:`~sc_dta.tl.rank_targets`."""
    import pandas as pd

    from . import tl

    rows = []
    chance = {}
    for method, key in methods.items():
        ranking = tl.rank_targets(adata, key, known_targets=targets, n_top=top_k)
        for name, m in ranking.attrs["metrics"].items():
            rows.append(
                {
                    "method": method,
                    "targets": name,
                    "n_targets": int(m["n_targets_ranked"]),
                    "n_ranked": int(m["n_genes"]),
                    f"hits@{top_k}": float(m["hits"]),
                    "auroc": float(m["auroc"]),
                    "mannwhitney_p": float(m["mannwhitney_p"]),
                }
            )
            chance.setdefault(name, (int(m["n_targets_ranked"]), int(m["n_genes"]), float(m["expected_hits"])))
    for name, (n_t, n, expected) in chance.items():
        rows.append(
            {
                "method": "chance",
                "targets": name,
                "n_targets": n_t,
                "n_ranked": n,
                f"hits@{top_k}": expected,
                "auroc": 0.5,
                "mannwhitney_p": 0.5,
            }
        )
    return pd.DataFrame(rows)


def format_metrics(metrics: Any, *, top_k: int = 20) -> str:
    """Format the demo results table as text."""
    frame = metrics.copy()
    frame[f"hits@{top_k}"] = frame[f"hits@{top_k}"].map(lambda v: f"{v:.1f}")
    frame["auroc"] = frame["auroc"].map(lambda v: f"{v:.3f}")
    frame["mannwhitney_p"] = frame["mannwhitney_p"].map(lambda v: f"{v:.2g}")
    return frame.to_string(index=False)
