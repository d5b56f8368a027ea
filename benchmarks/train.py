"""Benchmark adapter training: tokens/s of a training step for a Geneformer-V1-10M-sized BioDTA.

Random weights with the real Geneformer-V1-10M configuration (6 layers, 256 d, 4 heads, 2,048
positions, 25,426 tokens), the real V1 vocabulary, an Enformer-sized adapter input (3,072 dims, DNA
embeddings for every gene token) and full 2,048-token cells. One step = masking (15%, 80/10/10),
forward, backward, gradient clipping and an AdamW update, as in :func:`sc_dta.tl.train_adapter`.

Variants:

* ``adapter``: frozen backbone, adapter trained (the default of ``train_adapter``);
* ``full``: backbone and adapter trained (``freeze_backbone=False``);
* ``full, all-position logits``: the same through ``BertForMaskedLM(labels=...)``, which projects every
  position onto the 25,426-token vocabulary, instead of only the masked ones (what sc_dta does).

On the CPU in float32; on CUDA (when available) in float32 and under bf16 autocast.

Measured on the shared 2-core CPU (float32, batch 2 x 2,048 tokens, load average ~2): adapter 1,956
tokens/s, full 792 tokens/s, full with all-position logits 645 tokens/s (with load average ~8 from other
jobs: 259 / 172 / 108).

Usage: ``python benchmarks/train.py [--batch 2] [--steps 3] [--cuda-batch 16] [--cuda-steps 20]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

import sc_dta as dta
from sc_dta.models import BioDTA, GeneformerVocab
from sc_dta.tl._trainer import Masker as _Masker

DATA = Path(os.environ.get("SC_DTA_GENEFORMER_DATA", Path(__file__).resolve().parents[2] / "shared/data/geneformer"))
D_DNA = 3072
SEQ = 2048


def build(vocab: GeneformerVocab, device: torch.device) -> BioDTA:
    config = BertConfig(**json.loads((DATA / "Geneformer-V1-10M_config.json").read_text()))
    config.output_hidden_states = True
    torch.manual_seed(0)
    backbone = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    model = BioDTA(backbone, vocab, d_dna=D_DNA)
    genes = np.setdiff1d(np.arange(len(vocab)), vocab.special_ids)
    rng = np.random.default_rng(0)
    model.set_dna_embeddings(genes, rng.normal(size=(genes.size, D_DNA)).astype(np.float32))
    return model.to(device)


def cells(vocab: GeneformerVocab, n: int, rng: np.random.Generator) -> np.ndarray:
    genes = np.setdiff1d(np.arange(len(vocab)), vocab.special_ids)
    return np.stack([rng.choice(genes, SEQ, replace=False) for _ in range(n)])


def run(model: BioDTA, vocab: GeneformerVocab, *, device, batch, steps, freeze, full_logits, bf16) -> dict:
    model.freeze_backbone(freeze)
    model.train()
    if freeze:
        model.backbone.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    special = np.asarray(vocab.special_ids)
    masker = _Masker(
        special, vocab.pad_id, vocab.mask_id, torch.as_tensor(np.setdiff1d(np.arange(len(vocab)), special)), 0.15
    )
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    data = [cells(vocab, batch, rng) for _ in range(steps + 1)]
    ctx = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if bf16
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    def step(ids_np):
        inputs, labels, attn = (t.to(device) for t in masker(ids_np, gen))
        with ctx():
            if full_logits:
                loss = model(inputs, attn, labels=labels).loss
            else:
                loss = model.masked_lm_loss(inputs, labels, attn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(data[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for ids in data[1:]:
        loss = step(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out = {"tokens_per_s": batch * SEQ * steps / elapsed, "s_per_step": elapsed / steps, "loss": loss}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    model.freeze_backbone(False)
    return out


def report(label: str, r: dict) -> None:
    extra = f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
    print(f"  {label:<38} {r['tokens_per_s']:>10,.0f} tokens/s  ({r['s_per_step']:.2f} s/step{extra})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="cells per step on the CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed steps on the CPU")
    parser.add_argument("--cuda-batch", type=int, default=16)
    parser.add_argument("--cuda-steps", type=int, default=20)
    parser.add_argument("--no-cpu", action="store_true")
    args = parser.parse_args()
    dta.settings.progress = False
    vocab = GeneformerVocab.load(DATA, version="V1")
    print(f"Geneformer-V1-10M-sized BioDTA, {SEQ} tokens per cell, d_dna={D_DNA}, torch {torch.__version__}")

    if not args.no_cpu:
        cpu = torch.device("cpu")
        print(f"CPU ({torch.get_num_threads()} threads), batch {args.batch}, {args.steps} steps, float32:")
        model = build(vocab, cpu)
        for label, freeze, full in [
            ("adapter (frozen backbone)", True, False),
            ("full (backbone + adapter)", False, False),
            ("full, all-position logits", False, True),
        ]:
            report(
                label,
                run(
                    model,
                    vocab,
                    device=cpu,
                    batch=args.batch,
                    steps=args.steps,
                    freeze=freeze,
                    full_logits=full,
                    bf16=False,
                ),
            )
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"CUDA ({torch.cuda.get_device_name()}), batch {args.cuda_batch}, {args.cuda_steps} steps:")
        model = build(vocab, gpu)
        for label, freeze, full, bf16 in [
            ("adapter, fp32", True, False, False),
            ("adapter, bf16 autocast", True, False, True),
            ("full, fp32", False, False, False),
            ("full, bf16 autocast", False, False, True),
            ("full, all-position logits, bf16", False, True, True),
        ]:
            r = run(
                model,
                vocab,
                device=gpu,
                batch=args.cuda_batch,
                steps=args.cuda_steps,
                freeze=freeze,
                full_logits=full,
                bf16=bf16,
            )
            report(label, r)
    else:
        print("CUDA: not available on this machine.")


if __name__ == "__main__":
    main()
