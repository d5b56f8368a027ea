"""Why models built from the cells are position-free: the deletion confound, measured.

Trains two otherwise identical ``BioDTA.from_adata`` models on the same data, one with Geneformer's absolute
position embeddings and one position-free, deletes the TF token (``perturb_gene``) and reports, for each model
and readout:

- ``after/before``: mean |shift| of the genes ranked after the TF in a cell over that of the genes ranked before
  it (1 = no positional effect; deleting a token moves every later gene by one position);
- ``rho(mean expr)``: Spearman correlation of the gene scores with the genes' mean expression;
- the AUROC of the TF's descendants (direct + indirect targets).

Usage: ``python benchmarks/position_confound.py [--dataset own] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from science import load
from scipy.stats import spearmanr

import sc_dta as dta
from sc_dta.tl._rank import auroc


def after_over_before(adata, key: str, tokens, tf_token: int) -> float:
    """Mean |shift| of genes after the TF in each evaluated cell over genes before it (pooled over cells)."""
    layer = adata.layers[key].tocsr()
    tok2var = tokens.token_to_var()
    rows = {name: i for i, name in enumerate(adata.obs_names)}
    before, after = [], []
    for name, ids in zip(tokens.obs_names, tokens.input_ids, strict=True):
        r = rows[str(name)]
        if not adata.obs[f"{key}_evaluated"].iloc[r]:
            continue
        hit = np.flatnonzero(ids == tf_token)
        if hit.size == 0:
            continue
        row = layer[r]
        values = dict(zip(row.indices.tolist(), np.abs(row.data).tolist(), strict=True))
        for p, t in enumerate(ids):
            col = tok2var.get(int(t))
            if col is None or p == hit[0] or col not in values:
                continue
            (before if p < hit[0] else after).append(values[col])
    return float(np.mean(after) / np.mean(before)) if before and after else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="/tmp/sc_dta_science")
    args = p.parse_args(argv)
    dta.settings.progress = False
    sim = load(args.dataset, args.seed, args.data_dir)
    ad = sim.adata
    dta.pp.annotate_tss(ad, sim.gtf)
    dta.tl.embed_dna(ad, genome=dta.genome.Genome(sim.fasta), encoder=dta.models.encoder_from_name("kmer"))
    cells = (ad.obs["cell_type"] == "cardiomyocyte").to_numpy()
    desc = ad.var_names.isin(sim.truth["direct"] + sim.truth["indirect"])
    keep = ~ad.var_names.isin(sim.truth["tf"])
    mean_expr = np.asarray(ad.X.mean(axis=0)).ravel()
    print(f"data set {args.dataset}, seed {args.seed}: deletion of the TF token in {cells.sum()} cardiomyocytes")
    print(f"{'positions':>9} {'readout':>10} {'after/before':>12} {'rho(mean expr)':>14} {'AUROC desc':>10}")
    for positions in ("absolute", "none"):
        model = dta.models.BioDTA.from_adata(ad, seed=args.seed, position_embedding=positions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = dta.tl.train_adapter(ad, model, seed=args.seed)
        tokens = dta.pp.tokenize(ad, vocab=model.vocab, max_length=model.vocab.max_length)
        tf_token = int(model.vocab.token_ids[sim.tf.upper()])
        for readout in ("cosine", "expression"):
            key = f"del_{positions}_{readout}"
            dta.tl.perturb_gene(ad, sim.tf, model=model, cells=cells, readout=readout, key_added=key, tokens=tokens)
            score = np.abs(ad.var[f"{key}_mean"].to_numpy(dtype=np.float64))
            ok = keep & np.isfinite(score)
            rho = spearmanr(score[ok], mean_expr[ok])[0]
            ratio = after_over_before(ad, key, tokens, tf_token)
            print(
                f"{positions:>9} {readout:>10} {ratio:12.2f} {rho:14.2f} {auroc(score[ok & desc], score[ok & ~desc]):10.3f}"
            )


if __name__ == "__main__":
    main()
