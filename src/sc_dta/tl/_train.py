"""``tl.train_adapter``: continued masked-gene pretraining of a BioDTA (adapter, optionally backbone)."""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sc_dta._settings import settings
from sc_dta._utils import autocast, get_anndata, progress, resolve_device

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData
    from transformers import BertForMaskedLM

    from sc_dta.models.biodta import BioDTA

logger = logging.getLogger(__name__)

_CHECKPOINT_DIR = "checkpoint"
_MODEL_DIR = "model"
_STATE_FILE = "trainer_state.pt"
_MEGA_BATCH = 50  # batches per length-sorted group of the sampler (as in transformers' LengthGroupedSampler)
# run settings a resumed run must share with the interrupted one
_RESUME_KEYS = (
    "seed",
    "epochs",
    "batch_size",
    "accumulation_steps",
    "lr",
    "mask_prob",
    "freeze_backbone",
    "weight_decay",
    "warmup_ratio",
    "n_train_cells",
    "n_val_cells",
)


def train_adapter(
    adata: AnnData | MuData,
    model: BioDTA | BertForMaskedLM,
    *,
    dna_key: str = "dna_emb",
    epochs: int = 1,
    batch_size: int | None = None,
    lr: float = 1e-3,
    mask_prob: float = 0.15,
    freeze_backbone: bool = True,
    val_fraction: float = 0.05,
    output_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    accumulation_steps: int = 1,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.05,
    max_grad_norm: float | None = 1.0,
    layer: str | None = None,
    gene_id_key: str | None = None,
    max_length: int | None = None,
    mode: Literal["replace", "add"] = "replace",
    adapter_layers: int = 2,
    adapter_hidden: int | None = None,
    adapter_dropout: float = 0.1,
    key_added: str = "train_adapter",
    mod: str = "rna",
    _stop_after_steps: int | None = None,
) -> BioDTA:
    """Train the DNA adapter of a BioDTA with Geneformer's masked-gene objective.

    Cells are tokenized for the model (:func:`sc_dta.pp.tokenize`), genes with a DNA embedding in
    ``adata.varm[dna_key]`` take their input embedding from the adapter, and the model learns to predict
    masked genes from the rest of each cell: 15% of the gene tokens (never ``<pad>``, ``<cls>``,
    ``<eos>``; at least one per cell) are chosen, 80% of them replaced by ``<mask>``, 10% by a random
    gene token and 10% left unchanged, as in BERT / Geneformer pretraining. AdamW with linear warm-up
    and linear decay, gradient accumulation, batches grouped by length, a validation loss after every
    epoch, and (with ``output_dir``) a checkpoint after every epoch and when interrupted (Ctrl-C).

    Parameters
    ----------
    adata
        Raw counts (``X`` or ``layer``) with DNA embeddings in ``varm[dna_key]`` (e.g. from
        :func:`sc_dta.tl.embed_dna`; NaN rows = genes without a DNA embedding).
    model
        A :class:`~sc_dta.models.BioDTA` (trained further, in place), or a Geneformer ``BertForMaskedLM``
        (e.g. from :func:`~sc_dta.models.load_geneformer`) which is wrapped into a new BioDTA with an
        adapter sized from ``varm[dna_key]``.
    dna_key
        Key of the DNA embeddings in ``adata.varm``.
    epochs
        Passes over the training cells.
    batch_size
        Cells per micro-batch; default ``dta.settings.batch_size_cells``.
    lr
        Peak learning rate.
    mask_prob
        Fraction of gene tokens to predict.
    freeze_backbone
        Train the adapter only (default). ``False`` trains backbone and adapter together, e.g. a small
        model from :meth:`BioDTA.from_config <sc_dta.models.BioDTA.from_config>` from scratch.
    val_fraction
        Fraction of cells held out for the validation loss (0 = none).
    output_dir
        Folder for checkpoints (``checkpoint/``, rewritten every epoch and on interruption) and the final
        model (``model/``, :meth:`BioDTA.save_pretrained <sc_dta.models.BioDTA.save_pretrained>`).
    resume
        Continue from the checkpoint in ``output_dir``: weights, optimiser, scheduler, random states and
        step are restored, so the result equals an uninterrupted run with the same arguments.
    seed
        Seed of the adapter initialisation, the validation split, batch order, masking and dropout. The
        caller's global random states are left as they were.
    device
        Torch device; default ``dta.settings.device``. bf16 autocast on CUDA.
    accumulation_steps
        Micro-batches per optimiser step (gradients averaged over all masked genes of the step).
    weight_decay
        AdamW weight decay (not applied to biases and LayerNorm weights).
    warmup_ratio
        Fraction of the optimiser steps with a linear warm-up.
    max_grad_norm
        Gradient clipping norm (None = no clipping).
    layer, gene_id_key, max_length
        Passed to :func:`sc_dta.pp.tokenize`.
    mode, adapter_layers, adapter_hidden, adapter_dropout
        Adapter settings when ``model`` is a plain backbone (see :class:`~sc_dta.models.BioDTA`).
    key_added
        Key in ``adata.uns`` for the parameters and loss history.
    mod
        Modality of a MuData.

    Returns
    -------
    The trained :class:`~sc_dta.models.BioDTA` in eval mode, its ``loss_history`` extended, and writes
    ``adata.uns[key_added]``: ``params``, ``step``, ``loss``, ``lr`` (per optimiser step), ``val_epoch``,
    ``val_loss``.
    """
    import torch

    from sc_dta.models.biodta import BioDTA
    from sc_dta.models.cell import model_vocab

    adata = get_anndata(adata, mod)
    _check_args(epochs, batch_size, lr, mask_prob, val_fraction, accumulation_steps, warmup_ratio, resume, output_dir)
    batch_size = settings.batch_size_cells if batch_size is None else batch_size
    is_biodta = isinstance(model, BioDTA)
    if not is_biodta and not hasattr(model, "bert"):
        raise TypeError(f"model must be a BioDTA or a Geneformer BertForMaskedLM, got {type(model).__name__}.")
    backbone = model.backbone if is_biodta else model

    # ---- inputs: DNA embeddings, tokens (everything checked before the model or adata is touched)
    dna, dna_valid = _dna_embeddings(adata, dna_key, model.d_dna if is_biodta else None)
    vocab = model_vocab(model)
    max_pos = int(backbone.config.max_position_embeddings)
    from sc_dta.pp._tokenize import tokenize

    tokens = tokenize(
        adata,
        vocab=vocab,
        layer=layer,
        gene_id_key=gene_id_key,
        max_length=min(max_length or vocab.max_length, max_pos),
    )
    var_tokens = np.asarray(tokens.var_token_ids, dtype=np.int64)
    if not (var_tokens >= 0).any():
        raise ValueError(
            f"No gene of adata.var_names (e.g. {list(adata.var_names[:3])}) is in the model's {vocab.version} "
            "vocabulary: check gene_id_key= (Ensembl IDs or symbols are expected)."
        )
    with_dna = (var_tokens >= 0) & dna_valid
    if not with_dna.any():
        raise ValueError(
            f"None of the {int((var_tokens >= 0).sum())} genes in the vocabulary has a DNA embedding in "
            f"adata.varm[{dna_key!r}]."
        )
    dna_token_ids, first = np.unique(var_tokens[with_dna], return_index=True)
    dna_rows = dna[np.flatnonzero(with_dna)[first]]
    logger.info(
        "%d of %d genes in the vocabulary have a DNA embedding (%d tokens).",
        int(with_dna.sum()),
        int((var_tokens >= 0).sum()),
        dna_token_ids.size,
    )
    special = np.asarray(sorted(int(i) for i in vocab.special_ids), dtype=np.int64)
    seqs = [np.asarray(s, dtype=np.int64) for s in tokens.input_ids]
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    flat = np.concatenate(seqs) if seqs else np.empty(0, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(~np.isin(flat, special))])
    ends = np.cumsum(lengths)
    n_genes = cum[ends] - cum[ends - lengths]  # gene (non-special) tokens per cell
    usable = np.flatnonzero(n_genes > 0)
    if usable.size == 0:
        raise ValueError("No cell has counts for a gene in the vocabulary: nothing to train on.")
    if usable.size < len(seqs):
        logger.info("%d cells without genes in the vocabulary are skipped.", len(seqs) - usable.size)
    split_rng = np.random.default_rng([seed, 1])
    order = split_rng.permutation(usable)
    n_val = int(round(val_fraction * order.size)) if val_fraction > 0 else 0
    if val_fraction > 0 and order.size >= 2:
        n_val = min(max(n_val, 1), order.size - 1)
    val_cells, train_cells = np.sort(order[:n_val]), order[n_val:]

    dev = resolve_device(device)
    out = Path(output_dir).expanduser() if output_dir is not None else None
    ckpt = out / _CHECKPOINT_DIR if out is not None else None
    state = None
    if resume:
        if ckpt is not None and (ckpt / _STATE_FILE).exists():
            state = torch.load(ckpt / _STATE_FILE, map_location="cpu", weights_only=True)
        else:
            logger.warning("resume=True but %s holds no checkpoint: training from the start.", ckpt)

    n_batches = math.ceil(train_cells.size / batch_size)
    steps_per_epoch = math.ceil(n_batches / accumulation_steps)
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(warmup_ratio * total_steps)
    run = {
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "accumulation_steps": int(accumulation_steps),
        "lr": float(lr),
        "mask_prob": float(mask_prob),
        "freeze_backbone": bool(freeze_backbone),
        "weight_decay": float(weight_decay),
        "warmup_ratio": float(warmup_ratio),
        "n_train_cells": int(train_cells.size),
        "n_val_cells": int(val_cells.size),
    }
    if state is not None:
        diff = {k: (state["run"].get(k), run[k]) for k in _RESUME_KEYS if state["run"].get(k) != run[k]}
        if diff:
            raise ValueError(
                f"resume=True: the checkpoint in {ckpt} was written by a run with other settings "
                f"(checkpoint, now): {diff}."
            )

    cuda_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        if is_biodta:
            bio = model
        else:
            bio = BioDTA(
                model,
                vocab,
                d_dna=dna.shape[1],
                mode=mode,
                adapter_layers=adapter_layers,
                adapter_hidden=adapter_hidden,
                adapter_dropout=adapter_dropout,
            )
        info = _encoder_info(adata, dna_key)
        if not bio.dna_encoder_info:
            bio.dna_encoder_info = info
        elif info.get("name") not in (None, bio.dna_encoder_info.get("name")):
            logger.warning(
                "adata.uns[%r] names the DNA encoder %r, the model was trained with %r.",
                dna_key,
                info.get("name"),
                bio.dna_encoder_info.get("name"),
            )
        bio.set_dna_embeddings(dna_token_ids, dna_rows)
        bio.to(dev)
        grad_flags = [(p, p.requires_grad) for p in bio.parameters()]  # restored afterwards
        bio.freeze_backbone(freeze_backbone)
        if not freeze_backbone:
            bio.backbone_trained = True
        params = [p for p in bio.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup_decay(warmup_steps, total_steps))
        mask_gen = torch.Generator().manual_seed(seed)
        gene_ids = torch.as_tensor(np.setdiff1d(np.arange(len(vocab)), special))
        masker = _Masker(special, int(vocab.pad_id), int(vocab.mask_id), gene_ids, mask_prob)
        val_batches = _validation_batches(seqs, lengths, val_cells, batch_size, masker, seed)

        step, start_epoch, start_group = 0, 0, 0
        history: list[dict[str, Any]] = []
        if state is not None:
            _load_checkpoint_weights(bio, ckpt / _MODEL_DIR)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], mask_gen, cuda_devices)
            step, start_epoch, start_group = int(state["step"]), int(state["epoch"]), int(state["group"])
            history = list(state["history"])
            logger.info("Resuming from %s at epoch %d, step %d.", ckpt, start_epoch, step)
        prior_history = list(bio.loss_history) if state is None else []
        if state is not None:
            prior_history = list(state.get("prior_history", []))

        def save_checkpoint(epoch: int, group: int, rng: dict) -> None:
            if ckpt is None:
                return
            tmp = ckpt.with_name(_CHECKPOINT_DIR + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            bio.loss_history = prior_history + history
            bio.save_pretrained(tmp / _MODEL_DIR)
            payload = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "step": step,
                "epoch": epoch,
                "group": group,
                "history": history,
                "prior_history": prior_history,
                "run": run,
            }
            torch.save(payload, tmp / _STATE_FILE)
            if ckpt.exists():
                shutil.rmtree(ckpt)
            tmp.rename(ckpt)
            logger.info("Checkpoint written to %s (epoch %d, step %d).", ckpt, epoch, step)

        bar = progress(total=total_steps, initial=step, desc="train_adapter", unit="step")
        running = None
        t0, n_tokens = time.perf_counter(), 0
        try:
            for epoch in range(start_epoch, epochs):
                batches = _length_grouped_batches(
                    train_cells, lengths, batch_size, np.random.default_rng([seed, 2, epoch])
                )
                groups = [batches[i : i + accumulation_steps] for i in range(0, len(batches), accumulation_steps)]
                first_group = start_group if epoch == start_epoch else 0
                _train_mode(bio, freeze_backbone)
                for g in range(first_group, len(groups)):
                    rng_before = _get_rng_state(mask_gen, cuda_devices)
                    done = False
                    try:
                        micro = [masker(_pad(seqs, b, masker.pad_id), mask_gen) for b in groups[g]]
                        n_masked = sum(int((lab != -100).sum()) for _, lab, _ in micro)
                        loss_total = 0.0
                        for inputs, labels, attn in micro:
                            inputs, labels, attn = inputs.to(dev), labels.to(dev), attn.to(dev)
                            with autocast(dev):
                                loss = bio.masked_lm_loss(inputs, labels, attn, reduction="sum")
                            (loss / n_masked).backward()
                            loss_total += float(loss.detach())
                            n_tokens += int(attn.sum())
                        if max_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                        lr_now = scheduler.get_last_lr()[0]
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        mean_loss = loss_total / n_masked
                        history.append({"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr_now})
                        done = True
                        running = mean_loss if running is None else 0.98 * running + 0.02 * mean_loss
                        bar.update(1)
                        bar.set_postfix(loss=f"{running:.4f}", epoch=epoch)
                        if _stop_after_steps is not None and step >= _stop_after_steps:
                            raise KeyboardInterrupt(f"stopped after {step} steps (_stop_after_steps)")
                    except KeyboardInterrupt:
                        optimizer.zero_grad(set_to_none=True)
                        if done:
                            save_checkpoint(epoch, g + 1, _get_rng_state(mask_gen, cuda_devices))
                        else:
                            save_checkpoint(epoch, g, rng_before)
                        if ckpt is not None:
                            logger.warning(
                                "Interrupted at step %d: resume with resume=True, output_dir=%r.", step, str(out)
                            )
                        raise
                if val_batches:
                    val_loss = _validate(bio, val_batches, dev)
                    history.append({"epoch": epoch, "step": step, "val_loss": val_loss})
                    logger.info("Epoch %d: validation loss %.4f.", epoch, val_loss)
                    bar.set_postfix(
                        loss=f"{running if running is not None else float('nan'):.4f}", val=f"{val_loss:.4f}"
                    )
                start_group = 0
                save_checkpoint(epoch + 1, 0, _get_rng_state(mask_gen, cuda_devices))
        finally:
            bar.close()
            bio.eval()
            for p, flag in grad_flags:
                p.requires_grad_(flag)
        elapsed = time.perf_counter() - t0
        if n_tokens:
            logger.info("Trained on %d tokens in %.1f s (%.0f tokens/s).", n_tokens, elapsed, n_tokens / elapsed)

    bio.loss_history = prior_history + history
    if out is not None:
        bio.save_pretrained(out / _MODEL_DIR)
    train_records = [h for h in history if "loss" in h]
    val_records = [h for h in history if "val_loss" in h]
    params_out = {
        **run,
        "dna_key": dna_key,
        "val_fraction": float(val_fraction),
        "mode": bio.mode,
        "n_dna_tokens": int(dna_token_ids.size),
        "device": str(dev),
    }
    if out is not None:
        params_out["output_dir"] = str(out)
    adata.uns[key_added] = {
        "params": params_out,
        "step": np.array([h["step"] for h in train_records], dtype=np.int64),
        "loss": np.array([h["loss"] for h in train_records], dtype=np.float64),
        "lr": np.array([h["lr"] for h in train_records], dtype=np.float64),
        "val_epoch": np.array([h["epoch"] for h in val_records], dtype=np.int64),
        "val_loss": np.array([h["val_loss"] for h in val_records], dtype=np.float64),
    }
    return bio


# ---------------------------------------------------------------------- checks and inputs
def _check_args(
    epochs: int,
    batch_size: int | None,
    lr: float,
    mask_prob: float,
    val_fraction: float,
    accumulation_steps: int,
    warmup_ratio: float,
    resume: bool,
    output_dir: str | Path | None,
) -> None:
    for name, value in (("epochs", epochs), ("accumulation_steps", accumulation_steps)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob!r}.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}.")
    if resume and output_dir is None:
        raise ValueError("resume=True needs output_dir= (the folder holding the checkpoint).")


def _dna_embeddings(adata: AnnData, dna_key: str, d_dna: int | None) -> tuple[np.ndarray, np.ndarray]:
    if dna_key not in adata.varm:
        raise KeyError(
            f"dna_key={dna_key!r} is not in adata.varm (keys: {list(adata.varm.keys())}); "
            "compute DNA embeddings with dta.tl.embed_dna first."
        )
    value = adata.varm[dna_key]
    arr = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
    if arr.ndim != 2 or arr.shape[0] != adata.n_vars or arr.shape[1] < 1:
        raise ValueError(f"adata.varm[{dna_key!r}] must have shape (n_vars, d_dna), got {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"adata.varm[{dna_key!r}] must be a real numeric array, got dtype {arr.dtype}.")
    arr = arr.astype(np.float32, copy=False)
    if np.isinf(arr).any():
        n_inf = int(np.isinf(arr).any(axis=1).sum())
        raise ValueError(f"adata.varm[{dna_key!r}] has infinite values in {n_inf} rows.")
    valid = ~np.isnan(arr).any(axis=1)
    if not valid.any():
        raise ValueError(f"adata.varm[{dna_key!r}] is NaN for every gene: no gene has a DNA embedding.")
    if d_dna is not None and arr.shape[1] != d_dna:
        raise ValueError(
            f"adata.varm[{dna_key!r}] has {arr.shape[1]} dimensions but the model's adapter expects d_dna={d_dna}."
        )
    return arr, valid


def _encoder_info(adata: AnnData, dna_key: str) -> dict[str, Any]:
    info = adata.uns.get(dna_key)
    if not isinstance(info, dict):
        return {}
    params = info.get("params", info)
    if not isinstance(params, dict):
        return {}
    out: dict[str, Any] = {}
    if "encoder" in params:
        out["name"] = str(params["encoder"])  # embed_dna's "encoder" is the encoder's name
    for k, v in params.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, str | int | float | bool):
            out[str(k)] = v
    return out


# ---------------------------------------------------------------------- batching and masking
def _length_grouped_batches(
    cells: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle, sort by length (longest first) within mega-batches, cut into batches; longest batch first."""
    perm = rng.permutation(cells)
    mega = batch_size * _MEGA_BATCH
    batches: list[np.ndarray] = []
    for start in range(0, perm.size, mega):
        chunk = perm[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, chunk.size, batch_size)]
    if batches:
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def _pad(seqs: Sequence[np.ndarray], cells: np.ndarray, pad_id: int) -> np.ndarray:
    width = max(seqs[c].size for c in cells)
    out = np.full((cells.size, width), pad_id, dtype=np.int64)
    for row, c in enumerate(cells):
        out[row, : seqs[c].size] = seqs[c]
    return out


class _Masker:
    """BERT masking of gene tokens: choose ``mask_prob`` of them (at least one per cell), 80/10/10."""

    def __init__(self, special: np.ndarray, pad_id: int, mask_id: int, gene_ids: torch.Tensor, mask_prob: float):
        import torch

        self.special = torch.as_tensor(np.union1d(special, [pad_id]))
        self.pad_id, self.mask_id, self.gene_ids, self.mask_prob = pad_id, mask_id, gene_ids, mask_prob

    def __call__(self, batch: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        ids = torch.from_numpy(batch)
        attn = (ids != self.pad_id).long()
        maskable = ~torch.isin(ids, self.special)
        chosen = (torch.rand(ids.shape, generator=gen) < self.mask_prob) & maskable
        # every cell predicts at least one gene
        missing = ~chosen.any(dim=1) & maskable.any(dim=1)
        pick = torch.rand(ids.shape, generator=gen).masked_fill(~maskable, -1.0).argmax(dim=1)
        chosen[missing, pick[missing]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        action = torch.rand(ids.shape, generator=gen)
        to_mask = chosen & (action < 0.8)
        to_random = chosen & (action >= 0.8) & (action < 0.9)
        inputs = ids.clone()
        inputs[to_mask] = self.mask_id
        random_ids = self.gene_ids[torch.randint(len(self.gene_ids), ids.shape, generator=gen)]
        inputs[to_random] = random_ids[to_random]
        return inputs, labels, attn


def _validation_batches(
    seqs: Sequence[np.ndarray], lengths: np.ndarray, cells: np.ndarray, batch_size: int, masker: _Masker, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mask the validation cells once (own generator: the same every epoch, training RNG untouched)."""
    import torch

    if cells.size == 0:
        return []
    gen = torch.Generator().manual_seed(seed + 1)
    ordered = cells[np.argsort(-lengths[cells], kind="stable")]
    return [
        masker(_pad(seqs, ordered[i : i + batch_size], masker.pad_id), gen) for i in range(0, ordered.size, batch_size)
    ]


def _validate(bio: BioDTA, batches: list, dev: torch.device) -> float:
    import torch

    was_training = {m: m.training for m in (bio.adapter, bio.backbone)}
    bio.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for inputs, labels, attn in batches:
            with autocast(dev):
                loss = bio.masked_lm_loss(inputs.to(dev), labels.to(dev), attn.to(dev), reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    for m, flag in was_training.items():
        m.train(flag)
    return total / max(count, 1)


def _train_mode(bio: BioDTA, freeze_backbone: bool) -> None:
    bio.train()
    if freeze_backbone:
        bio.backbone.eval()  # a frozen backbone runs as at inference (no dropout)
    bio.adapter.train()


def _linear_warmup_decay(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


# ---------------------------------------------------------------------- checkpoints
def _get_rng_state(mask_gen: torch.Generator, cuda_devices: list) -> dict:
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(d) for d in cuda_devices],
        "mask": mask_gen.get_state(),
    }


def _set_rng_state(state: dict, mask_gen: torch.Generator, cuda_devices: list) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    for d, s in zip(cuda_devices, state.get("cuda", []), strict=False):
        torch.cuda.set_rng_state(s, d)
    mask_gen.set_state(state["mask"])


def _load_checkpoint_weights(bio: BioDTA, folder: Path) -> None:
    """Load adapter, DNA table and (when saved) backbone weights of a checkpoint into ``bio``, in place."""
    from safetensors.torch import load_file

    from sc_dta.models.biodta import _BACKBONE_DIR, _WEIGHTS_FILE

    bio._load_adapter_tensors(load_file(str(folder / _WEIGHTS_FILE)))
    backbone_dir = folder / _BACKBONE_DIR
    if backbone_dir.exists():
        files = sorted(backbone_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"No backbone weights (*.safetensors) in {backbone_dir}.")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = bio.backbone.load_state_dict(state, strict=False)
        tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
        if unexpected or set(missing) - tied:
            raise ValueError(
                f"Checkpoint backbone in {backbone_dir} does not match the model: missing {missing}, unexpected {unexpected}."
            )
    bio.to(bio.backbone.device)
