"""Benchmark ``tl.screen``: a k-gene deletion screen against k separate ``tl.perturb_gene`` calls on the same cells.

Synthetic counts, a Geneformer vocabulary built from them and a random-weight ``BertForMaskedLM`` (the real class).
With the cosine readout a screen of k deletions costs about ``k + k / chunk_size`` forwards per cell instead of
``2 k`` (the unperturbed forward is shared by every gene), so the speed-up approaches 2× as k grows. The
expression readout's unperturbed pass depends on the gene (it is held out of the masked folds), so there the
screen shares it only between perturbations of the same gene; ``--readout expression`` shows that it costs
the same as the separate calls. The shifts of both are checked equal.

The two methods run in alternation, round by round (``--repeats`` rounds), in one torch thread by default
(``--threads``), so that other load on a shared machine falls on both alike; the best round of each is reported as
wall time and as CPU time of this process (``time.process_time``: what the machine's other users do not inflate),
with the load average before and after.

Examples
--------
    python benchmarks/screen.py                     # 10 genes, 60 cells, cosine readout (< 1 min on one core)
    python benchmarks/screen.py --k 50 --repeats 3  # the 50-gene screen of docs/performance.md
    python benchmarks/screen.py --k 50 --cells 200 --layers 6 --hidden 256
"""

from __future__ import annotations

import argparse
import os
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

import sc_dta as dta


def build(n_cells: int, n_genes: int, layers: int, hidden: int, max_length: int, seed: int):
    """Return synthetic counts, their vocabulary and a random-weight Geneformer-style model."""
    from transformers import BertConfig, BertForMaskedLM

    from sc_dta.models.cell import attach_vocab
    from sc_dta.models.vocab import GeneformerVocab

    rng = np.random.default_rng(seed)
    lib = rng.gamma(2.0, 1.0, n_cells)
    x = rng.poisson(lib[:, None] * rng.gamma(0.5, 2.0, n_genes)[None, :]).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(x))
    a.var_names = [f"ENSG{j:011d}" for j in range(n_genes)]
    a.obs_names = [f"cell{i}" for i in range(n_cells)]
    vocab = GeneformerVocab.from_adata(a, special_tokens=True, max_length=max_length)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=2 * hidden,
        max_position_embeddings=max_length,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM._from_config(cfg, attn_implementation="sdpa").eval()
    attach_vocab(model, vocab)
    return a, vocab, model


def forward_work(fn) -> tuple[int, int, int]:
    """Run ``fn`` once, counting the encoder forwards and their padded and real tokens."""
    import sc_dta.models._forward as forward_module

    real = forward_module.contextual_embeddings
    n = [0, 0, 0]

    def counting(model, ids, mask=None, **kwargs):
        n[0] += 1
        n[1] += ids.numel()
        n[2] += int(mask.sum()) if mask is not None else ids.numel()
        return real(model, ids, mask, **kwargs)

    forward_module.contextual_embeddings = counting  # the engine looks it up at each call
    try:
        fn()
    finally:
        forward_module.contextual_embeddings = real
    return n[0], n[1], n[2]


def main() -> None:
    """Run the benchmark and print the timings and the speed-up."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=10, help="genes deleted")
    p.add_argument("--cells", type=int, default=60)
    p.add_argument("--genes", type=int, default=400)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--readout", choices=["cosine", "expression"], default="cosine")
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="rounds (screen, then the separate calls)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    dta.settings.progress = False
    a, vocab, model = build(args.cells, args.genes, args.layers, args.hidden, args.max_length, args.seed)
    tokens = dta.pp.tokenize(a, vocab=vocab)
    counts: dict[int, int] = {}
    for ids in tokens.input_ids:
        for t in set(ids.tolist()) - set(vocab.special_ids):
            counts[t] = counts.get(t, 0) + 1
    genes = [vocab.id_to_token[t] for t in sorted(counts, key=lambda t: (-counts[t], t))[: args.k]]
    kw = {"model": model, "readout": args.readout, "batch_size": args.batch_size, "device": args.device}
    print(
        f"{args.k} deletions, {args.cells} cells (mean {np.mean([len(i) for i in tokens.input_ids]):.0f} tokens), "
        f"{args.layers} layers × {args.hidden}, readout={args.readout}, torch threads={torch.get_num_threads()}"
    )

    def run_screen():
        return dta.tl.screen(a, [(g, "delete") for g in genes], tokens=tokens, chunk_size=args.chunk_size, **kw)

    def run_single():
        return [
            dta.tl.perturb_gene(a, g, tokens=tokens, copy=True, **kw).var["dta_shift_delete_mean"].to_numpy()
            for g in genes
        ]

    dta.tl.perturb_gene(a, genes[0], tokens=tokens, copy=True, **kw)  # warm-up (thread pools, allocator)
    load_before = os.getloadavg()
    wall: dict[str, list[float]] = {"screen": [], "single": []}
    cpu: dict[str, list[float]] = {"screen": [], "single": []}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
        return out

    for _ in range(args.repeats):  # interleaved round by round: other load on the machine falls on both
        res = timed("screen", run_screen)
        means = timed("single", run_single)
    load_after = os.getloadavg()

    work = {name: forward_work(fn) for name, fn in (("screen", run_screen), ("single", run_single))}

    diff = np.nanmax(np.abs(res.X - np.stack(means)))
    n_eval = int(res.obs["n_cells"].sum())
    w = {k: min(v) for k, v in wall.items()}
    c = {k: min(v) for k, v in cpu.items()}
    print(
        f"screen:             wall {w['screen']:7.2f} s  cpu {c['screen']:7.2f} s  "
        f"({n_eval / w['screen']:7.1f} evaluated cell-perturbations/s)"
    )
    print(
        f"{args.k} perturb_gene calls: wall {w['single']:7.2f} s  cpu {c['single']:7.2f} s  "
        f"({n_eval / w['single']:7.1f} evaluated cell-perturbations/s)"
    )
    rounds = zip(wall["screen"], wall["single"], strict=True)
    print("rounds (wall s, screen / single):", ", ".join(f"{a:.2f}/{b:.2f}" for a, b in rounds))
    print(
        f"speed-up: {w['single'] / w['screen']:.2f}× wall, {c['single'] / c['screen']:.2f}× cpu (best of "
        f"{args.repeats})   max |screen - perturb_gene| = {diff:.1e}"
    )
    per_round = [b / a for a, b in zip(cpu["screen"], cpu["single"], strict=True)]
    print("per-round cpu speed-up:", ", ".join(f"{r:.2f}" for r in per_round), f"(median {np.median(per_round):.2f})")
    (f0, t0, r0), (f1, t1, r1) = work["screen"], work["single"]
    print(
        f"forward work (load-independent): screen {f0} forwards, {t0} padded / {r0} real tokens; separate calls "
        f"{f1} forwards, {t1} / {r1} tokens: {t1 / t0:.2f}× fewer padded tokens, {r1 / r0:.2f}× fewer real"
    )
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    print(f"load average (1, 5, 15 min): before {before}, after {after}")


if __name__ == "__main__":
    main()
