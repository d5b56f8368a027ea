"""Does Bio-DTA find a TF's targets, and does the DNA mutation matter? The public recipe on simulated data.

For each data set and seed: annotate TSSs, embed promoter DNA, ``BioDTA.from_adata`` + ``train_adapter`` with
their defaults, then rank every gene for the TF and score the planted direct / indirect targets (AUROC, genes as
the unit) for each method, all measured in the same run:

- Bio-DTA: ``perturb_tss`` deleting the TF's promoter motifs (expression readout; cosine readout too);
- matched control: the same-length deletions elsewhere in the window that keep the motifs (mean AUROC over
  the controls) and the specificity ratio (mean |shift| of the TF's descendants under the motif deletion over
  the same under the controls); the motif deletion minus the controls (each gene's |mean shift| minus its mean
  |mean shift| under the controls: what only the motif deletion does, ranked on its own);
- adapter-free deletion and overexpression of the TF token (``perturb_gene``);
- the same expression readouts ranked by direction: genes predicted down after a deletion, up after
  overexpression (``rank_targets(direction=...)``; most planted targets are activated);
- co-expression with the TF (|Spearman|), and chance (0.5).

Data sets: ``sergio`` and ``sergio-b`` from the third-party simulator SERGIO (``datasets.sergio_grn``, sparse UMI
counts), ``own`` from the package's ``datasets.simulated_grn(umis_per_cell=50)`` (the demo's data).

Usage: ``python benchmarks/science.py [--seeds 0 1] [--datasets sergio sergio-b own] [--encoder kmer]
[--out science.csv]``. Prints one table (mean over seeds, and per seed with ``--per-seed``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import sc_dta as dta
from sc_dta.tl._rank import auroc


def load(name: str, seed: int, out: str):
    if name == "sergio":
        return dta.datasets.sergio_grn(3000, 150, seed=seed, out_dir=f"{out}/sergio-{seed}")
    if name == "sergio-b":  # other network sizes, more modules, a little deeper sequencing
        return dta.datasets.sergio_grn(
            3000, 200, n_direct=15, n_indirect=25, n_modules=5, library_size=150.0, seed=seed,
            out_dir=f"{out}/sergio-b-{seed}",
        )  # fmt: skip
    if name == "own":  # the package's own simulator, thinned to sparse UMI counts (the demo's data)
        return dta.datasets.simulated_grn(
            3000, 150, n_direct=25, n_indirect=20, n_housekeeping=10, n_markers=10, umis_per_cell=50.0, seed=seed,
            out_dir=f"{out}/own-{seed}",
        )  # fmt: skip
    raise ValueError(name)


def scores(adata, key: str, sign: float | None = None) -> np.ndarray:
    """Ranking scores of a result: its magnitude, or ``sign * value`` for a signed direction."""
    values = adata.var[f"{key}_mean"].to_numpy(dtype=np.float64)
    return np.abs(values) if sign is None else sign * values


def run_one(name: str, seed: int, encoder_name: str, n_controls: int, out: str) -> dict:
    t0 = time.perf_counter()
    sim = load(name, seed, out)
    ad = sim.adata
    dta.pp.annotate_tss(ad, sim.gtf)
    genome = dta.genome.Genome(sim.fasta)
    encoder = dta.models.encoder_from_name(encoder_name)
    dta.tl.embed_dna(ad, genome=genome, encoder=encoder)
    model = dta.models.BioDTA.from_adata(ad, seed=seed)
    t_train = time.perf_counter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model = dta.tl.train_adapter(ad, model, seed=seed)
    t_train = time.perf_counter() - t_train
    cells = (ad.obs["cell_type"] == "cardiomyocyte").to_numpy()
    dta.tl.perturb_tss(
        ad, sim.tf, sim.mutation, model=model, genome=genome, encoder=encoder, cells=cells,
        n_controls=n_controls, seed=seed,
    )  # fmt: skip
    dta.tl.perturb_tss(
        ad, sim.tf, sim.mutation, model=model, genome=genome, encoder=encoder, cells=cells, readout="cosine",
        key_added="dta_shift_cosine",
    )  # fmt: skip
    dta.tl.perturb_gene(ad, sim.tf, model=model, kind=["delete", "overexpress"], cells=cells)
    dta.tl.perturb_gene(ad, sim.tf, model=model, kind="delete", cells=cells, readout="cosine", key_added="cos_del")
    dta.tl.coexpression(ad, sim.tf, key_added="coexpr")

    names = ad.var_names
    sets = {
        "direct": names.isin(sim.truth["direct"]),
        "indirect": names.isin(sim.truth["indirect"]),
        "descendants": names.isin(sim.truth["direct"] + sim.truth["indirect"]),
    }
    not_tf = ~names.isin(sim.truth["tf"])
    controls = np.abs(np.asarray(ad.uns["dta_shift"]["controls"]["mean"], dtype=np.float64))
    methods = {
        "Bio-DTA motif deletion (expression)": scores(ad, "dta_shift"),
        "Bio-DTA motif deletion (cosine)": scores(ad, "dta_shift_cosine"),
        "matched control deletion (expression)": controls,
        "Bio-DTA motif deletion minus controls (expression)": scores(ad, "dta_shift") - controls.mean(axis=0),
        "TF token deletion (expression)": scores(ad, "dta_shift_delete"),
        "TF token deletion (cosine, Geneformer)": scores(ad, "cos_del"),
        "TF overexpression (expression)": scores(ad, "dta_shift_overexpress"),
        "Bio-DTA motif deletion (expression, down)": scores(ad, "dta_shift", -1.0),
        "TF token deletion (expression, down)": scores(ad, "dta_shift_delete", -1.0),
        "TF overexpression (expression, up)": scores(ad, "dta_shift_overexpress", 1.0),
        "co-expression |Spearman|": scores(ad, "coexpr"),
    }
    rows = []
    for method, s in methods.items():
        row = {"dataset": name, "seed": seed, "method": method}
        for set_name, mask in sets.items():
            if s.ndim == 2:  # one ranking per control: mean AUROC
                vals = [auroc(r[mask & not_tf & np.isfinite(r)], r[~mask & not_tf & np.isfinite(r)]) for r in s]
                row[set_name] = float(np.mean(vals))
            else:
                ok = not_tf & np.isfinite(s)
                row[set_name] = auroc(s[ok & mask], s[ok & ~mask])
        rows.append(row)
    rows.append({"dataset": name, "seed": seed, "method": "chance", "direct": 0.5, "indirect": 0.5, "descendants": 0.5})
    desc = sets["descendants"] & not_tf
    motif = scores(ad, "dta_shift")
    specificity = float(np.nanmean(motif[desc]) / np.nanmean(controls[:, desc]))
    rec = ad.uns["train_adapter"]
    extra = {
        "specificity": specificity,
        "context_gain": float(rec["context_gain"]),
        "epochs": int(rec["best_epoch"]) + 1,
        "train_s": t_train,
        "total_s": time.perf_counter() - t0,
        "umis_per_cell": float(np.mean(np.asarray(ad.X.sum(1)))),
        "genes_per_cell": float(np.mean(np.asarray((ad.X > 0).sum(1)))),
    }
    for r in rows:
        r.update(extra)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["sergio", "sergio-b", "own"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--encoder", default="kmer")
    p.add_argument("--n-controls", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="science.csv")
    p.add_argument("--data-dir", default="/tmp/sc_dta_science")
    p.add_argument("--per-seed", action="store_true")
    p.add_argument("--from-csv", nargs="+", default=None, help="print the table of earlier runs' CSV files")
    args = p.parse_args(argv)
    if args.from_csv:
        frame = pd.concat([pd.read_csv(f) for f in args.from_csv], ignore_index=True)
        print_table(frame, sorted(frame.seed.unique().tolist()), args.encoder, args.per_seed)
        return
    import torch

    torch.set_num_threads(args.threads)
    dta.settings.progress = False
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            rows += run_one(name, seed, args.encoder, args.n_controls, args.data_dir)
            frame = pd.DataFrame(rows)
            frame.to_csv(args.out, index=False)
            last = frame[(frame.dataset == name) & (frame.seed == seed)]
            print(f"[{name} seed {seed}] specificity {last.specificity.iloc[0]:.2f}, context gain "
                  f"{last.context_gain.iloc[0]:.3f}, {last.total_s.iloc[0]:.0f} s", flush=True)  # fmt: skip
    print_table(pd.DataFrame(rows), args.seeds, args.encoder, args.per_seed)


def print_table(frame: pd.DataFrame, seeds, encoder: str, per_seed: bool) -> None:
    cols = ["direct", "indirect", "descendants", "specificity", "context_gain", "total_s"]
    order = list(dict.fromkeys(frame.method))
    table = frame.groupby(["dataset", "method"], sort=False)[cols].mean().reset_index()
    table["method"] = pd.Categorical(table["method"], order, ordered=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(f"\nAUROC of the TF's targets (mean over seeds {list(seeds)}; encoder {encoder}; "
              "specificity, context gain and run time are per data set)")  # fmt: skip
        print(table.sort_values(["dataset", "method"]).to_string(index=False))
        if per_seed:
            print(frame[["dataset", "seed", "method", *cols]].to_string(index=False))


if __name__ == "__main__":
    main()
