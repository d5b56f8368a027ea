"""Cost of the two perturbation readouts on the same model and cells.

Builds the demo's data (sparse simulated cells) and a ``BioDTA.from_adata`` model (random weights: speed does not
depend on training), then times ``perturb_gene`` (deletion) with ``readout="cosine"`` and ``readout="expression"``
(``n_folds`` 7 and 3), best of ``--repeats`` interleaved rounds, and prints cells/s.

Usage: ``python benchmarks/readout.py [--cells 3000] [--genes 150] [--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import sc_dta as dta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--genes", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    dta.settings.progress = False
    sim = dta.datasets.simulated_grn(args.cells, args.genes, n_direct=25, n_indirect=20, n_housekeeping=10,
                                     n_markers=10, umis_per_cell=50, seed=0)  # fmt: skip
    ad = sim.adata
    dta.pp.annotate_tss(ad, sim.gtf)
    dta.tl.embed_dna(ad, genome=dta.genome.Genome(sim.fasta), encoder=dta.models.encoder_from_name("kmer"))
    model = dta.models.BioDTA.from_adata(ad, seed=0).eval()
    tokens = dta.pp.tokenize(ad, vocab=model.vocab, max_length=model.vocab.max_length)
    n_eval = sum(int(np.any(ids == model.vocab.token_ids[sim.tf.upper()])) for ids in tokens.input_ids)
    variants = {
        "cosine": {"readout": "cosine"},
        "expression, 7 folds": {"readout": "expression", "n_folds": 7},
        "expression, 3 folds": {"readout": "expression", "n_folds": 3},
    }
    best = dict.fromkeys(variants, np.inf)
    warnings.simplefilter("ignore", UserWarning)  # random weights: the shifts are noise, only their cost matters
    for _ in range(args.repeats):
        for name, kw in variants.items():
            t = time.perf_counter()
            dta.tl.perturb_gene(ad, sim.tf, model=model, tokens=tokens, copy=True, **kw)
            best[name] = min(best[name], time.perf_counter() - t)
    mean_len = np.mean([len(t) for t in tokens.input_ids])
    print(f"{n_eval} cells with the TF (mean {mean_len:.1f} tokens), {args.threads} thread(s), best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name:>20}: {n_eval / seconds:8.1f} cells/s ({seconds:.2f} s, {seconds / best['cosine']:.1f}× cosine)")


if __name__ == "__main__":
    main()
