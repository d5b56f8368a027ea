"""In-silico perturbation on AnnData: :func:`perturb_gene` (Geneformer baseline) and :func:`perturb_tss` (Bio-DTA)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from sc_dta._chunks import cells_mask
from sc_dta._utils import get_anndata
from sc_dta.models._perturb_engine import KINDS, PerturbSpec, ShiftResult, run_perturbations

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from mudata import MuData
    from torch import nn

    from sc_dta.genome import Genome
    from sc_dta.models.dna import DNAEncoder

logger = logging.getLogger(__name__)

__all__ = ["perturb_gene", "perturb_tss"]

#: Suffixes of the slots written for one result key.
OBS_SUFFIXES = ("_cell", "_cell_emb", "_evaluated")
VAR_SUFFIXES = ("_mean", "_n", "_pval", "_specificity")


# --------------------------------------------------------------------------------------------- helpers


def _vocab_of(model: nn.Module, tokens: Any) -> Any:
    """Vocabulary of ``tokens`` when given, else of the model."""
    if tokens is not None and getattr(tokens, "vocab", None) is not None:
        return tokens.vocab
    try:
        from sc_dta.models.cell import model_vocab

        return model_vocab(model)
    except Exception as e:  # fall back to a vocabulary attached to the model
        vocab = getattr(model, "vocab", None)
        if vocab is not None:
            return vocab
        raise ValueError(
            "model: no Geneformer vocabulary is attached to this model; load it with "
            "sc_dta.models.load_geneformer(..., vocab=...) or pass tokens=sc_dta.pp.tokenize(adata, ...)."
        ) from e


def _tokenize(
    adata: AnnData, model: nn.Module, tokens: Any, layer: str | None = None, mask: np.ndarray | None = None
) -> Any:
    """``tokens`` checked against ``adata``, or the cells of ``mask`` (default all) tokenized with the model's vocabulary.

    Only the selected cells are read (chunk by chunk, so a backed ``adata`` is streamed) and tokenized.
    """
    if tokens is not None:
        for attr in ("input_ids", "obs_names", "var_token_ids", "token_to_var"):
            if not hasattr(tokens, attr):
                raise TypeError(
                    f"tokens: expected a TokenizedCells from sc_dta.pp.tokenize, got {type(tokens).__name__} "
                    f"(no {attr!r})."
                )
        if len(tokens.var_token_ids) != adata.n_vars:
            raise ValueError(
                f"tokens: were computed for {len(tokens.var_token_ids)} genes but adata has {adata.n_vars}; "
                "tokenize this AnnData again."
            )
        return tokens
    from sc_dta.pp import tokenize

    vocab = _vocab_of(model, None)
    n_pos = _max_positions(model)
    max_length = min(int(vocab.max_length), n_pos) if n_pos else None
    cells = None if mask is None or mask.all() else mask
    return tokenize(adata, vocab=vocab, max_length=max_length, layer=layer, cells=cells)  # never modifies adata


def _as_model(model: Any, device: Any = None) -> nn.Module:
    """Return ``model``, or load it from a path: a saved BioDTA folder, else a Geneformer name or folder."""
    import os
    from pathlib import Path

    if not isinstance(model, str | os.PathLike):
        return model
    from sc_dta.models import BioDTA, load_geneformer
    from sc_dta.models.biodta import _CONFIG_FILE

    path = Path(model).expanduser()
    if (path / _CONFIG_FILE).exists():
        return BioDTA.from_pretrained(path, device=device)
    return load_geneformer(str(model), device=device)


def _as_encoder(encoder: Any) -> DNAEncoder:
    """Return ``encoder``, or build it from its name."""
    if isinstance(encoder, str):
        from sc_dta.models.encoders import encoder_from_name

        return encoder_from_name(encoder)
    return encoder


def _max_positions(model: nn.Module) -> int | None:
    backbone = getattr(model, "backbone", model)
    cfg = getattr(backbone, "config", None)
    return int(cfg.max_position_embeddings) if cfg is not None and hasattr(cfg, "max_position_embeddings") else None


def _check_tokens_fit(model: nn.Module, tokens: Any) -> None:
    """Refuse tokens made with another vocabulary than the model's."""
    try:
        from sc_dta.models.cell import model_vocab

        mv = model_vocab(model)
    except Exception:  # a bare BertForMaskedLM of unknown vocabulary: only the size check below
        mv = None
    tv = getattr(tokens, "vocab", None)
    if mv is not None and tv is not None and (len(mv) != len(tv) or str(mv.version) != str(tv.version)):
        raise ValueError(
            f"tokens: tokenized with the {tv.version} vocabulary ({len(tv)} tokens) but the model uses "
            f"{mv.version} ({len(mv)} tokens); tokenize with vocab=sc_dta.models.cell.model_vocab(model)."
        )
    backbone = getattr(model, "backbone", model)
    size = getattr(getattr(backbone, "config", None), "vocab_size", None)
    top = max((int(ids.max()) for ids in tokens.input_ids if len(ids)), default=-1)
    if size is not None and top >= size:
        raise ValueError(f"tokens: token id {top} is outside the model's vocabulary of {size} tokens.")
    n_pos = _max_positions(model)
    longest = max((len(ids) for ids in tokens.input_ids), default=0)
    if n_pos is not None and longest > n_pos:
        raise ValueError(
            f"tokens: cells of up to {longest} tokens but the model takes at most {n_pos}; "
            f"tokenize with max_length={n_pos}."
        )


def _token_rows(adata: AnnData, tokens: Any) -> np.ndarray:
    """Row of ``adata`` for each tokenized cell."""
    names = pd.Index(np.asarray(tokens.obs_names).astype(str))
    rows = adata.obs_names.get_indexer(names)
    if (rows < 0).any():
        missing = names[rows < 0][:5].tolist()
        raise ValueError(f"tokens: cells {missing} are not in adata.obs_names; tokenize this AnnData again.")
    return rows


def _select_cells(adata: AnnData, tokens: Any, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """``adata`` rows and token ids of the tokenized cells selected by ``mask`` (empty cells left out)."""
    rows = _token_rows(adata, tokens)
    keep = mask[rows]
    if hasattr(tokens, "empty"):
        keep &= ~np.asarray(tokens.empty, dtype=bool)
    return rows[keep], [np.asarray(tokens.input_ids[i]) for i in np.flatnonzero(keep)]


def _token_columns(tokens: Any, largest_token: int = 0) -> np.ndarray:
    """Column of ``adata.var`` of every token id up to ``largest_token`` at least (-1: not a var)."""
    tok2var = tokens.token_to_var()
    tok2col = np.full(max(max(tok2var, default=0), largest_token) + 1, -1, dtype=np.int64)
    for t, v in tok2var.items():
        tok2col[int(t)] = int(v)
    return tok2col


def _copy(data: AnnData | MuData, ad: AnnData, function: str) -> AnnData | MuData:
    """``data.copy()``, refused with a clear message when ``ad`` is backed (a copy would load ``X``)."""
    from sc_dta._chunks import is_backed

    if is_backed(ad):
        raise ValueError(
            f"copy=True: {function} got a backed AnnData (file {str(ad.filename)!r}); copying it would load X into "
            "memory. Pass copy=False to add the results to this object (obs, var, uns and the layer are held in "
            "memory; write them with .write_h5ad(new_path)), call .to_memory() first, or use sc_dta.tl.screen, "
            "which returns the results as a separate AnnData."
        )
    return data.copy()


def _resolve_gene(adata: AnnData, gene: str, tokens: Any, vocab: Any) -> tuple[int, int | None, str]:
    """``(token_id, var position or None, Ensembl id)`` of ``gene`` (a var name, symbol or Ensembl id)."""
    if not isinstance(gene, str):
        raise TypeError(f"gene: expected a gene name or Ensembl id (str), got {type(gene).__name__}.")
    var_tokens = np.asarray(tokens.var_token_ids)
    id_to_token = getattr(vocab, "id_to_token", None)
    if gene in adata.var_names:
        pos = int(adata.var_names.get_loc(gene))
        tid = int(var_tokens[pos])
        if tid < 0:
            raise ValueError(
                f"gene: {gene!r} is in adata.var_names but not in the model's vocabulary "
                f"({getattr(vocab, 'version', 'custom')}), so it was not tokenized."
            )
        ens = str(id_to_token[tid]) if id_to_token is not None else gene
        return tid, pos, ens
    pos = _var_by_symbol(adata, gene)
    if pos is not None:
        return _resolve_gene(adata, str(adata.var_names[pos]), tokens, vocab)
    token_ids = getattr(vocab, "token_ids", {}) or {}
    try:
        ens = vocab.gene_id(gene) if hasattr(vocab, "gene_id") else None
    except KeyError:
        ens = None
    if ens is None:
        mapping = getattr(vocab, "mapping", {}) or {}
        key = gene.upper()
        ens = mapping.get(key, key if key in token_ids else None)
    if ens is None or ens not in token_ids:
        raise KeyError(
            f"gene: {gene!r} is neither in adata.var_names nor a gene of the model's "
            f"{getattr(vocab, 'version', '')} vocabulary."
        )
    tid = int(token_ids[ens])
    hits = np.flatnonzero(var_tokens == tid)
    if hits.size == 0:
        raise KeyError(f"gene: {gene!r} ({ens}) is in the vocabulary but no gene of adata maps to it.")
    return tid, int(hits[0]), ens


def _var_by_symbol(adata: AnnData, gene: str) -> int | None:
    """Position of the single var whose symbol/id column (``gene_symbols``, ``gene_name``, ...) is ``gene``."""
    from sc_dta.tl._rank import NAME_COLUMNS

    for col in NAME_COLUMNS:
        if col in adata.var.columns:
            hits = np.flatnonzero(adata.var[col].astype(str).str.upper().to_numpy() == gene.upper())
            if hits.size == 1:
                return int(hits[0])
            if hits.size > 1:
                names = adata.var_names[hits[:3]].tolist()
                raise ValueError(
                    f"gene: {gene!r} matches several vars in adata.var[{col!r}] ({names}); pass a var name."
                )
    return None


def _special_ids(vocab: Any) -> dict[str, Any]:
    pad = getattr(vocab, "pad_id", 0)
    mask = getattr(vocab, "mask_id", None)
    cls = getattr(vocab, "cls_id", None)
    eos = getattr(vocab, "eos_id", None)
    special = getattr(vocab, "special_ids", None)
    ids = {int(i) for i in (special or []) if i is not None} | {int(i) for i in (pad, mask, cls, eos) if i is not None}
    return {
        "special_ids": sorted(ids),
        "pad_id": int(pad if pad is not None else 0),
        "cls_id": None if cls is None else int(cls),
        "eos_id": None if eos is None else int(eos),
        "max_length": getattr(vocab, "max_length", None),
    }


def _h5ad_safe(value: Any) -> Any:
    """Make ``value`` writable to h5ad (no None, numpy scalars to Python)."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return {str(k): _h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        vals = [_h5ad_safe(v) for v in value]
        if all(isinstance(v, str) for v in vals):
            return np.asarray(vals, dtype=object) if vals else np.zeros(0, dtype=object)
        return vals
    if isinstance(value, int | float | str | bool | np.ndarray):
        return value
    return str(value)


def _model_info(model: nn.Module) -> dict[str, Any]:
    backbone = getattr(model, "backbone", model)
    cfg = getattr(backbone, "config", None)
    info: dict[str, Any] = {"class": type(model).__name__}
    if cfg is not None:
        info.update(
            name_or_path=str(getattr(cfg, "_name_or_path", "") or ""),
            n_layers=int(cfg.num_hidden_layers),
            hidden_size=int(cfg.hidden_size),
            vocab_size=int(cfg.vocab_size),
        )
    vocab = getattr(model, "vocab", None)
    if vocab is not None and getattr(vocab, "version", None) is not None:
        info["vocab"] = str(vocab.version)
    dna = getattr(model, "dna_encoder_info", None)
    if isinstance(dna, Mapping):
        info["dna_encoder"] = dict(dna)
    return info


def _existing_slots(adata: AnnData, key: str) -> list[str]:
    slots = []
    if key in adata.varm:
        slots.append(f"varm[{key!r}]")
    if key in adata.layers:
        slots.append(f"layers[{key!r}]")
    slots += [f"obs[{key + s!r}]" for s in OBS_SUFFIXES if key + s in adata.obs]
    slots += [f"var[{key + s!r}]" for s in VAR_SUFFIXES if key + s in adata.var]
    if key in adata.uns:
        slots.append(f"uns[{key!r}]")
    return slots


#: ``uns[key]['params']['kind']`` of the results each function writes (a key holding another is not overwritten).
RESULT_KINDS = {"perturb_gene": ("delete", "overexpress"), "perturb_tss": ("tss_mutation",)}


def _refuse_foreign_slots(
    adata: AnnData, key: str, slots: Sequence[str], kinds: Sequence[str], function: str, *, foreign: bool = False
) -> None:
    """Raise when ``slots`` (the existing slots of ``key``) are not a previous result of ``function``.

    A previous result is recognised by ``uns[key]['params']['kind']`` in ``kinds``; ``foreign=True`` refuses anyway.
    """
    if not slots:
        return
    uns = adata.uns.get(key)
    params = uns.get("params") if isinstance(uns, Mapping) else None
    kind = params.get("kind") if isinstance(params, Mapping) else None
    if foreign or kind not in kinds:
        raise ValueError(
            f"key_added={key!r}: {', '.join(slots)} already exist and are not a previous {function} result; "
            "choose another key_added (nothing was written)."
        )


def _check_keys(adata: AnnData, keys: Sequence[str], function: str) -> list[str]:
    """Validate result keys; refuse to overwrite slots that are not a previous result of ``function``.

    Returns the keys holding a previous result (overwritten, with a warning, once the new result exists).
    """
    if len(set(keys)) != len(keys):
        raise ValueError(f"key_added: the result keys {list(keys)} are not unique.")
    previous = []
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ValueError(f"key_added: expected a non-empty string, got {key!r}.")
        slots = _existing_slots(adata, key)
        if not slots:
            continue
        _refuse_foreign_slots(adata, key, slots, RESULT_KINDS[function], function, foreign=key in adata.varm)
        previous.append(key)
    return previous


#: |mean shift| below which every gene's response is numerical noise (float32 rounding of the forward passes).
NOISE_LEVEL = {"cosine": 1e-6, "expression": 1e-5}


def _warn_if_noise(key: str, mean: np.ndarray, readout: str, gene: str) -> None:
    """Warn when no gene responds beyond numerical noise (the model ignores ``gene``)."""
    finite = np.abs(mean[np.isfinite(mean)])
    top = float(finite.max()) if finite.size else 0.0
    if top < NOISE_LEVEL[readout]:
        warnings.warn(
            f"{key}: every gene's shift is at numerical-noise level (largest |mean| {top:.1e}): the model does not use "
            f"{gene!r} to predict the other genes. Check uns['train_adapter']['context_gain'] of the training run.",
            UserWarning,
            stacklevel=3,
        )


def _warn_overwrite(adata: AnnData, keys: Sequence[str]) -> None:
    for key in keys:
        warnings.warn(
            f"key {key!r}: overwriting the previous result ({', '.join(_existing_slots(adata, key))}).",
            UserWarning,
            stacklevel=3,
        )


def _assemble(
    adata: AnnData, res: ShiftResult, rows: np.ndarray, tok2col: np.ndarray
) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Turn an engine result into the layer / obs / var arrays (nothing written yet)."""
    from scipy import sparse

    cols = np.where(res.token < tok2col.shape[0], tok2col[np.minimum(res.token, tok2col.shape[0] - 1)], -1)
    ok = cols >= 0
    r = rows[res.cell[ok]]
    c = cols[ok]
    v = res.shift[ok].astype(np.float32)
    layer = sparse.csr_matrix((v, (r, c)), shape=(adata.n_obs, adata.n_vars), dtype=np.float32)
    layer.sum_duplicates()
    layer.sort_indices()
    n = np.bincount(c, minlength=adata.n_vars).astype(np.int64)
    total = np.bincount(c, weights=v.astype(np.float64), minlength=adata.n_vars)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan).astype(np.float32)
    cell = np.full(adata.n_obs, np.nan, dtype=np.float32)
    cell_emb = np.full(adata.n_obs, np.nan, dtype=np.float32)
    evaluated = np.zeros(adata.n_obs, dtype=bool)
    cell[rows] = res.cell_mean
    cell_emb[rows] = res.cell_emb
    evaluated[rows] = res.evaluated
    obs = {"_cell": cell, "_cell_emb": cell_emb, "_evaluated": evaluated}
    var = {"_mean": mean, "_n": n}
    return layer, obs, var


def _assemble_expression(
    adata: AnnData, res: Any, rows: np.ndarray, tok2col: np.ndarray
) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Turn an expression-readout result into the layer / obs / var arrays (nothing written yet)."""
    from scipy import sparse

    tokens = np.asarray(res.tokens)
    cols = np.where(tokens < tok2col.shape[0], tok2col[np.minimum(tokens, tok2col.shape[0] - 1)], -1)
    ok = cols >= 0
    cell_rows = rows[res.cells]
    values = res.delta[:, ok]
    finite = np.isfinite(values)
    r = np.repeat(cell_rows, finite.sum(axis=1))
    c = np.broadcast_to(cols[ok], values.shape)[finite]
    layer = sparse.csr_matrix((values[finite], (r, c)), shape=(adata.n_obs, adata.n_vars), dtype=np.float32)
    layer.sort_indices()
    n = np.bincount(c, minlength=adata.n_vars).astype(np.int64)
    total = np.bincount(c, weights=values[finite].astype(np.float64), minlength=adata.n_vars)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan).astype(np.float32)
    cell = np.full(adata.n_obs, np.nan, dtype=np.float32)
    evaluated = np.zeros(adata.n_obs, dtype=bool)
    with np.errstate(invalid="ignore"):
        cell[cell_rows] = np.nanmean(np.abs(np.where(finite, values, np.nan)), axis=1) if values.size else np.nan
    evaluated[cell_rows] = True
    return layer, {"_cell": cell, "_evaluated": evaluated}, {"_mean": mean, "_n": n}


def _var_columns(run: Any) -> np.ndarray:
    """Token ids of the genes of ``adata.var`` that are in the vocabulary (the readout's columns)."""
    return np.asarray(sorted(int(t) for t in run.tokens.token_to_var()), dtype=np.int64)


READOUTS = ("expression", "cosine")


def _check_readout(readout: str, n_folds: int) -> None:
    if readout not in READOUTS:
        raise ValueError(f"readout: expected 'expression' or 'cosine', got {readout!r}.")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 1:
        raise ValueError(f"n_folds: must be a positive integer, got {n_folds!r}.")


def _write(adata: AnnData, key: str, layer: Any, obs: dict, var: dict, params: dict) -> None:
    adata.layers[key] = layer
    for suffix, values in obs.items():
        adata.obs[key + suffix] = values
    for suffix, values in var.items():
        adata.var[key + suffix] = values
    adata.uns[key] = {"params": _h5ad_safe(params)}


class _Run:
    """Everything both public functions share: tokens, gene, cells, and the final write."""

    def __init__(
        self,
        adata: AnnData,
        gene: str,
        model: nn.Module,
        tokens: Any,
        cells: Any,
        emb_layer: int | str,
        need_var: bool,
        layer: str | None = None,
    ) -> None:
        from sc_dta.models._forward import resolve_emb_layer

        self.adata = adata
        resolve_emb_layer(model, emb_layer)
        mask = cells_mask(adata, cells)
        self.tokens = _tokenize(adata, model, tokens, layer, mask)
        self.vocab = _vocab_of(model, self.tokens)
        if tokens is not None:
            _check_tokens_fit(model, self.tokens)
        self.token_id, self.var_pos, self.gene_id = _resolve_gene(adata, gene, self.tokens, self.vocab)
        if need_var and self.var_pos is None:
            raise KeyError(f"gene: {gene!r} is not in adata.var_names.")
        self.rows, self.cells = _select_cells(adata, self.tokens, mask)
        has_gene = np.array([bool(np.any(c == self.token_id)) for c in self.cells], dtype=bool)
        if not has_gene.any():
            raise ValueError(
                f"gene: {gene!r} ({self.gene_id}) is not among the tokens of any of the {len(self.cells)} selected "
                "cells (it is not expressed there or falls outside the first max_length genes); nothing to perturb."
            )
        self.n_selected = int(mask.sum())
        self.n_with_gene = int(has_gene.sum())
        self.tok2col = _token_columns(self.tokens, int(self.token_id))
        self.specials = _special_ids(self.vocab)

    def results(self, model: nn.Module, specs: list[PerturbSpec], **kwargs: Any) -> list[ShiftResult]:
        return run_perturbations(model, self.cells, specs, **self.specials, **kwargs)

    def expression(self, model: nn.Module, specs: list[PerturbSpec], **kwargs: Any) -> list[Any]:
        from sc_dta.models._expression_readout import run_expression_readout

        sp = {k: v for k, v in self.specials.items() if k != "max_length"}
        return run_expression_readout(
            model,
            self.cells,
            specs,
            mask_id=int(self.vocab.mask_id),
            columns=_var_columns(self),
            cell_ids=self.rows,
            **sp,
            **kwargs,
        )

    def assemble(self, readout: str, res: Any) -> tuple[Any, dict, dict]:
        if readout == "expression":
            return _assemble_expression(self.adata, res, self.rows, self.tok2col)
        return _assemble(self.adata, res, self.rows, self.tok2col)

    def params(self, gene: str, model: nn.Module, emb_layer: int, res: Any, readout: str) -> dict[str, Any]:
        out = {
            "gene": gene,
            "gene_id": self.gene_id,
            "token_id": int(self.token_id),
            "model": _model_info(model),
            "readout": readout,
            "cells": self.n_selected,
            "vocab": str(getattr(self.vocab, "version", "")),
        }
        if readout == "cosine":
            from sc_dta.models._forward import n_layers, resolve_emb_layer

            layer_index = resolve_emb_layer(model, emb_layer) - n_layers(model)
            out |= {
                "emb_layer": int(layer_index),
                "n_evaluated": int(res.evaluated.sum()),
                "cell_emb": res.cell_emb_mode,
            }
        else:
            out |= {"n_evaluated": int(len(res.cells))}
        return out


# --------------------------------------------------------------------------------------------- public


def perturb_gene(
    adata: AnnData | MuData,
    gene: str,
    *,
    model: nn.Module,
    kind: Literal["delete", "overexpress"] | Sequence[str] = "delete",
    readout: Literal["expression", "cosine"] = "expression",
    cells: Sequence[str] | np.ndarray | None = None,
    layer: str | None = None,
    tokens: Any = None,
    key_added: str | None = None,
    emb_layer: int | str = -1,
    n_folds: int = 7,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    copy: bool = False,
    mod: str = "rna",
) -> AnnData | MuData | None:
    """In-silico deletion / overexpression of one gene's token: the adapter-free baseline of Bio-DTA.

    For every selected cell that contains ``gene`` the model is run on the original tokens and on the perturbed
    ones. ``delete`` removes the gene's token (Geneformer's in-silico deletion). ``overexpress`` moves it to the
    front (after ``<cls>`` in V2), as Geneformer does; in a position-free model (:attr:`BioDTA.position_free
    <sc_dta.models.BioDTA.position_free>`), where moving a token changes nothing, it instead adds the gene to the
    selected cells that lack it.

    ``readout="expression"`` (default) reports, for every gene of the vocabulary in every evaluated cell, the
    change of its expected presence predicted by the masked-gene head, ``log E(perturbed) - log E(original)``
    (signed; the cell's gene positions are masked in ``n_folds`` folds; see the method page of the docs).
    ``readout="cosine"`` is Geneformer's shift: ``1 - cos`` of each other gene's contextual embedding at
    ``emb_layer``, genes paired position by position after removing the perturbed gene, for the genes in the cell's
    tokens (``<cls>``/``<eos>`` and the gene itself are never affected genes).

    Parameters
    ----------
    adata
        AnnData with raw counts (or a MuData; ``mod`` selects the modality), in memory or backed
        (``anndata.read_h5ad(path, backed="r")``: the selected cells' counts are read chunk by chunk, and the
        results are written to its in-memory ``obs``, ``var``, ``layers`` and ``uns``; ``copy=True`` is refused).
    gene
        A var name, a gene symbol or an Ensembl id known to the model's vocabulary.
    model
        A Geneformer ``BertForMaskedLM`` from :func:`sc_dta.models.load_geneformer`, a
        :class:`~sc_dta.models.BioDTA` (then the input embeddings are its dynamic ones), or the folder or name of
        either.
    kind
        ``"delete"``, ``"overexpress"``, or a list of both: the unperturbed forward pass is computed
        once and shared.
    readout
        ``"expression"`` or ``"cosine"`` (see above).
    cells
        Boolean mask over ``obs``, obs names, or None for all cells.
    layer
        Layer with the raw counts (default ``X``, as in scanpy), e.g. ``"counts"`` after ``sc.pp.log1p``. Of a
        backed AnnData only ``X`` is read from disk chunk by chunk; anndata holds its layers in memory (a warning
        says so).
    tokens
        A :class:`~sc_dta.pp.TokenizedCells` from :func:`sc_dta.pp.tokenize` to reuse; None tokenizes
        ``adata`` (or ``layer``) with the model's vocabulary.
    key_added
        Result key. Default ``"dta_shift_delete"`` / ``"dta_shift_overexpress"``; with several kinds a
        given ``key_added`` becomes ``f"{key_added}_{kind}"``. Slots that are not a previous ``perturb_gene``
        result are never overwritten (an error); a previous result is replaced with a warning.
    emb_layer
        Layer compared by the cosine readout: ``"second_to_last"`` or ``-1`` (default, Geneformer's), ``"last"``
        or ``0``, down to ``-n_layers`` for the embedding output.
    n_folds
        Folds of masked positions of the expression readout (each gene position is masked once).
    seed
        Seed of the expression readout's folds.
    batch_size
        Sequences per forward pass (default ``settings.batch_size_cells``); halved on CUDA out-of-memory.
    device
        Compute device (default ``settings.device``); the model is moved there.
    copy
        Return a copy instead of writing to ``adata``.
    mod
        Modality of a MuData.

    Returns
    -------
    ``adata`` copy when ``copy=True``, else None. For each result key ``key`` it writes:

    ``adata.layers[key]``
        CSR float32 ``n_obs × n_vars``: the shift of each gene in each evaluated cell (expression readout:
        every gene of the vocabulary; cosine readout: the genes among the cell's tokens). The perturbed gene has
        no entry.
    ``adata.obs[key + '_cell']``
        Mean gene shift of the cell (expression readout: mean magnitude; NaN when not evaluated).
    ``adata.obs[key + '_cell_emb']``
        Cosine readout only: ``1 - cos`` of the cell embeddings (the ``<cls>`` vector when the cells start with
        ``<cls>``, as Geneformer V2, else the mean of the paired gene embeddings).
    ``adata.obs[key + '_evaluated']``
        Whether the cell was evaluated.
    ``adata.var[key + '_mean']``, ``adata.var[key + '_n']``
        Mean shift over the cells where the gene was measured (signed for the expression readout), and that
        number of cells.
    ``adata.uns[key]['params']``
        gene, gene_id, token_id, kind, readout, layer, model ids, cells, n_evaluated (and emb_layer, cell_emb
        or n_folds, seed).

    A warning says when every shift is at numerical-noise level (the model does not use the gene).

    Notes
    -----
    Cost per evaluated cell: the cosine readout runs one unperturbed forward pass (shared by all kinds) and one per
    kind, each only up to ``emb_layer`` and never through the masked-LM head; the expression readout runs
    ``n_folds`` masked passes per version through the head, logits only at the masked positions. Batches are sorted
    by length and padded per batch, under :func:`sc_dta._utils.autocast` (bf16 on CUDA by default).
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kind: expected 'delete', 'overexpress' or a list of distinct ones, got {kind!r}.")
    if key_added is None:
        keys = [f"dta_shift_{k}" for k in kinds]
    elif len(kinds) == 1:
        keys = [key_added]
    else:
        keys = [f"{key_added}_{k}" for k in kinds]

    _check_readout(readout, n_folds)
    ad = get_anndata(adata, mod)
    data = _copy(adata, ad, "perturb_gene") if copy else adata
    ad = get_anndata(data, mod)
    previous = _check_keys(ad, keys, "perturb_gene")
    model = _as_model(model, device)
    run = _Run(ad, gene, model, tokens, cells, emb_layer, need_var=False, layer=layer)
    insert = bool(getattr(model, "position_free", False))
    specs = [PerturbSpec(kind=k, token_id=run.token_id) for k in kinds]
    desc = f"{'/'.join(kinds)} {gene}"
    if readout == "expression":
        results = run.expression(
            model, specs, n_folds=n_folds, seed=seed, batch_size=batch_size, device=device, desc=desc,
            insert_absent=insert,
        )  # fmt: skip
    else:
        results = run.results(
            model, specs, emb_layer=emb_layer, batch_size=batch_size, device=device, desc=desc,
            overexpress_absent=insert and "overexpress" in kinds,
        )  # fmt: skip
    outputs = []
    for k, key, res in zip(kinds, keys, results, strict=True):
        shifts, obs, var = run.assemble(readout, res)
        params = run.params(gene, model, emb_layer, res, readout) | {"kind": k, "mutation": k, "layer": layer or "X"}
        if readout == "expression":
            params |= {"n_folds": int(n_folds), "seed": int(seed)}
        outputs.append((key, shifts, obs, var, params))
    _warn_overwrite(ad, previous)
    for key, _, _, var, _ in outputs:
        _warn_if_noise(key, var["_mean"], readout, gene)
    for out in outputs:
        _write(ad, *out)
    logger.info("perturb_gene(%s, %s): %d cells evaluated", gene, kinds, run.n_with_gene)
    return data if copy else None


def _mutation_groups(mutation: Any) -> tuple[list[list[Any]], bool]:
    """Normalise ``mutation`` to a list of mutation groups (applied together) and whether it was a list."""
    if isinstance(mutation, str) or not isinstance(mutation, Sequence):
        return [[mutation]], False
    groups = []
    for m in mutation:
        if isinstance(m, str) or not isinstance(m, Sequence):
            groups.append([m])
        else:
            if not m:
                raise ValueError("mutation: an empty group of mutations was given.")
            groups.append(list(m))
    if not groups:
        raise ValueError("mutation: an empty list of mutations was given.")
    return groups, True


def _mutation_text(group: list[Any]) -> str:
    return ";".join(str(m) for m in group)


def perturb_tss(
    adata: AnnData | MuData,
    gene: str,
    mutation: Any,
    *,
    model: nn.Module,
    genome: Genome,
    encoder: DNAEncoder,
    readout: Literal["expression", "cosine"] = "expression",
    n_controls: int = 0,
    cells: Sequence[str] | np.ndarray | None = None,
    layer: str | None = None,
    tokens: Any = None,
    key_added: str = "dta_shift",
    emb_layer: int | str = -1,
    n_folds: int = 7,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    copy: bool = False,
    mod: str = "rna",
) -> AnnData | MuData | None:
    """Mutate a gene's TSS in silico and predict, cell by cell, how every other gene responds.

    The gene's DNA window (centred on its TSS from ``adata.var['tss_chrom'|'tss_pos'|'tss_strand']``) is
    mutated and embedded with ``encoder``; the BioDTA adapter maps it to the gene's new input token embedding.
    The original input is the model's normal dynamic embedding (reference DNA), the perturbed input the same
    tokens with only this gene's input embedding replaced. Only cells whose tokens contain the gene are evaluated.

    ``readout="expression"`` (default) asks the model's masked-gene head: the change in each gene's expected
    presence in the cell, log E(perturbed) - log E(original) (signed; see the method page of the docs),
    for every gene of the vocabulary. ``readout="cosine"`` is Geneformer's shift, ``1 - cos`` of each other gene's
    contextual embedding at ``emb_layer``, for the genes in the cell's tokens.

    With ``n_controls`` the same readout is computed for that many matched control mutations
    (:func:`sc_dta.tl.control_mutations`: same kind and size, elsewhere in the window, motifs kept), sharing the
    unperturbed forward pass, and every gene gets an empirical p-value (how often a control moves it at least as
    much) and a specificity ratio (its shift over its mean control shift, in magnitude).

    Parameters
    ----------
    adata
        AnnData with raw counts and TSS annotation (:func:`sc_dta.pp.annotate_tss`), or a MuData; in memory or
        backed, as in :func:`perturb_gene`.
    gene
        A var name, a gene symbol or an Ensembl id.
    mutation
        A mutation spec string (``"chr8:11676959:C>T"``, ``"delete:-100:+50"``, ``"random:10"``), a
        mutation object (:class:`~sc_dta.genome.Variant`, ...), or a list of them: one result per
        element. An element that is itself a list (e.g. :func:`~sc_dta.genome.read_vcf` output) is
        applied as one haplotype.
    model
        A trained :class:`~sc_dta.models.BioDTA`, or the folder it was saved to.
    genome
        The :class:`~sc_dta.genome.Genome` the windows are cut from, or its FASTA path(s).
    encoder
        The DNA encoder the model's adapter was trained on, or its name (:func:`sc_dta.models.encoder_from_name`).
    readout
        ``"expression"`` or ``"cosine"`` (see above).
    n_controls
        Matched control mutations per mutation (0 = none).
    cells
        Boolean mask over ``obs``, obs names, or None for all cells.
    layer
        Layer with the raw counts (default ``X``, as in scanpy), e.g. ``"counts"`` after ``sc.pp.log1p``. Of a
        backed AnnData only ``X`` is read from disk chunk by chunk; anndata holds its layers in memory (a warning
        says so).
    tokens
        A :class:`~sc_dta.pp.TokenizedCells` to reuse; None tokenizes ``adata`` (or ``layer``) with the model's
        vocabulary.
    key_added
        Result key for a single mutation; for a list, ``f"{key_added}_{i}"`` for element ``i``
        (``uns[key]['params']['mutation']`` holds its text).
    emb_layer
        Layer compared by the cosine readout: ``-1``/``"second_to_last"`` (default), ``0``/``"last"``.
    n_folds
        Folds of masked positions of the expression readout (each gene position is masked once).
    batch_size
        Sequences per forward pass (default ``settings.batch_size_cells``).
    device
        Compute device (default ``settings.device``).
    seed
        Seed for random mutations, the readout's folds and the controls.
    copy
        Return a copy instead of writing to ``adata``.
    mod
        Modality of a MuData.

    Returns
    -------
    ``adata`` copy when ``copy=True``, else None. Writes for each key the same slots as
    :func:`perturb_gene` (``layers[key]``, ``obs[key + '_cell' | '_evaluated']``, ``var[key + '_mean' | '_n']``,
    ``uns[key]['params']`` with the mutation text, window, encoder and seed); with controls also
    ``var[key + '_pval']``, ``var[key + '_specificity']`` and ``uns[key]['controls']`` (the control mutations,
    their per-gene mean shifts ``mean`` (controls × genes) and the gene order ``var_names``).
    """
    from sc_dta.tl._controls import control_mutations
    from sc_dta.tl._dna_cache import embed_windows, tss_window
    from sc_dta.tl._embed_dna import _as_genome

    model = _as_model(model, device)
    if not (hasattr(model, "embed_tokens") and hasattr(model, "backbone")):
        raise TypeError(
            f"model: perturb_tss needs a BioDTA (DNA-aware token embeddings), got {type(model).__name__}; "
            "use perturb_gene for the adapter-free baseline."
        )
    genome = _as_genome(genome)
    encoder = _as_encoder(encoder)
    _check_readout(readout, n_folds)
    if isinstance(n_controls, bool) or not isinstance(n_controls, int | np.integer) or n_controls < 0:
        raise ValueError(f"n_controls: must be a non-negative integer, got {n_controls!r}.")
    groups, is_list = _mutation_groups(mutation)
    keys = [f"{key_added}_{i}" for i in range(len(groups))] if is_list else [key_added]

    ad = get_anndata(adata, mod)
    data = _copy(adata, ad, "perturb_tss") if copy else adata
    ad = get_anndata(data, mod)
    previous = _check_keys(ad, keys, "perturb_tss")
    run = _Run(ad, gene, model, tokens, cells, emb_layer, need_var=True, layer=layer)
    chrom, tss, strand = _gene_tss(ad, gene, run.var_pos)
    _check_dna(model, run.token_id, gene, encoder)

    reference = tss_window(genome, chrom, tss, strand, encoder)
    all_groups: list[list[Any]] = []
    owner: list[tuple[int, int]] = []  # (mutation index, -1 for the mutation itself or the control index)
    for i, group in enumerate(groups):
        all_groups.append(group)
        owner.append((i, -1))
        if n_controls:
            try:
                controls = control_mutations(genome, chrom, tss, strand, group, encoder, n=int(n_controls), seed=seed)
            except ValueError as e:
                raise ValueError(f"controls for mutation {_mutation_text(group)!r} of {gene!r}: {e}") from e
            all_groups += controls
            owner += [(i, c) for c in range(len(controls))]
    windows = []
    for group in all_groups:
        try:
            seq = tss_window(genome, chrom, tss, strand, encoder, mutations=group, seed=seed)
        except (ValueError, KeyError) as e:
            raise type(e)(f"mutation {_mutation_text(group)!r} of {gene!r}: {e}") from e
        if len(seq) != len(reference):
            raise ValueError(
                f"mutation {_mutation_text(group)!r}: mutated window has {len(seq)} bp, expected {len(reference)}."
            )
        if seq == reference:
            raise ValueError(
                f"mutation {_mutation_text(group)!r} does not change the {len(reference)} bp window around the TSS of "
                f"{gene!r} ({chrom}:{tss} {strand}); it lies outside the window or restores the reference."
            )
        windows.append(seq)
    embeddings = embed_windows(windows, encoder, device=device)

    specs = [PerturbSpec(kind="embedding", token_id=run.token_id, dna_override=e) for e in embeddings]
    if readout == "expression":
        results = run.expression(
            model, specs, n_folds=n_folds, seed=seed, batch_size=batch_size, device=device, desc=f"TSS {gene}"
        )
    else:
        results = run.results(
            model, specs, emb_layer=emb_layer, batch_size=batch_size, device=device, desc=f"TSS {gene}"
        )
    assembled = [run.assemble(readout, res) for res in results]
    outputs = []
    for i, (group, key) in enumerate(zip(groups, keys, strict=True)):
        main = owner.index((i, -1))
        layer_, obs, var = assembled[main]
        params = run.params(gene, model, emb_layer, results[main], readout) | {
            "kind": "tss_mutation",
            "mutation": _mutation_text(group),
            "seed": int(seed),
            "tss": {"chrom": str(chrom), "pos": int(tss), "strand": str(strand)},
            "encoder": {
                "name": str(getattr(encoder, "name", type(encoder).__name__)),
                "weights_id": str(getattr(encoder, "weights_id", "")),
                "window": int(encoder.window),
                "center_shift": int(getattr(encoder, "center_shift", 0)),
            },
            "genome": str(getattr(genome, "name", "")),
        }
        if readout == "expression":
            params["n_folds"] = int(n_folds)
        extra_uns = {}
        ctrl_idx = [k for k, (m, c) in enumerate(owner) if m == i and c >= 0]
        if ctrl_idx:
            ctrl_means = np.stack([assembled[k][2]["_mean"] for k in ctrl_idx]).astype(np.float32)
            pval, spec_ratio = control_statistics(var["_mean"], ctrl_means)
            var = var | {"_pval": pval, "_specificity": spec_ratio}
            extra_uns["controls"] = {
                "mutations": np.asarray([_mutation_text(all_groups[k]) for k in ctrl_idx], dtype=object),
                "mean": ctrl_means,
                "var_names": np.asarray(ad.var_names.astype(str), dtype=object),
            }
            params["n_controls"] = len(ctrl_idx)
        outputs.append((key, layer_, obs, var, params, extra_uns))
    _warn_overwrite(ad, previous)
    for key, _, _, var, _, _ in outputs:
        _warn_if_noise(key, var["_mean"], readout, gene)
    for key, layer_, obs, var, params, extra_uns in outputs:
        _write(ad, key, layer_, obs, var, params)
        if extra_uns:
            ad.uns[key] = dict(ad.uns[key]) | extra_uns
    return data if copy else None


def control_statistics(shift: np.ndarray, controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene empirical p-value and specificity ratio of a mutation's shifts against its controls.

    Parameters
    ----------
    shift
        ``(n_genes,)`` mean shift of each gene under the mutation.
    controls
        ``(n_controls, n_genes)`` the same under each control mutation.

    Returns
    -------
    ``pval``: ``(1 + #controls with |shift| >= the mutation's) / (1 + n_controls)``; ``specificity``:
    ``|shift| / mean |control shift|``. NaN where the gene was not measured.
    """
    shift = np.abs(np.asarray(shift, dtype=np.float64))
    ctrl = np.abs(np.asarray(controls, dtype=np.float64))
    n = ctrl.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        pval = (1.0 + np.sum(ctrl >= shift[None, :], axis=0)) / (1.0 + n)
        ratio = shift / np.mean(ctrl, axis=0)
    bad = ~np.isfinite(shift) | ~np.isfinite(ctrl).all(axis=0)
    pval[bad] = np.nan
    ratio[bad] = np.nan
    return pval.astype(np.float32), ratio.astype(np.float32)


def _gene_tss(adata: AnnData, gene: str, pos: int) -> tuple[str, int, str]:
    cols = ("tss_chrom", "tss_pos", "tss_strand")
    missing = [c for c in cols if c not in adata.var.columns]
    if missing:
        raise KeyError(f"adata.var lacks {missing}; run sc_dta.pp.annotate_tss(adata, gtf) first.")
    row = adata.var.iloc[pos]
    chrom, tss, strand = row["tss_chrom"], row["tss_pos"], row["tss_strand"]
    if pd.isna(chrom) or pd.isna(tss) or pd.isna(strand) or str(chrom) == "":
        raise ValueError(f"gene: {gene!r} has no TSS annotation in adata.var (not found in the GTF).")
    return str(chrom), int(tss), str(strand)


def _check_dna(model: nn.Module, token_id: int, gene: str, encoder: DNAEncoder) -> None:
    emb = getattr(model, "token_embedding", None)
    has_dna = getattr(emb, "has_dna", None)
    if has_dna is not None and not bool(has_dna[int(token_id)]):
        raise ValueError(
            f"gene: {gene!r} has no DNA embedding in this model (its token uses the static embedding), so a TSS "
            "mutation cannot change it; embed its TSS window (tl.embed_dna) and set it with model.set_dna_embeddings."
        )
    name = getattr(encoder, "name", type(encoder).__name__)
    d_dna = getattr(model, "d_dna", None)
    if d_dna is not None and int(getattr(encoder, "dim", d_dna)) != int(d_dna):
        raise ValueError(
            f"encoder: {name} embeds {gene!r}'s window into {encoder.dim} values, but the model's adapter was trained on "
            f"{d_dna}-dimensional DNA embeddings; pass the encoder the model was trained with."
        )
    info = getattr(model, "dna_encoder_info", None)
    if isinstance(info, Mapping):
        for attr in ("name", "window", "weights_id"):
            if attr in info and info[attr] not in (None, "") and str(info[attr]) != str(getattr(encoder, attr, "")):
                raise ValueError(
                    f"encoder: its {attr} {getattr(encoder, attr, None)!r} differs from the DNA encoder the model's adapter "
                    f"was trained with ({info[attr]!r}); mutated and reference embeddings would not be comparable. "
                    f"Pass the model's encoder ({info.get('name')}, window {info.get('window')})."
                )
