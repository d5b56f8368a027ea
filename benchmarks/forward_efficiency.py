"""Per-forward efficiency of the perturbation forward pass on real cells (issue 10, item 6).

Real cells: celltypist's sample counts (cells x gene symbols, raw counts), which are not a project dependency.
Get the file with::

    pip download celltypist==1.7.1 --no-deps -d /tmp/ct && (cd /tmp/ct && unzip -q -o celltypist-1.7.1-*.whl)
    python benchmarks/forward_efficiency.py --counts /tmp/ct/celltypist/data/samples/sample_cell_by_gene.csv

The first ``--cells`` (200) cells are mapped to Ensembl ids with Geneformer's V1 (gc30M) dictionaries
(``$SC_DTA_GENEFORMER_DATA``, default ``../shared/data/geneformer``) and tokenized with :func:`sc_dta.pp.tokenize`.
The model is a random-weight ``transformers.BertForMaskedLM`` with the real Geneformer-V1-10M configuration (6
layers, 256 wide, 4 heads, FFN 512, 25,426 tokens; SDPA attention, the default of ``transformers`` and of
:func:`sc_dta.models.load_geneformer`), float32, ``--threads`` (2) threads. Printed tables:

``matmul``
    the machine's matmul rate in GFLOP/s at the model's shapes: ``torch.mm`` (tokens x 256) @ (256 x 256 / 768 /
    512), (tokens x 512) @ (512 x 256), the masked-LM decoder (tokens x 256) @ (256 x 25,426), and the two
    attention-like batched matmuls (4 heads, 64 wide), at the cells' median length and at 2,048 tokens.
``flops``
    analytic FLOPs (2 per multiply-add; matrix products only) of one ``contextual_embeddings`` forward (per layer
    ``8 L d^2`` for the Q/K/V/output projections, ``4 L d f`` for the FFN, ``4 L^2 d`` for the attention scores
    and the weighted sum, times the layers below ``emb_layer``) and of Geneformer's perturber (all layers and the
    MLM head, ``2 L d^2 + 2 L d V``), per cell perturbation (original + perturbed version).
``forward``
    achieved GFLOP/s of the raw forward at batch sizes 1, 4, 16 on 16 cells of median length and on the 16
    longest, old (the forward before this work, kept below as :func:`baseline_forward`) and new, interleaved.
``perturb``
    cells/s, CPU seconds per cell and achieved GFLOP/s of :func:`sc_dta.tl.perturb_gene` (cosine readout, delete
    and overexpress) on all cells with the old and the new forward, run alternately on interleaved slices of the
    cells; and Geneformer's perturber's work (per cell, full forward with all hidden states and the MLM head on
    the original and the perturbed cell, batch 1, so no padding) on a length-stratified subset, against the new
    forward on the same subset.
``fill``
    batch fill: the engine's length-sorted batches for ``MIN_FILL`` 0.97 (the CPU default), 0.9 and 0 at batch 16
    (number of batches, cells per batch, padded FLOPs with the old and the new forward); with ``--fill-time`` also
    the measured CPU time per cell of ``perturb_gene`` at each (slow: one full run per value).
``profile``
    ``torch.profiler``: the top operators by self CPU time of the old and the new forward on 4 median cells.

Times: best of interleaved rounds. On a shared machine, multi-threaded wall-clock figures are unreliable (an OpenMP
thread waits for a descheduled sibling at every operator), so the load average is printed and CPU time per cell is
reported alongside wall time; ``GF/s*`` is FLOPs per CPU-second times the threads (the rate on dedicated cores). For
short operations ``GF/s*`` overstates the rate (a descheduled thread's wait is not CPU time): take ``GF/s`` (best
wall) as the machine's matmul rate.
Geneformer's own perturber on a 2-core CPU: 2.3 cells/s (V1-10M, batch 16), from docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

import sc_dta as dta
from sc_dta.models import _forward
from sc_dta.models._forward import backbone_bert, resolve_emb_layer

DATA = Path(os.environ.get("SC_DTA_GENEFORMER_DATA", Path(__file__).resolve().parents[2] / "shared/data/geneformer"))
CONFIG = "Geneformer-V1-10M_config.json"
GENEFORMER_CELLS_PER_S = 2.3  # Geneformer's perturber, V1-10M, batch 16, 2-core CPU (docs/performance.md)
SECTIONS = ("matmul", "flops", "forward", "perturb", "fill", "profile")


# ----------------------------------------------------------------------------- the forward before this work


def _baseline_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)
    if bool(keep.all()):
        return None
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    mask.masked_fill_(~keep, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def baseline_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    emb_layer: int = -1,
) -> torch.Tensor:
    """``contextual_embeddings`` as it was before this work: the layer modules, one additive mask per batch."""
    bert = backbone_bert(model)
    n_run = resolve_emb_layer(model, emb_layer)
    if inputs_embeds is None:
        embed_tokens = getattr(model, "embed_tokens", None)
        if embed_tokens is not None and hasattr(model, "backbone"):
            inputs_embeds = embed_tokens(input_ids)
    if inputs_embeds is not None:
        hidden = bert.embeddings(inputs_embeds=inputs_embeds)
    else:
        hidden = bert.embeddings(input_ids=input_ids)
    mask = _baseline_mask(attention_mask, hidden.dtype)
    for layer in bert.encoder.layer[:n_run]:
        out: Any = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple | list) else out
    return hidden


NEW_FORWARD = _forward.contextual_embeddings
FORWARDS = {"old": baseline_forward, "new": NEW_FORWARD}


@contextlib.contextmanager
def forward_impl(fn: Callable) -> Iterator[list[int]]:
    """Make every ``sc_dta`` module use ``fn`` as ``contextual_embeddings``; yields the CPU seconds of each call."""
    calls: list[float] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append(time.process_time() - t)

    patched = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("sc_dta") and getattr(m, "contextual_embeddings", None) is NEW_FORWARD
    ]
    for m in patched:
        m.contextual_embeddings = counted
    try:
        yield calls
    finally:
        for m in patched:
            m.contextual_embeddings = NEW_FORWARD


# ----------------------------------------------------------------------------- data and model


def load_cells(counts: Path, n_cells: int) -> tuple[Any, Any, Any]:
    """The first ``n_cells`` cells of the counts CSV as an AnnData (var: symbols, ``ensembl_id``) and their tokens."""
    import anndata as ad
    import pandas as pd

    from sc_dta.models import GeneformerVocab

    if not counts.exists():
        raise FileNotFoundError(f"--counts {counts} does not exist; see this script's docstring for how to get it.")
    df = pd.read_csv(counts, index_col=0, nrows=n_cells)
    vocab = GeneformerVocab.load(DATA, version="V1")
    adata = ad.AnnData(df.to_numpy(dtype=np.float32))
    adata.obs_names = df.index.astype(str)
    adata.var_names = df.columns.astype(str)
    adata.var_names_make_unique()
    names = vocab.gene_names  # gene_name_id_dict_gc30M.pkl: symbol -> Ensembl id
    adata.var["ensembl_id"] = [names.get(s, names.get(s.upper(), s)) for s in df.columns.astype(str)]
    tokens = dta.pp.tokenize(adata, vocab=vocab, gene_id_key="ensembl_id")
    return adata, tokens, vocab


def make_model(vocab: Any) -> transformers.BertForMaskedLM:
    from sc_dta.models.cell import attach_vocab

    cfg = transformers.BertConfig(**json.loads((DATA / CONFIG).read_text()))
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()  # transformers picks SDPA attention by default
    attach_vocab(model, vocab)
    return model


# ----------------------------------------------------------------------------- FLOPs


def layer_flops(L: np.ndarray | int, d: int, f: int) -> np.ndarray:
    """Matmul FLOPs of one BERT layer on ``L`` tokens: Q/K/V/output projections, FFN, scores and weighted sum."""
    L = np.asarray(L, dtype=np.float64)
    return 8 * L * d * d + 4 * L * d * f + 4 * L * L * d


def forward_flops(L: np.ndarray | int, cfg: Any, n_run: int) -> np.ndarray:
    """FLOPs of ``contextual_embeddings`` up to layer ``n_run`` (embeddings: lookups only)."""
    return n_run * layer_flops(L, cfg.hidden_size, cfg.intermediate_size)


def full_flops(L: np.ndarray | int, cfg: Any) -> np.ndarray:
    """FLOPs of a full ``BertForMaskedLM`` forward: every layer and the MLM head (transform + decoder) at all tokens."""
    L = np.asarray(L, dtype=np.float64)
    d = cfg.hidden_size
    head = 2 * L * d * d + 2 * L * d * cfg.vocab_size
    return cfg.num_hidden_layers * layer_flops(L, d, cfg.intermediate_size) + head


# ----------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Run the functions in turn ``rounds`` times; best wall and CPU seconds of each (and its last result)."""
    best = {k: {"wall": float("inf"), "cpu": float("inf"), "out": None} for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            b = best[k]
            b["wall"] = min(b["wall"], time.perf_counter() - t)
            b["cpu"] = min(b["cpu"], time.process_time() - c)
            b["out"] = out
    return best


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n### {title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


# ----------------------------------------------------------------------------- sections


def section_matmul(lengths: np.ndarray, cfg: Any, threads: int, rounds: int) -> dict[str, float]:
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    dh = d // h
    rows, rates = [], {}
    for L in (int(np.median(lengths)), 2048):
        shapes = {
            f"mm ({L}x{d})@({d}x{d})": ((L, d), (d, d)),
            f"mm ({L}x{d})@({d}x{3 * d}) fused QKV": ((L, d), (d, 3 * d)),
            f"mm ({L}x{d})@({d}x{f})": ((L, d), (d, f)),
            f"mm ({L}x{f})@({f}x{d})": ((L, f), (f, d)),
            f"mm ({L}x{d})@({d}x{cfg.vocab_size}) MLM decoder": ((L, d), (d, cfg.vocab_size)),
            f"bmm ({h}x{L}x{dh})@({h}x{dh}x{L}) scores": ((h, L, dh), (h, dh, L)),
            f"bmm ({h}x{L}x{L})@({h}x{L}x{dh}) weighted sum": ((h, L, L), (h, L, dh)),
        }
        fns, flops = {}, {}
        for name, (sa, sb) in shapes.items():
            a, b = torch.randn(*sa), torch.randn(*sb)
            op = torch.mm if len(sa) == 2 else torch.bmm
            fns[name] = lambda op=op, a=a, b=b: op(a, b)
            flops[name] = 2 * np.prod(sa) * sb[-1]
        interleaved(fns, 1)  # warm-up
        best = interleaved(fns, rounds)
        for name, b in best.items():
            rate, rate_cpu = flops[name] / b["wall"] / 1e9, flops[name] / b["cpu"] * threads / 1e9
            rows.append([name, f"{flops[name] / 1e9:.2f}", f"{b['wall'] * 1e3:.1f}", f"{rate:.0f}", f"{rate_cpu:.0f}"])
            rates[name] = rate
    table(
        f"matmul rate (torch, float32, {threads} threads; best of {rounds}; {load()})",
        ["operation", "GFLOP", "ms", "GF/s", "GF/s*"],
        rows,
    )
    return rates


def section_flops(lengths: np.ndarray, cfg: Any, n_run: int) -> None:
    rows = []
    for L in (256, 512, int(np.median(lengths)), 1024, 2048):
        per_layer = layer_flops(L, cfg.hidden_size, cfg.intermediate_size)
        d = cfg.hidden_size
        attn_share = 4 * L * L * d / per_layer
        ours, gf = forward_flops(L, cfg, n_run), full_flops(L, cfg)
        rows.append(
            [
                L,
                f"{per_layer / 1e9:.2f}",
                f"{attn_share:.0%}",
                f"{ours / 1e9:.1f}",
                f"{gf / 1e9:.1f}",
                f"{gf / ours:.2f}",
            ]
        )
    ours_all = 2 * forward_flops(lengths, cfg, n_run).sum()
    gf_all = 2 * full_flops(lengths, cfg).sum()
    table(
        f"analytic FLOPs (matmuls; {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, FFN {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}; contextual_embeddings runs {n_run} layers)",
        ["tokens", "GFLOP/layer", "attention share", "ours GFLOP", "Geneformer GFLOP", "ratio"],
        rows,
    )
    print(
        f"per cell perturbation (original + perturbed) over the {len(lengths)} cells (median {int(np.median(lengths))}"
        f" tokens): ours {ours_all / len(lengths) / 1e9:.1f} GFLOP/cell, Geneformer's perturber "
        f"{gf_all / len(lengths) / 1e9:.1f} GFLOP/cell: {gf_all / ours_all:.2f}x less arithmetic"
    )


def _batches(cells: list[np.ndarray], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sc_dta.models._padding import pad_tokens

    out = []
    for i in range(0, len(cells), size):
        ids, mask = pad_tokens(cells[i : i + size], 0)
        out.append((torch.from_numpy(ids), torch.from_numpy(mask)))
    return out


def section_forward(model: Any, cells: list[np.ndarray], threads: int, rounds: int, rates: dict) -> None:
    cfg = model.config
    n_run = resolve_emb_layer(model, -1)
    order = np.argsort([-len(c) for c in cells], kind="stable")
    groups = {}
    for name, q in (("median", 0.5), ("upper quartile", 0.25)):
        start = min(max(0, int(q * len(order)) - 8), max(0, len(order) - 16))
        groups[name] = order[start : start + 16]
    variants = {k: (fn, threads) for k, fn in FORWARDS.items()}
    if threads > 1:
        variants["new, 1 thread"] = (NEW_FORWARD, 1)
    rows = []
    with torch.inference_mode():
        warm = _batches([cells[order[-1]], cells[order[-2]]], 2)
        interleaved({k: (lambda fn=fn: [fn(model, ids, m) for ids, m in warm]) for k, fn in FORWARDS.items()}, 1)
        for gname, idx in groups.items():
            group = [cells[i] for i in idx]
            useful = forward_flops(np.array([len(c) for c in group]), cfg, n_run).sum()
            for bs in (1, 4, 16):
                batches = _batches(group, bs)
                padded = sum(forward_flops(ids.shape[1], cfg, n_run) * ids.shape[0] for ids, _ in batches)
                # old and new alternate batch by batch; each batch's best over the rounds is kept
                best = {k: {"wall": 0.0, "cpu": 0.0, "out": []} for k in variants}
                for ids, m in batches:
                    one = interleaved(
                        {k: (lambda v=v, ids=ids, m=m: _threaded(v, model, ids, m)) for k, v in variants.items()},
                        rounds,
                    )
                    for k, b in one.items():
                        best[k]["wall"] += b["wall"]
                        best[k]["cpu"] += b["cpu"]
                        best[k]["out"].append(b["out"])
                dev = max(
                    float((a - b)[m.bool()].abs().max())
                    for a, b, (_, m) in zip(best["old"]["out"], best["new"]["out"], batches, strict=True)
                )
                for k, b in best.items():
                    rows.append(
                        [
                            f"{gname} ({int(np.median([len(c) for c in group]))} tok)",
                            bs,
                            k,
                            f"{padded / useful - 1:.1%}",
                            f"{b['wall'] * 1e3 / len(group):.0f}",
                            f"{b['cpu'] * 1e3 / len(group):.0f}",
                            f"{useful / b['wall'] / 1e9:.0f}",
                            f"{useful / b['cpu'] * variants[k][1] / 1e9:.0f}",
                            "" if k == "old" else f"{best['old']['cpu'] / b['cpu']:.2f}x; max|new-old| {dev:.1e}",
                        ]
                    )
    ref = max((v for k, v in rates.items() if "mm (" in k and k.startswith("mm") and "decoder" not in k), default=0)
    table(
        f"raw forward (contextual_embeddings, emb_layer=-1: {n_run} layers; best of {rounds}; {load()})",
        ["cells", "batch", "forward", "padding", "ms/cell", "CPU ms/cell", "GF/s", "GF/s*", "new vs old (CPU)"],
        rows,
    )
    print("GF/s: useful (unpadded) FLOPs per wall second; GF/s*: per CPU-second x threads")
    if ref:
        print(f"best measured projection-matmul rate above: {ref:.0f} GF/s")


def _threaded(variant: tuple[Callable, int], model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    fn, n = variant
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(model, ids, mask)
    finally:
        torch.set_num_threads(before)


def geneformer_work(model: Any, cells: list[np.ndarray], gene: int) -> list[np.ndarray]:
    """Geneformer's perturber's work per cell: full forward with all hidden states and the MLM head, original and
    deleted (batch 1); the shifts of the genes present in both, position by position."""
    n = model.config.num_hidden_layers
    out = []
    with torch.inference_mode():
        for c in cells:
            pert = c[c != gene]
            h0 = model(torch.from_numpy(c)[None], output_hidden_states=True).hidden_states[n - 1][0]
            h1 = model(torch.from_numpy(pert)[None], output_hidden_states=True).hidden_states[n - 1][0]
            keep = torch.from_numpy((c != gene) & (c > 1))
            out.append((1 - torch.nn.functional.cosine_similarity(h0[keep], h1[pert > 1], dim=-1)).numpy())
    return out


def _perturb(adata: Any, tokens: Any, model: Any, gene: str, kind: str, cells: np.ndarray | None) -> Any:
    return dta.tl.perturb_gene(
        adata, gene, model=model, kind=kind, readout="cosine", tokens=tokens, cells=cells, copy=True, device="cpu"
    )


def section_perturb(adata, tokens, model, gene, threads, rounds, n_slices, n_ref, kinds) -> None:
    cfg = model.config
    n_run = resolve_emb_layer(model, -1)
    lengths = np.array([len(c) for c in tokens.input_ids])
    token = tokens.vocab.token_id(gene)
    has = np.array([token in c for c in tokens.input_ids])
    print(f"\nperturbed gene {gene} (token {token}) is in {has.sum()} of {len(has)} cells")
    # interleaved slices of the cells with the gene (each slice spans all lengths)
    idx = np.flatnonzero(has)
    idx = idx[np.argsort(-lengths[idx], kind="stable")]
    slices = [np.sort(idx[s::n_slices]) for s in range(n_slices)]
    masks = []
    for s in slices:
        m = np.zeros(adata.n_obs, dtype=bool)
        m[s] = True
        masks.append(m)
    rows = []
    for kind in kinds:
        L0 = lengths[idx]
        useful = (forward_flops(L0, cfg, n_run) + forward_flops(L0 - (kind == "delete"), cfg, n_run)).sum()
        totals = {k: {"wall": 0.0, "cpu": 0.0, "calls": 0} for k in FORWARDS}
        results: dict[str, list] = {k: [] for k in FORWARDS}
        warm = np.zeros(adata.n_obs, dtype=bool)
        warm[idx[-2:]] = True
        for fn in FORWARDS.values():  # warm-up on the two shortest cells
            with forward_impl(fn):
                _perturb(adata, tokens, model, gene, kind, warm)
        for m in masks:
            for _ in range(max(1, rounds // 2)):  # best of rounds per slice
                fns = {}
                for k, fn in FORWARDS.items():

                    def run(fn=fn, m=m, kind=kind):
                        with forward_impl(fn) as calls:
                            out = _perturb(adata, tokens, model, gene, kind, m)
                        return out, calls

                    fns[k] = run
                best = interleaved(fns, 1)
                for k, b in best.items():
                    t = totals[k]
                    t.setdefault("slice", []).append((b["wall"], b["cpu"], sum(b["out"][1])))
                    results[k].append((m, b["out"][0]))
                    t["calls"] += len(b["out"][1])
            for k in FORWARDS:
                sl = min(totals[k].pop("slice"), key=lambda x: x[1])
                totals[k]["wall"] += sl[0]
                totals[k]["cpu"] += sl[1]
                totals[k]["fwd"] = totals[k].get("fwd", 0.0) + sl[2]
        key = f"dta_shift_{kind}"
        dev = 0.0
        for (m, a), (_, b) in zip(results["old"], results["new"], strict=True):
            la, lb = a.layers[key][m], b.layers[key][m]
            dev = max(dev, float(abs(la - lb).max()) if la.nnz else 0.0)
        n = len(idx)
        for k, t in totals.items():
            assert t["calls"] > 0, f"the {k} forward was never called: the engine does not use contextual_embeddings"
            cps, cps_cpu = n / t["wall"], n / t["cpu"] * threads
            rows.append(
                [
                    kind,
                    k,
                    n,
                    f"{t['wall']:.1f}",
                    f"{cps:.2f}",
                    f"{t['cpu'] / n * 1e3:.0f}",
                    f"{cps_cpu:.2f}",
                    f"{useful / t['wall'] / 1e9:.0f}",
                    f"{useful / t['cpu'] * threads / 1e9:.0f}",
                    f"{cps_cpu / GENEFORMER_CELLS_PER_S:.2f}",
                    f"{t['fwd'] / t['cpu']:.0%}",
                    "" if k == "old" else f"{totals['old']['cpu'] / t['cpu']:.2f}x; max|new-old| {dev:.1e}",
                ]
            )
    table(
        f"perturb_gene (cosine readout, batch {dta.settings.batch_size_cells}, float32, {threads} threads; old and new "
        f"forward alternately on {n_slices} interleaved slices, best of {max(1, rounds // 2)} per slice; {load()})",
        [
            "kind",
            "forward",
            "cells",
            "wall s",
            "cells/s",
            "CPU ms/cell",
            "cells/s*",
            "GF/s",
            "GF/s*",
            "x GF 2.3",
            "in fwd",
            "new/old",
        ],
        rows,
    )
    print(
        "cells/s* and GF/s*: per CPU-second x threads (dedicated cores). x GF 2.3: cells/s* / Geneformer's 2.3."
        " in fwd: share of the CPU time spent inside contextual_embeddings (the rest: the engine, AnnData)."
    )
    if n_ref:
        # Geneformer's work on a length-stratified subset, against the new forward on the same cells (delete)
        pick = idx[np.linspace(0, len(idx) - 1, n_ref).round().astype(int)]
        sub = [np.asarray(tokens.input_ids[i]) for i in pick]
        m = np.zeros(adata.n_obs, dtype=bool)
        m[pick] = True
        L0 = lengths[pick]
        gf_flops = (full_flops(L0, cfg) + full_flops(L0 - 1, cfg)).sum()
        our_flops = (forward_flops(L0, cfg, n_run) + forward_flops(L0 - 1, cfg, n_run)).sum()
        fns = {
            "Geneformer's work (batch 1, full fwd + head)": lambda: geneformer_work(model, sub, token),
            "perturb_gene, new forward": lambda: _perturb(adata, tokens, model, gene, "delete", m),
        }
        best = interleaved(fns, max(1, rounds // 2))
        ref_out, ours = best[next(iter(fns))]["out"], best["perturb_gene, new forward"]["out"]
        layer = ours.layers["dta_shift_delete"]
        row_of = {int(i): r for r, i in enumerate(pick)}
        dev = 0.0
        t2v = tokens.token_to_var() if hasattr(tokens, "token_to_var") else None
        if t2v is not None:
            for i, shifts in zip(pick, ref_out, strict=True):
                c = np.asarray(tokens.input_ids[i])
                toks = c[(c != token) & (c > 1)]
                cols = np.array([t2v[int(t)] for t in toks])
                got = np.asarray(layer[int(i)].toarray()).ravel()[cols]
                dev = max(dev, float(np.abs(got - shifts).max()))
        del row_of
        rows = []
        for k, b in best.items():
            fl = gf_flops if k.startswith("Gene") else our_flops
            rows.append(
                [
                    k,
                    n_ref,
                    f"{b['wall']:.1f}",
                    f"{n_ref / b['wall']:.2f}",
                    f"{b['cpu'] / n_ref * 1e3:.0f}",
                    f"{n_ref / b['cpu'] * threads:.2f}",
                    f"{fl / n_ref / 1e9:.1f}",
                    f"{fl / b['cpu'] * threads / 1e9:.0f}",
                ]
            )
        first = next(iter(best.values()))
        table(
            f"Geneformer's perturber's work vs perturb_gene (delete) on {n_ref} length-stratified cells "
            f"(median {int(np.median(L0))} tokens; max |shift - Geneformer's| {dev:.1e}; {load()})",
            ["method", "cells", "wall s", "cells/s", "CPU ms/cell", "cells/s*", "GFLOP/cell", "GF/s*"],
            rows,
        )
        print(
            f"speed-up (CPU time) {first['cpu'] / best['perturb_gene, new forward']['cpu']:.2f}x for "
            f"{gf_flops / our_flops:.2f}x less arithmetic"
        )


def _engine_batches(lengths_desc: np.ndarray, batch_size: int, min_fill: float) -> list[np.ndarray]:
    """The engine's cutting rule (models/_perturb_engine.py: at most ``batch_size``, cut below ``min_fill``)."""
    out, pos = [], 0
    while pos < len(lengths_desc):
        window = lengths_desc[pos : pos + batch_size]
        n = max(1, int(np.count_nonzero(window >= min_fill * window[0]))) if len(window) > 1 else 1
        out.append(lengths_desc[pos : pos + n])
        pos += n
    return out


def section_fill(adata, tokens, model, gene, threads, rounds, fills, timed: bool) -> None:
    import sc_dta.models._perturb_engine as engine

    cfg = model.config
    d = cfg.hidden_size
    n_run = resolve_emb_layer(model, -1)
    lengths = np.array([len(c) for c in tokens.input_ids])
    token = tokens.vocab.token_id(gene)
    has = np.array([token in c for c in tokens.input_ids])
    L = np.sort(lengths[has])[::-1].astype(np.float64)
    useful = forward_flops(L, cfg, n_run).sum()
    rows, fns = [], {}
    bs = dta.settings.batch_size_cells
    for fill in fills:
        batches = _engine_batches(L, bs, fill)
        padded_old = sum(forward_flops(b[0], cfg, n_run) * len(b) for b in batches)
        padded_new = 0.0
        for b in batches:
            attention = n_run * 4 * d * b**2
            saving = 1 - float((b**2).sum()) / (len(b) * b[0] ** 2)
            per_sequence = len(b) > 1 and saving >= _forward.PER_SEQUENCE_MIN_SAVING
            padded_new += (forward_flops(b[0], cfg, n_run) - n_run * 4 * d * b[0] ** 2) * len(b)
            padded_new += attention.sum() if per_sequence else n_run * 4 * d * b[0] ** 2 * len(b)
        rows.append([fill, len(batches), f"{len(L) / len(batches):.1f}", f"{padded_old / useful - 1:.1%}",
                     f"{padded_new / useful - 1:.1%}"])  # fmt: skip

        def run(fill=fill):
            old = dict(engine.MIN_FILL)
            engine.MIN_FILL.update({"cpu": fill, "default": fill})
            try:
                return _perturb(adata, tokens, model, gene, "delete", has)
            finally:
                engine.MIN_FILL.clear()
                engine.MIN_FILL.update(old)

        fns[f"{fill}"] = run
    header = ["MIN_FILL", "batches", "cells/batch", "padded FLOPs (old)", "padded FLOPs (new)"]
    if timed:
        best = interleaved(fns, rounds)
        for r, b in zip(rows, best.values(), strict=True):
            r += [f"{b['wall']:.1f}", f"{b['cpu'] / len(L) * 1e3:.0f}", f"{best[str(fills[0])]['cpu'] / b['cpu']:.2f}x"]
        header += ["wall s", "CPU ms/cell", f"CPU vs {fills[0]}"]
    table(
        f"batch fill: the engine's batches (batch {bs}) of the {len(L)} cells by MIN_FILL"
        + (f"; perturb_gene (delete, new forward), best of {rounds}; {load()}" if timed else " (--fill-time: timed)"),
        header,
        rows,
    )
    print(
        "padded FLOPs: extra arithmetic over the unpadded cells; old: padding computed everywhere (one masked attention"
        " call); new: batches whose padding is >= PER_SEQUENCE_MIN_SAVING of the attention work attend sequence by"
        " sequence, so only projections and FFN see their padding."
    )


def section_profile(model: Any, cells: list[np.ndarray], threads: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    order = np.argsort([len(c) for c in cells], kind="stable")
    mid = len(order) // 2
    group = [cells[i] for i in order[mid - 2 : mid + 2]][::-1]
    ((ids, mask),) = _batches(group, 4)
    groups = {
        "matmul (addmm/mm/bmm)": ("addmm", "aten::mm", "bmm", "matmul"),
        "attention (SDPA/softmax)": ("attention", "softmax"),
        "elementwise (add, layer_norm, relu, mask)": ("add", "layer_norm", "clamp", "relu", "gelu", "masked_fill"),
        "copies (copy_, cat, contiguous, zeros)": ("copy_", "cat", "contiguous", "zero_", "fill_"),
        "embedding": ("embedding", "index_select"),
    }
    with torch.inference_mode():
        for name, fn in FORWARDS.items():
            for _ in range(2):
                fn(model, ids, mask)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn(model, ids, mask)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            rows = [
                [e.key, e.count // 3, f"{e.self_cpu_time_total / 3e3:.1f}", f"{e.self_cpu_time_total / total:.1%}"]
                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
            ]
            table(
                f"profile, {name} forward: 4 cells of {ids.shape[1]} tokens (padding {1 - mask.float().mean():.1%}), "
                f"per forward, top {top} by self CPU time (total {total / 3e3:.0f} ms; {load()})",
                ["op", "calls", "self CPU ms", "share"],
                rows,
            )
            agg = dict.fromkeys(groups, 0.0)
            other = 0.0
            for e in events:
                for g, keys in groups.items():
                    if any(k in e.key for k in keys):
                        agg[g] += e.self_cpu_time_total
                        break
                else:
                    other += e.self_cpu_time_total
            print("  by kind: " + "; ".join(f"{g} {v / total:.0%}" for g, v in [*agg.items(), ("other", other)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=Path, required=True, help="celltypist's sample_cell_by_gene.csv (see above)")
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--gene", default=None, help="perturbed gene (default: the gene in most cells)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best is kept)")
    p.add_argument("--slices", type=int, default=4, help="perturb: old/new alternate on this many slices of cells")
    p.add_argument("--ref-cells", type=int, default=16, help="perturb: cells for Geneformer's work (0: skip)")
    p.add_argument("--kinds", nargs="+", default=["delete", "overexpress"], choices=["delete", "overexpress"])
    p.add_argument("--fills", nargs="+", type=float, default=[0.97, 0.9, 0.0])
    p.add_argument("--fill-time", action="store_true", help="fill: also time perturb_gene at each MIN_FILL (slow)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dta.settings.progress = False
    adata, tokens, vocab = load_cells(args.counts, args.cells)
    model = make_model(vocab)
    cells = [np.asarray(c, dtype=np.int64) for c in tokens.input_ids]
    lengths = np.array([len(c) for c in cells])
    gene = args.gene
    if gene is None:
        counts = np.bincount(np.concatenate(cells), minlength=len(vocab))
        counts[list(vocab.special_ids)] = 0
        gene = vocab.id_to_token[int(np.argmax(counts))]
    print(
        f"{len(cells)} cells, {lengths.min()}-{lengths.max()} tokens (median {int(np.median(lengths))}, "
        f"{(lengths == vocab.max_length).sum()} at the {vocab.max_length} cap); V1-10M config, attention "
        f"{model.config._attn_implementation}; torch {torch.__version__}, {torch.get_num_threads()} threads; {load()}"
    )
    n_run = resolve_emb_layer(model, -1)
    rates: dict[str, float] = {}
    if "matmul" in args.sections:
        rates = section_matmul(lengths, model.config, args.threads, args.rounds * 3)
    if "flops" in args.sections:
        section_flops(lengths, model.config, n_run)
    if "forward" in args.sections:
        section_forward(model, cells, args.threads, args.rounds, rates)
    if "profile" in args.sections:
        section_profile(model, cells, args.threads, top=12)
    if "perturb" in args.sections:
        section_perturb(adata, tokens, model, gene, args.threads, args.rounds, args.slices, args.ref_cells, args.kinds)
    if "fill" in args.sections:
        section_fill(adata, tokens, model, gene, args.threads, args.rounds, args.fills, args.fill_time)


if __name__ == "__main__":
    main()
