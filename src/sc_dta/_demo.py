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

#: Window of the demo's DNA encoder (k-mer spectrum), so that the promoter motifs weigh in it.
DEMO_WINDOW = 512


def make_encoder(
    name: str = "kmer",
    *,
    window: int | None = None,
    k: int = 4,
    seed: int = 0,
    revision: str | None = None,
) -> DNAEncoder:
    """Build a DNA encoder from its command-line name (see :func:`sc_dta.models.encoder_from_name`)."""
    from .models.encoders import encoder_from_name

    options: dict[str, Any] = {"kmer": {"k": k}, "enformer-small": {"seed": seed}, "motif": {}}.get(
        name, {"revision": revision}
    )
    return encoder_from_name(name, window=window or None, **options)


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
    n_genes: int = 150,
    umis_per_cell: float = 50.0,
    epochs: int | None = None,
    n_controls: int = 10,
    device: str | None = None,
    threads: int | None = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """Simulate, train and perturb: the whole Bio-DTA method, with its controls and baselines, on a planted network.

    Steps, all public API with its defaults: :func:`~sc_dta.datasets.simulated_grn` (sparse UMI counts) →
    :func:`~sc_dta.pp.annotate_tss` → :func:`~sc_dta.tl.embed_dna` (``encoder``) →
    :meth:`BioDTA.from_adata <sc_dta.models.BioDTA.from_adata>` → :func:`~sc_dta.tl.train_adapter` →
    :func:`~sc_dta.tl.perturb_tss` deleting the TF's promoter motifs with ``n_controls`` matched control deletions →
    :func:`~sc_dta.tl.perturb_gene` (adapter-free deletion and overexpression) → :func:`~sc_dta.tl.coexpression` →
    :func:`~sc_dta.tl.rank_targets` against the planted direct and indirect targets. Writes ``demo.h5ad``,
    ``target_shift.png``, ``metrics.csv`` and the model into ``out``.

    Parameters
    ----------
    out
        Output directory (created).
    seed
        Seed of the simulation, the model initialisation and training.
    encoder
        A name for :func:`sc_dta.models.encoder_from_name` (``"kmer"``, ``"motif"``, ``"enformer-small"``).
    n_cells, n_genes, umis_per_cell
        Size and depth of the simulated data.
    epochs
        Training epochs (default: :func:`sc_dta.tl.train_adapter`'s budget with early stopping).
    n_controls
        Matched control deletions of the TSS mutation.
    device
        Compute device (default ``settings.device``).
    threads
        CPU threads of torch during the demo (None: leave torch's setting). Results are reproducible for a
        given ``seed`` and number of threads.
    verbose
        Print progress and the results table.

    Returns
    -------
    dict with ``metrics`` (DataFrame), ``adata``, ``sim``, ``model``, ``paths`` and ``timings`` (seconds per step).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}.")
    if encoder == "enformer":
        raise ValueError("encoder='enformer': the demo runs offline; use 'kmer', 'motif' or 'enformer-small'.")
    with _torch_runtime(threads):
        return _run_demo(
            out,
            seed=seed,
            encoder=encoder,
            n_cells=n_cells,
            n_genes=n_genes,
            umis_per_cell=umis_per_cell,
            epochs=epochs,
            n_controls=n_controls,
            device=device,
            verbose=verbose,
        )


#: The methods scored by the demo and ``benchmarks/science.py``: label -> result key.
METHODS = {
    "Bio-DTA motif deletion": "dta_shift",
    "matched control deletion": "dta_shift@controls",
    "TF token deletion": "dta_shift_delete",
    "TF overexpression": "dta_shift_overexpress",
    "co-expression": "coexpression",
}


def _run_demo(
    out: str | os.PathLike,
    *,
    seed: int,
    encoder: str,
    n_cells: int,
    n_genes: int,
    umis_per_cell: float,
    epochs: int | None,
    n_controls: int,
    device: str | None,
    verbose: bool,
) -> dict[str, Any]:
    from . import datasets, pl, pp, tl
    from ._utils import resolve_device
    from .genome import Genome
    from .models import BioDTA

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

    _echo(
        verbose, f"[1/7] simulating {n_cells} cells x {n_genes} genes, ~{umis_per_cell:g} UMIs per cell (seed {seed})"
    )
    sim = datasets.simulated_grn(
        n_cells,
        n_genes,
        n_direct=25,
        n_indirect=20,
        n_housekeeping=10,
        n_markers=10,
        umis_per_cell=umis_per_cell,
        seed=seed,
        out_dir=out / "genome",
    )
    adata = sim.adata
    lap("simulate")

    _echo(verbose, f"[2/7] annotating TSSs and embedding promoter DNA ({encoder})")
    pp.annotate_tss(adata, sim.gtf)
    genome = Genome(sim.fasta)
    enc = make_encoder(encoder, seed=seed)
    tl.embed_dna(adata, genome=genome, encoder=enc, device=device)
    lap("embed_dna")

    _echo(verbose, "[3/7] training Bio-DTA from scratch (BioDTA.from_adata + train_adapter defaults)")
    model = BioDTA.from_adata(adata, seed=seed)
    model = tl.train_adapter(adata, model, epochs=epochs, seed=seed, device=device)
    model.save_pretrained(out / "model")
    rec = adata.uns["train_adapter"]
    _echo(verbose, f"  context gain {rec['context_gain']:.3f} nats per masked gene (held-out cells)")
    lap("train")

    cells = (adata.obs["cell_type"] == "cardiomyocyte").to_numpy()
    n_eval = int(cells.sum())
    _echo(
        verbose,
        f"[4/7] deleting the {sim.tf_symbol} promoter motifs ({sim.mutation}) and {n_controls} matched controls "
        f"in the {n_eval} cardiomyocytes",
    )
    tl.perturb_tss(
        adata, sim.tf, sim.mutation, model=model, genome=genome, encoder=enc, cells=cells, n_controls=n_controls,
        seed=seed, device=device,
    )  # fmt: skip
    lap("perturb_tss")

    _echo(verbose, f"[5/7] baselines: {sim.tf_symbol} token deletion and overexpression, co-expression")
    tl.perturb_gene(adata, sim.tf, model=model, kind=["delete", "overexpress"], cells=cells, device=device)
    tl.coexpression(adata, sim.tf, key_added="coexpression")
    lap("baselines")

    _echo(verbose, "[6/7] ranking genes against the planted targets")
    targets = {"direct": sim.truth["direct"], "indirect": sim.truth["indirect"]}
    targets["descendants"] = targets["direct"] + targets["indirect"]
    metrics = score_methods(adata, targets, exclude=sim.truth["tf"])
    n_with_tf = int(adata.uns["dta_shift"]["params"]["n_evaluated"])
    lap("rank")

    _echo(verbose, "[7/7] writing results")
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    fig = pl.target_shift(
        adata,
        "dta_shift",
        compare="dta_shift_delete",
        highlight={"direct": targets["direct"], "indirect": targets["indirect"]},
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
    adata.uns["demo_metrics"] = {c: metrics[c].to_numpy() for c in metrics.columns if c != "method"}
    adata.uns["demo_metrics"]["method"] = metrics["method"].to_numpy().astype(str)
    adata.write_h5ad(h5ad)
    csv = out / "metrics.csv"
    metrics.to_csv(csv, index=False)
    lap("write")
    total = time.perf_counter() - t_start
    timings["total"] = total

    if verbose:
        print()
        print(format_metrics(metrics))
        print()
        print(
            f"TF {sim.tf_symbol} ({sim.tf}); {len(targets['direct'])} direct and {len(targets['indirect'])} indirect "
            f"targets among {adata.n_vars - 1} genes; {n_with_tf} of {n_eval} cardiomyocytes express the TF and were "
            f"evaluated; context gain {rec['context_gain']:.3f}; device {resolve_device(device)}; total {total:.0f} s"
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


def score_methods(adata: AnnData, targets: dict[str, list[str]], *, exclude: list[str], methods=None) -> Any:
    """AUROC of each target set for each method (genes as the unit), the specificity ratio and chance.

    ``methods`` maps a label to a result key (default :data:`METHODS`); ``"<key>@controls"`` scores the control
    mutations of ``key`` (mean AUROC over the controls). Rankings use the magnitude of ``var[key + '_mean']``.
    The specificity ratio is the mean magnitude of the descendants' shifts under the mutation over the same
    under its controls.
    """
    import pandas as pd

    from .tl._rank import auroc

    methods = METHODS if methods is None else methods
    names = adata.var_names
    keep = ~names.isin(exclude)
    masks = {name: names.isin(genes) for name, genes in targets.items()}
    rows = []
    for label, key in methods.items():
        if key.endswith("@controls"):
            base = key.removesuffix("@controls")
            rankings = np.abs(np.asarray(adata.uns[base]["controls"]["mean"], dtype=np.float64))
        else:
            rankings = np.abs(adata.var[f"{key}_mean"].to_numpy(dtype=np.float64))[None, :]
        row: dict[str, Any] = {"method": label}
        for name, mask in masks.items():
            vals = []
            for r in rankings:
                ok = keep & np.isfinite(r)
                vals.append(auroc(r[ok & mask], r[ok & ~mask]))
            row[name] = float(np.mean(vals))
        rows.append(row)
    rows.append({"method": "chance", **dict.fromkeys(masks, 0.5)})
    frame = pd.DataFrame(rows)
    if "dta_shift" in adata.uns and "controls" in adata.uns["dta_shift"] and "descendants" in masks:
        desc = masks["descendants"] & keep
        shift = np.abs(adata.var["dta_shift_mean"].to_numpy(dtype=np.float64))
        ctrl = np.abs(np.asarray(adata.uns["dta_shift"]["controls"]["mean"], dtype=np.float64))
        frame.attrs["specificity"] = float(np.nanmean(shift[desc]) / np.nanmean(ctrl[:, desc]))
    return frame


def format_metrics(metrics: Any) -> str:
    """Format the demo's results table as text (AUROC per target set, then the specificity ratio)."""
    frame = metrics.copy()
    for c in frame.columns:
        if c != "method":
            frame[c] = frame[c].map(lambda v: f"{v:.3f}")
    text = "AUROC of the planted targets (genes ranked by |predicted shift|)\n" + frame.to_string(index=False)
    if "specificity" in metrics.attrs:
        text += (
            f"\nspecificity ratio (motif deletion / matched controls, descendants): {metrics.attrs['specificity']:.2f}"
        )
    return text
