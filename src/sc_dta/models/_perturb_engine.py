"""In-silico perturbation engine on token-id arrays (no AnnData here).

For each cell it runs the model once on the original tokens and once per perturbation
("variant"), and compares the contextual embeddings of the genes present in both versions,
pairing them position by position after removing the perturbed gene, exactly like Geneformer's
``InSilicoPerturber``:

``delete``
    the gene's token is removed.
``overexpress``
    the gene's token is moved to the front (after ``<cls>`` when the cell starts with one). If the
    gene is absent (only with ``overexpress_absent=True``) it is inserted there and the sequence is
    trimmed back to ``max_length`` (keeping ``<eos>``), and the original is compared only on the
    genes that survive the trimming.
``embedding``
    same tokens; the gene's input embedding is replaced by the adapter output of a given DNA
    embedding (``BioDTA.embed_tokens(..., dna_overrides={token_id: vector})``).

``<cls>``/``<eos>`` (and any special token) are never affected genes. The shift of a gene is
``1 - cos`` (float32) of its original and perturbed embeddings; per cell we return the mean gene
shift and the shift of the cell embedding (the ``<cls>`` vector when both versions start with
``<cls>`` and ``cell_emb="auto"``/``"cls"``, else the mean over the paired gene embeddings).

How :func:`run_perturbations` is put together: :func:`_plan` decides which cells each spec evaluates and in which
order they run (:class:`_Plan`); :func:`~sc_dta.models._batches.length_sorted_batches` cuts them into batches
(and handles out-of-memory); per batch, :class:`_Batch` runs the original forward once and, for each spec,
:func:`perturbed_batch` builds the perturbed cells (:class:`PerturbedBatch`) and :func:`batch_shifts` compares the
two forwards (:class:`BatchShifts`); :class:`_Collector` gathers the batches into one :class:`ShiftResult` per spec.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from sc_dta._settings import settings
from sc_dta.models._batches import MIN_FILL, length_sorted_batches
from sc_dta.models._padding import pad_tokens

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("delete", "overexpress")


@dataclass
class PerturbSpec:
    """One perturbation of one gene token.

    Parameters
    ----------
    kind
        ``"delete"``, ``"overexpress"`` or ``"embedding"``.
    token_id
        The perturbed gene's token id.
    dna_override
        For ``"embedding"``: the DNA embedding (``d_dna``) passed to ``model.embed_tokens`` as
        ``dna_overrides={token_id: dna_override}``.
    """

    kind: str
    token_id: int
    dna_override: object | None = None


@dataclass
class ShiftResult:
    """Shifts of one perturbation over the evaluated cells.

    ``cell`` / ``token`` / ``shift`` are parallel arrays over (cell, affected gene) pairs; ``cell``
    indexes the input list of cells. Per-cell arrays have one entry per input cell (NaN when the
    cell was not evaluated).
    """

    cell: np.ndarray
    token: np.ndarray
    shift: np.ndarray
    cell_mean: np.ndarray
    cell_emb: np.ndarray
    evaluated: np.ndarray
    cell_emb_mode: str = "mean"
    extra: dict = field(default_factory=dict)


def _is_special(tokens: np.ndarray, special_ids: np.ndarray) -> np.ndarray:
    return np.isin(tokens, special_ids)


def perturb_tokens(
    tokens: np.ndarray,
    spec: PerturbSpec,
    *,
    special_ids: np.ndarray,
    cls_id: int | None,
    eos_id: int | None,
    max_length: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Perturbed tokens of one cell and the paired positions.

    Returns ``(perturbed_tokens, original_positions, perturbed_positions)`` where the two position
    arrays pair the affected genes (the perturbed gene and special tokens excluded), or None when
    the cell cannot be perturbed (gene absent for ``delete``/``embedding``/``overexpress``).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    return _perturb(tokens, _is_special(tokens, special_ids), spec, cls_id, eos_id, max_length)


def _perturb(
    tokens: np.ndarray, special: np.ndarray, spec: PerturbSpec, cls_id: int | None, eos_id: int | None, max_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`perturb_tokens` of int64 ``tokens`` whose special positions ``special`` are known."""
    g = spec.token_id
    hits = np.flatnonzero(tokens == g)
    n = tokens.shape[0]
    positions = np.arange(n)
    keep = ~special
    start = 1 if (cls_id is not None and n > 0 and tokens[0] == cls_id) else 0
    if spec.kind in ("delete", "embedding") or (spec.kind == "overexpress" and hits.size):
        if hits.size == 0:
            return None
        keep[hits] = False
        orig = positions[keep]
        before = np.searchsorted(hits, orig)  # copies of the gene before each kept position
        if spec.kind == "delete":
            pert_tokens = np.delete(tokens, hits)
            pert = orig - before
        elif spec.kind == "embedding":
            pert_tokens = tokens
            pert = orig
        else:  # overexpress, gene present: move it to the front (after <cls>)
            pert_tokens = np.concatenate([tokens[:start], [g], np.delete(tokens, hits)[start:]])
            pert = orig - before + (orig >= start)
        return pert_tokens, orig, pert
    if spec.kind == "overexpress":  # gene absent: insert and trim back to max_length
        pert_tokens = np.concatenate([tokens[:start], [g], tokens[start:]])
        if pert_tokens.shape[0] > max_length:
            has_eos = eos_id is not None and tokens[-1] == eos_id
            if has_eos:
                pert_tokens = np.concatenate([pert_tokens[: max_length - 1], pert_tokens[-1:]])
            else:
                pert_tokens = pert_tokens[:max_length]
        orig = positions[keep]
        pert = np.where(orig >= start, orig + 1, orig)
        ok = pert < pert_tokens.shape[0]
        ok[ok] &= pert_tokens[pert[ok]] == tokens[orig[ok]]
        return pert_tokens, orig[ok], pert[ok]
    raise ValueError(f"kind: expected 'delete', 'overexpress' or 'embedding', got {spec.kind!r}.")


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Vocab:
    """The vocabulary facts the engine needs."""

    special: np.ndarray  # sorted int64 ids that are never affected genes
    pad_id: int
    cls_id: int | None
    eos_id: int | None
    max_length: int  # only used to trim an inserted gene


@dataclass(frozen=True)
class _Plan:
    """Which cells are run, in which order, and how their cell embedding is read.

    Attributes
    ----------
    cells
        int64 token ids of every input cell.
    evaluable
        ``(n_specs, n_cells)``: whether a spec evaluates a cell (it holds the gene, or the gene is inserted).
    order
        The cells evaluable by any spec, longest first (stable).
    sorted_lengths
        Their token counts, in that order.
    use_cls
        Whether the cell embedding is the ``<cls>`` vector (else the mean of the paired gene embeddings).
    """

    cells: list[np.ndarray]
    evaluable: np.ndarray
    order: np.ndarray
    sorted_lengths: np.ndarray
    use_cls: bool

    @property
    def cell_emb_mode(self) -> str:
        """``"cls"`` or ``"mean"`` (:attr:`ShiftResult.cell_emb_mode`)."""
        return "cls" if self.use_cls else "mean"


def holds_tokens(cells: Sequence[np.ndarray], token_ids: np.ndarray, *, block: int = 4096) -> np.ndarray:
    """``(len(token_ids), len(cells))``: whether each cell holds each token.

    One vectorised pass over the tokens of ``block`` cells at a time (memory bounded by the block, not the cells).
    """
    uniq, index = np.unique(np.asarray(token_ids, dtype=np.int64), return_inverse=True)
    out = np.zeros((len(uniq), len(cells)), dtype=bool)
    for start in range(0, len(cells), block):
        part = [np.asarray(c, dtype=np.int64) for c in cells[start : start + block]]
        flat = np.concatenate(part)
        owner = np.repeat(np.arange(start, start + len(part)), [len(c) for c in part])
        pos = np.searchsorted(uniq, flat)
        found = pos < len(uniq)
        found[found] &= uniq[pos[found]] == flat[found]
        out[pos[found], owner[found]] = True
    return out[index.reshape(-1)]


def _plan(
    cells: list[np.ndarray],
    specs: Sequence[PerturbSpec],
    *,
    cls_id: int | None,
    cell_emb: str,
    overexpress_absent: bool,
) -> _Plan:
    """Return the :class:`_Plan` of a run (raises if ``cell_emb="cls"`` cannot be honoured)."""
    evaluable = holds_tokens(cells, np.asarray([int(s.token_id) for s in specs], dtype=np.int64))
    if overexpress_absent:
        evaluable[[k for k, s in enumerate(specs) if s.kind == "overexpress"]] = True
    todo = np.flatnonzero(evaluable.any(axis=0))
    lengths = np.array([len(cells[i]) for i in todo], dtype=np.int64)
    order = todo[np.argsort(-lengths, kind="stable")]
    sorted_lengths = np.sort(lengths)[::-1]
    starts_with_cls = (
        cls_id is not None and len(order) > 0 and all(len(cells[i]) > 0 and cells[i][0] == cls_id for i in order)
    )
    if cell_emb == "cls" and not starts_with_cls:
        raise ValueError("cell_emb='cls' needs every evaluated cell to start with the <cls> token.")
    return _Plan(cells, evaluable, order, sorted_lengths, use_cls=cell_emb != "mean" and starts_with_cls)


# --------------------------------------------------------------------------------------------- one batch


class _Forward:
    """The model's contextual embeddings of a padded numpy batch, on the device."""

    def __init__(self, model: nn.Module, device: torch.device, forward: Callable, emb_layer: int) -> None:
        self.model, self.device, self.forward, self.emb_layer = model, device, forward, emb_layer

    def __call__(self, ids_np: np.ndarray, mask_np: np.ndarray, override: dict | None = None) -> torch.Tensor:
        """``(batch, seq, hidden)`` embeddings of ``ids_np``; ``override``: DNA embeddings for ``embed_tokens``."""
        import torch

        from sc_dta._utils import autocast

        ids = torch.from_numpy(ids_np).to(self.device)
        mask = torch.from_numpy(mask_np).to(self.device)
        with autocast(self.device):
            embeds = None
            if override is not None:
                embeds = self.model.embed_tokens(ids, dna_overrides=override)
            return self.forward(self.model, ids, mask, inputs_embeds=embeds, emb_layer=self.emb_layer)


@dataclass
class PerturbedBatch:
    """One spec's perturbed version of the evaluated cells of a batch, and how its genes pair with the original.

    Attributes
    ----------
    rows
        Row in the batch of each evaluated cell (cells lacking the gene, or whose only gene it is, are left out).
    ids, mask
        The perturbed tokens, padded (one row per evaluated cell).
    pair_row
        For each (cell, affected gene) pair: its row in ``ids``.
    orig_pos, pert_pos
        The gene's position in the original and in the perturbed cell.
    """

    rows: np.ndarray
    ids: np.ndarray
    mask: np.ndarray
    pair_row: np.ndarray
    orig_pos: np.ndarray
    pert_pos: np.ndarray


def perturbed_batch(
    tokens: Sequence[np.ndarray], special: Sequence[np.ndarray], spec: PerturbSpec, evaluable: np.ndarray, vocab: _Vocab
) -> PerturbedBatch | None:
    """Perturb the cells of a batch by ``spec``; None when none of them is evaluated.

    Parameters
    ----------
    tokens
        The batch's cells (int64 token ids).
    special
        Per cell, which positions hold a special token.
    spec
        The perturbation.
    evaluable
        Per cell, whether ``spec`` evaluates it (:attr:`_Plan.evaluable`).
    vocab
        Vocabulary facts.
    """
    rows, seqs, orig, pert = [], [], [], []
    for j, (cell, spc) in enumerate(zip(tokens, special, strict=True)):
        if not evaluable[j]:
            continue
        res = _perturb(cell, spc, spec, vocab.cls_id, vocab.eos_id, vocab.max_length)
        # a cell whose only gene token is the perturbed one has no affected gene: not evaluated
        if res is None or not len(res[1]):
            continue
        rows.append(j)
        seqs.append(res[0])
        orig.append(res[1])
        pert.append(res[2])
    if not rows:
        return None
    ids, mask = pad_tokens(seqs, vocab.pad_id)
    return PerturbedBatch(
        rows=np.asarray(rows, dtype=np.int64),
        ids=ids,
        mask=mask,
        pair_row=np.repeat(np.arange(len(rows), dtype=np.int64), [len(o) for o in orig]),
        orig_pos=np.concatenate(orig).astype(np.int64),
        pert_pos=np.concatenate(pert).astype(np.int64),
    )


@dataclass
class BatchShifts:
    """Shifts of one spec on one batch.

    Attributes
    ----------
    pair_cell, pair_token, pair_shift
        Per (cell, affected gene) pair: the input cell's index, the gene's token id and its shift ``1 - cos``.
    cells
        The evaluated input cells.
    cell_mean
        Their mean gene shift.
    cell_emb
        Their cell-embedding shift.
    """

    pair_cell: np.ndarray
    pair_token: np.ndarray
    pair_shift: np.ndarray
    cells: np.ndarray
    cell_mean: np.ndarray
    cell_emb: np.ndarray


def batch_shifts(
    batch: np.ndarray, ids0: np.ndarray, h0: torch.Tensor, pert: PerturbedBatch, h1: torch.Tensor, use_cls: bool
) -> BatchShifts:
    """Compare the original and perturbed embeddings of a batch.

    Parameters
    ----------
    batch
        Input-cell index of each row of ``ids0``.
    ids0, h0
        The original tokens (padded) and their embeddings.
    pert, h1
        The perturbed batch and its embeddings.
    use_cls
        Cell embedding = the ``<cls>`` vector (else the mean over the paired gene embeddings).
    """
    import torch
    from torch.nn.functional import cosine_similarity

    device = h0.device
    b0 = pert.rows[pert.pair_row]
    tb0 = torch.from_numpy(b0).to(device)
    tb1 = torch.from_numpy(pert.pair_row).to(device)
    a = h0[tb0, torch.from_numpy(pert.orig_pos).to(device)].float()
    c = h1[tb1, torch.from_numpy(pert.pert_pos).to(device)].float()
    shift = 1.0 - cosine_similarity(a, c, dim=-1)
    n_rows = len(pert.rows)
    counts = torch.bincount(tb1, minlength=n_rows).float()
    mean_shift = torch.zeros(n_rows, device=device).index_add_(0, tb1, shift) / counts
    if use_cls:
        e0 = h0[torch.tensor(pert.rows.tolist(), device=device), 0].float()
        e1 = h1[:, 0].float()
    else:
        e0 = torch.zeros(n_rows, a.shape[1], device=device).index_add_(0, tb1, a) / counts[:, None]
        e1 = torch.zeros(n_rows, c.shape[1], device=device).index_add_(0, tb1, c) / counts[:, None]
    emb_shift = 1.0 - cosine_similarity(e0, e1, dim=-1)
    batch = np.asarray(batch)
    return BatchShifts(
        pair_cell=batch[b0],
        pair_token=np.asarray(ids0[b0, pert.orig_pos]),
        pair_shift=shift.cpu().numpy(),
        cells=batch[pert.rows],
        cell_mean=mean_shift.cpu().numpy(),
        cell_emb=emb_shift.cpu().numpy(),
    )


class _Batch:
    """Runs every spec on one batch of cells: one original forward, one forward per spec that evaluates a cell."""

    def __init__(self, plan: _Plan, specs: Sequence[PerturbSpec], vocab: _Vocab, fwd: _Forward, overrides: list):
        self.plan, self.specs, self.vocab, self.fwd, self.overrides = plan, specs, vocab, fwd, overrides

    def __call__(self, batch: np.ndarray) -> list[BatchShifts | None]:
        """Return one :class:`BatchShifts` per spec (None where the spec evaluates none of the cells)."""
        tokens = [self.plan.cells[i] for i in batch]
        ids0, mask0 = pad_tokens(tokens, self.vocab.pad_id)
        h0 = self.fwd(ids0, mask0)
        special = [_is_special(c, self.vocab.special) for c in tokens]
        out: list[BatchShifts | None] = []
        for k, spec in enumerate(self.specs):
            pert = perturbed_batch(tokens, special, spec, self.plan.evaluable[k, batch], self.vocab)
            if pert is None:
                out.append(None)
                continue
            h1 = self.fwd(pert.ids, pert.mask, self.overrides[k])
            out.append(batch_shifts(batch, ids0, h0, pert, h1, self.plan.use_cls))
        return out


# --------------------------------------------------------------------------------------------- the results


class _Collector:
    """Collects the :class:`BatchShifts` of every batch into one :class:`ShiftResult` per spec."""

    def __init__(self, n_specs: int, n_cells: int) -> None:
        self.cell: list[list[np.ndarray]] = [[] for _ in range(n_specs)]
        self.token: list[list[np.ndarray]] = [[] for _ in range(n_specs)]
        self.shift: list[list[np.ndarray]] = [[] for _ in range(n_specs)]
        self.cell_mean = np.full((n_specs, n_cells), np.nan, dtype=np.float32)
        self.cell_emb = np.full((n_specs, n_cells), np.nan, dtype=np.float32)
        self.evaluated = np.zeros((n_specs, n_cells), dtype=bool)

    def add(self, k: int, s: BatchShifts) -> None:
        """Add spec ``k``'s shifts on one batch."""
        self.cell[k].append(s.pair_cell.astype(np.int32))
        self.token[k].append(s.pair_token.astype(np.int32))
        self.shift[k].append(s.pair_shift)
        self.cell_mean[k, s.cells] = s.cell_mean
        self.cell_emb[k, s.cells] = s.cell_emb
        self.evaluated[k, s.cells] = True

    def results(self, cell_emb_mode: str) -> list[ShiftResult]:
        """One :class:`ShiftResult` per spec, in order."""
        return [
            ShiftResult(
                cell=_cat(self.cell[k], np.int32),
                token=_cat(self.token[k], np.int32),
                shift=_cat(self.shift[k], np.float32),
                cell_mean=self.cell_mean[k],
                cell_emb=self.cell_emb[k],
                evaluated=self.evaluated[k],
                cell_emb_mode=cell_emb_mode,
            )
            for k in range(len(self.cell))
        ]


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


# --------------------------------------------------------------------------------------------- public


def _check_specs(model: nn.Module, specs: Sequence[PerturbSpec]) -> None:
    if not specs:
        raise ValueError("run_perturbations: no perturbation given.")
    for s in specs:
        if s.kind not in ("delete", "overexpress", "embedding"):
            raise ValueError(f"kind: expected 'delete', 'overexpress' or 'embedding', got {s.kind!r}.")
        if s.kind == "embedding" and not hasattr(model, "embed_tokens"):
            raise TypeError(
                f"A DNA-embedding perturbation needs a BioDTA model with `embed_tokens`, got {type(model).__name__}."
            )


def _overrides(specs: Sequence[PerturbSpec], dtype: torch.dtype, device: torch.device) -> list[dict | None]:
    """``dna_overrides`` of each spec, as tensors on the device (None for token perturbations)."""
    import torch

    return [
        None
        if s.dna_override is None
        else {int(s.token_id): torch.as_tensor(np.asarray(s.dna_override), dtype=dtype, device=device)}
        for s in specs
    ]


#: What to change when the engine runs out of (non-CUDA) memory (formatted with the batch size).
ADVICE = (
    "pass a smaller batch_size= (now {batch_size}), or fewer cells per call (dta.tl.screen with checkpoint_dir= runs "
    "a long screen in resumable pieces)"
)


def run_perturbations(
    model: nn.Module,
    cells: Sequence[np.ndarray],
    specs: Sequence[PerturbSpec],
    *,
    special_ids: Sequence[int],
    pad_id: int = 0,
    cls_id: int | None = None,
    eos_id: int | None = None,
    max_length: int | None = None,
    emb_layer: int = -1,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    cell_emb: Literal["auto", "cls", "mean"] = "auto",
    overexpress_absent: bool = False,
    desc: str = "perturbing",
    forward: Callable | None = None,
) -> list[ShiftResult]:
    """Run all ``specs`` on ``cells``, computing each cell's unperturbed forward once.

    Cells are processed longest first in batches padded to their longest member; a batch holds at
    most ``batch_size`` cells and is cut earlier where a cell is shorter than 90% (97% on the CPU) of
    its longest one, so padding never costs more than ~10% (3%). On CUDA out-of-memory the batch size is halved and the
    run goes on; any other allocation failure raises a :class:`MemoryError` saying what to change.

    Parameters
    ----------
    model
        ``BertForMaskedLM`` or ``BioDTA``.
    cells
        Token ids per cell (with special tokens).
    specs
        Perturbations; all must concern the same gene token unless it does not matter to you that
        a cell is evaluated when it holds any of them.
    special_ids
        Ids that are never affected genes (pad, mask, cls, eos).
    pad_id, cls_id, eos_id, max_length
        Vocabulary facts; ``max_length`` is needed only for overexpressing an absent gene.
    emb_layer
        Layer to compare (0 last, -1 second-to-last).
    batch_size
        Cells per forward pass (default ``settings.batch_size_cells``).
    device
        Compute device (default ``settings.device``).
    cell_emb
        Cell embedding used for the cell-level shift: ``"cls"`` the ``<cls>`` vector (requires it),
        ``"mean"`` the mean of the paired gene embeddings, ``"auto"`` ``<cls>`` when the cells start
        with one (Geneformer V2) else the mean (V1).
    overexpress_absent
        Whether ``overexpress`` also inserts the gene into cells that lack it (Geneformer's
        behaviour for genes not expressed), trimming to ``max_length``.
    desc
        Progress-bar label.
    forward
        Override of :func:`sc_dta.models._forward.contextual_embeddings` (same signature).

    Returns
    -------
    One :class:`ShiftResult` per spec, in order.

    Raises
    ------
    MemoryError
        When an allocation fails on a device other than CUDA (see :func:`sc_dta.models._batches.is_memory_error`).
    """
    import torch

    from sc_dta._utils import resolve_device
    from sc_dta.models._forward import contextual_embeddings, resolve_emb_layer

    _check_specs(model, specs)
    if cell_emb not in ("auto", "cls", "mean"):
        raise ValueError(f"cell_emb: expected 'auto', 'cls' or 'mean', got {cell_emb!r}.")
    if overexpress_absent and max_length is None:
        raise ValueError("max_length is required to overexpress absent genes.")
    resolve_emb_layer(model, emb_layer)
    device = resolve_device(device)
    batch_size = settings.batch_size_cells if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}.")
    vocab = _Vocab(
        special=np.asarray(sorted({int(i) for i in special_ids if i is not None}), dtype=np.int64),
        pad_id=pad_id,
        cls_id=cls_id,
        eos_id=eos_id,
        max_length=int(max_length) if max_length is not None else 10**9,
    )
    plan = _plan(
        [np.asarray(c, dtype=np.int64) for c in cells],
        specs,
        cls_id=cls_id,
        cell_emb=cell_emb,
        overexpress_absent=overexpress_absent,
    )

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    if param is not None and param.device != device:
        model.to(device)
    overrides = _overrides(specs, param.dtype if param is not None else torch.float32, device)
    run_batch = _Batch(
        plan, specs, vocab, _Forward(model, device, forward or contextual_embeddings, emb_layer), overrides
    )
    collect = _Collector(len(specs), len(plan.cells))
    try:
        for _, results in length_sorted_batches(
            plan.order,
            plan.sorted_lengths,
            batch_size,
            device,
            run_batch,
            desc=desc,
            min_fill=MIN_FILL,
            advice=ADVICE.format(batch_size=batch_size),
        ):
            for k, res in enumerate(results):
                if res is not None:
                    collect.add(k, res)
    finally:
        model.train(was_training)
    return collect.results(plan.cell_emb_mode)
