r"""The expression readout of an in-silico perturbation: what the model itself predicts for every gene.

Geneformer's cosine shift asks how much a gene's *embedding* moves; it moves for reasons unrelated to
regulation (a deletion shifts the positions of every later gene, any change of the perturbed token moves its
co-expressed genes alike) and it has no sign. The expression readout asks the masked-gene head instead.

For a cell, the positions of its genes (the perturbed gene excluded) are split into ``n_folds`` folds; each fold
in turn is replaced by ``<mask>`` and the model predicts, at every masked position, a distribution over genes
(the perturbed gene and special tokens get probability 0, the rest is renormalised). Summed over all positions
this gives the *expected presence* :math:`E_j` of every gene :math:`j` in the cell: how many of the cell's gene
slots the model expects :math:`j` to fill given the rest of the cell. The same folds are masked in the perturbed
cell (the gene deleted, moved to the front, or its DNA-derived embedding replaced), and the readout is

.. math:: \Delta_j = \log E_j^{\text{perturbed}} - \log E_j^{\text{original}},

signed (negative: the model predicts less of gene :math:`j`), defined for every gene of the vocabulary whether or
not it is detected in the cell.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sc_dta._settings import settings
from sc_dta.models._batches import length_sorted_batches
from sc_dta.models._padding import pad_tokens
from sc_dta.models._perturb_engine import PerturbSpec, perturb_tokens

logger = logging.getLogger(__name__)

#: Default number of folds: each fold masks about 15% of a cell's genes, as in training.
DEFAULT_FOLDS = 7


@dataclass
class ExpressionResult:
    r"""Expression readout of one perturbation.

    Attributes
    ----------
    cells
        Indices (into the input list of cells) of the evaluated cells.
    tokens
        Token ids of the columns of ``delta``.
    delta
        ``(len(cells), len(tokens))`` float32 :math:`\log E^{pert} - \log E^{orig}`; NaN for the perturbed gene.
    """

    cells: np.ndarray
    tokens: np.ndarray
    delta: np.ndarray


def fold_assignment(n_positions: int, n_folds: int, seed: int, cell: int) -> np.ndarray:
    """Fold of each gene position of a cell: balanced, seeded by ``(seed, cell)``, independent of batching."""
    folds = np.arange(n_positions) % max(1, min(n_folds, n_positions))
    return np.random.default_rng([seed, cell]).permutation(folds)


def run_expression_readout(
    model,
    cells: Sequence[np.ndarray],
    specs: Sequence[PerturbSpec],
    *,
    special_ids: Sequence[int],
    mask_id: int,
    pad_id: int = 0,
    cls_id: int | None = None,
    eos_id: int | None = None,
    columns: np.ndarray,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    batch_size: int | None = None,
    device=None,
    insert_absent: bool = False,
    cell_ids: Sequence[int] | np.ndarray | None = None,
    desc: str = "expression readout",
) -> list[ExpressionResult]:
    """Expression readout of every spec on the cells that contain the perturbed gene.

    Parameters
    ----------
    model
        ``BertForMaskedLM`` or ``BioDTA`` (its masked-LM head is used).
    cells
        Token ids per cell (special tokens included).
    specs
        Perturbations (``delete``, ``overexpress`` of a present gene, ``embedding``), all of the same gene token.
    special_ids, mask_id, pad_id, cls_id, eos_id
        Vocabulary facts.
    columns
        Token ids to report (e.g. the tokens of ``adata.var``).
    n_folds
        Folds of masked positions per cell (each gene position is masked exactly once).
    seed
        Seed of the fold assignment.
    batch_size
        Masked sequences per forward pass (default ``settings.batch_size_cells``).
    device
        Compute device.
    insert_absent
        ``overexpress`` evaluates the cells *lacking* the gene, inserting it (for position-free models, where
        moving a present gene to the front changes nothing); otherwise it moves the gene to the front of the
        cells that have it (Geneformer).
    cell_ids
        A stable id per cell (e.g. its ``obs`` row) seeding its folds, so a cell's result does not depend on
        which other cells are evaluated; default the position in ``cells``.
    desc
        Progress-bar label.

    Returns
    -------
    One :class:`ExpressionResult` per spec.

    Raises
    ------
    MemoryError
        When an allocation fails on a device other than CUDA (CUDA out-of-memory halves the forward passes and
        the batches instead); the message names the batch and what to change.
    """
    import torch

    from sc_dta._utils import resolve_device
    from sc_dta.models._forward import masked_log_probs

    if not specs:
        raise ValueError("run_expression_readout: no perturbation given.")
    tokens_of = {int(s.token_id) for s in specs}
    if len(tokens_of) != 1:
        raise ValueError("run_expression_readout: all perturbations must concern the same gene token.")
    gene = tokens_of.pop()
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 1:
        raise ValueError(f"n_folds: must be a positive integer, got {n_folds!r}.")
    device = resolve_device(device)
    batch_size = settings.batch_size_cells if batch_size is None else int(batch_size)
    special = np.asarray(sorted({int(i) for i in special_ids if i is not None} | {int(mask_id), int(pad_id)}))
    columns = np.asarray(columns, dtype=np.int64)

    cells = [np.asarray(c, dtype=np.int64) for c in cells]
    ids = np.arange(len(cells)) if cell_ids is None else np.asarray(cell_ids, dtype=np.int64)
    if ids.shape != (len(cells),):
        raise ValueError(f"cell_ids: expected {len(cells)} ids, got shape {ids.shape}.")
    has = np.fromiter((bool(np.any(c == gene)) for c in cells), dtype=bool, count=len(cells))
    evaluable = np.stack([~has if (s.kind == "overexpress" and insert_absent) else has for s in specs])
    todo = np.flatnonzero(evaluable.any(axis=0))
    lengths = np.asarray([len(cells[i]) for i in todo], dtype=np.int64)
    order = todo[np.argsort(-lengths, kind="stable")]
    sorted_lengths = np.sort(lengths)[::-1]

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    if param is not None and param.device != device:
        model.to(device)
    vocab_size = int(getattr(model, "backbone", model).config.vocab_size)
    exclude = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    exclude[torch.as_tensor(special[special < vocab_size], device=device)] = True
    exclude[gene] = True
    cols_t = torch.as_tensor(np.clip(columns, 0, vocab_size - 1), device=device)
    overrides = [
        None
        if s.dna_override is None
        else {gene: torch.as_tensor(np.asarray(s.dna_override), dtype=torch.float32, device=device)}
        for s in specs
    ]

    rows_per_pass = [batch_size]  # masked sequences per forward pass, halved on out-of-memory

    def presence(seqs: list[np.ndarray], slots: list[np.ndarray], folds: list[np.ndarray], override) -> torch.Tensor:
        """Return the expected presence (n_seqs, n_columns): each seq masked fold by fold at its slots."""
        rows, owner = [], []
        for k, (seq, pos, fold) in enumerate(zip(seqs, slots, folds, strict=True)):
            for f in np.unique(fold):
                masked = seq.copy()
                masked[pos[fold == f]] = mask_id
                rows.append(masked)
                owner.append(k)
        owner_arr = np.asarray(owner, dtype=np.int64)
        total = torch.zeros(len(seqs), len(columns), device=device)
        step = rows_per_pass[0]
        for start in range(0, len(rows), step):
            ids_np, mask_np = pad_tokens(rows[start : start + step], pad_id)
            batch_ids = torch.from_numpy(ids_np).to(device)
            attn = torch.from_numpy(mask_np).to(device)
            select = batch_ids == mask_id
            embeds = model.embed_tokens(batch_ids, dna_overrides=override) if override is not None else None
            logp = masked_log_probs(model, batch_ids, attn, select, inputs_embeds=embeds, exclude=exclude)
            probs = logp.exp()[:, cols_t]
            row_of = torch.nonzero(select)[:, 0] + start
            seq_of = torch.from_numpy(owner_arr).to(device)[row_of]
            total.index_add_(0, seq_of, probs)
        return total

    results_cells: list[list[np.ndarray]] = [[] for _ in specs]
    results_delta: list[list[np.ndarray]] = [[] for _ in specs]

    def shrink() -> bool:
        rows_per_pass[0], before = max(1, rows_per_pass[0] // 2), rows_per_pass[0]
        return rows_per_pass[0] < before

    def readout(batch: np.ndarray) -> list:
        return _readout_batch(
            batch, cells, ids, specs, evaluable, overrides, presence, special, gene, cls_id, eos_id, n_folds, seed
        )

    try:
        cells_per_batch = max(1, batch_size // max(1, n_folds))
        advice = (
            f"pass a smaller batch_size= (masked sequences per forward pass, now {batch_size}), fewer n_folds= (now "
            f"{n_folds}: each fold of a cell is one more sequence to run), or fewer cells per call (dta.tl.screen "
            "with checkpoint_dir= runs a long screen in resumable pieces)"
        )
        for _, out in length_sorted_batches(
            order, sorted_lengths, cells_per_batch, device, readout, desc=desc, on_oom=shrink, advice=advice
        ):
            for k, (rows, delta) in enumerate(out):
                if rows.size:
                    results_cells[k].append(rows)
                    results_delta[k].append(delta)
    finally:
        model.train(was_training)

    final = []
    gene_col = columns == gene
    for k in range(len(specs)):
        delta = (
            np.concatenate(results_delta[k]).astype(np.float32)
            if results_delta[k]
            else np.zeros((0, len(columns)), dtype=np.float32)
        )
        delta[:, gene_col] = np.nan
        rows = np.concatenate(results_cells[k]) if results_cells[k] else np.zeros(0, dtype=np.int64)
        final.append(ExpressionResult(cells=rows.astype(np.int64), tokens=columns.copy(), delta=delta))
    return final


def _readout_batch(
    batch, cells, ids, specs, evaluable, overrides, presence, special, gene, cls_id, eos_id, n_folds, seed
):
    """Readout of one batch of cells for every spec: list of (evaluated cell indices, delta rows)."""
    import torch

    seqs, slots, folds = [], [], []
    for i in batch:
        seq = cells[i]
        gene_pos = np.flatnonzero(~np.isin(seq, special) & (seq != gene))
        seqs.append(seq)
        slots.append(gene_pos)
        folds.append(fold_assignment(gene_pos.size, n_folds, seed, int(ids[i])))
    keep = [j for j, s in enumerate(slots) if s.size > 0]
    if not keep:
        return [(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)) for _ in specs]
    e0 = presence([seqs[j] for j in keep], [slots[j] for j in keep], [folds[j] for j in keep], None)
    out = []
    for k, (spec, override) in enumerate(zip(specs, overrides, strict=True)):
        pseqs, pslots, pfolds, prow = [], [], [], []
        for r, j in enumerate(keep):
            if not evaluable[k, batch[j]]:
                continue
            res = perturb_tokens(seqs[j], spec, special_ids=special, cls_id=cls_id, eos_id=eos_id, max_length=10**9)
            if res is None:
                continue
            pert, orig_pos, pert_pos = res
            # the perturbed positions of this cell's slots, fold by fold as in the original
            where = np.searchsorted(orig_pos, slots[j])
            pseqs.append(pert)
            pslots.append(pert_pos[where])
            pfolds.append(folds[j])
            prow.append(r)
        if not prow:
            out.append((np.zeros(0, dtype=np.int64), np.zeros((0, e0.shape[1]), dtype=np.float32)))
            continue
        e1 = presence(pseqs, pslots, pfolds, override)
        base = e0[torch.as_tensor(prow, device=e0.device)]
        tiny = torch.finfo(torch.float32).tiny
        delta = torch.log(e1.clamp_min(tiny)) - torch.log(base.clamp_min(tiny))
        out.append((np.asarray([batch[keep[r]] for r in prow], dtype=np.int64), delta.cpu().numpy()))
    return out
