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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sc_dta._settings import settings
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
    g = spec.token_id
    hits = np.flatnonzero(tokens == g)
    n = tokens.shape[0]
    positions = np.arange(n)
    keep = ~_is_special(tokens, special_ids)
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


#: A batch ends where a cell is shorter than this fraction of the batch's longest cell (bounds the padding).
#: On the CPU batching buys little (the matrices of one cell are already large), so padding is kept tighter.
MIN_FILL = {"cpu": 0.97, "default": 0.9}


def _batch_len(lengths_desc: np.ndarray, batch_size: int, min_fill: float = MIN_FILL["default"]) -> int:
    """Return the size of the next batch: at most ``batch_size``, padding bounded by ``1 - min_fill``."""
    n = min(batch_size, len(lengths_desc))
    if n <= 1:
        return n
    return max(1, int(np.count_nonzero(lengths_desc[:n] >= min_fill * lengths_desc[0])))


def _oom_error() -> tuple[type[BaseException], ...]:
    import torch

    errs = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        errs.append(torch.OutOfMemoryError)
    return tuple(errs)


def length_sorted_batches(
    order: np.ndarray,
    sorted_lengths: np.ndarray,
    batch_size: int,
    device: torch.device,
    process: Callable[[np.ndarray], Any],
    *,
    desc: str,
    on_oom: Callable[[], bool] | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(batch, process(batch))`` over the cells ``order`` (longest first), with a progress bar.

    Batches hold at most ``batch_size`` cells and are cut where the padding would exceed :data:`MIN_FILL`. Everything
    runs in one inference-mode and autocast region (autocast keeps its low-precision weight copies across batches).
    On out-of-memory the batch is halved and retried; a single cell that does not fit is retried only while
    ``on_oom`` (which may shrink something else, e.g. sequences per forward pass) returns True.
    """
    import torch
    from tqdm.auto import tqdm

    from sc_dta._utils import autocast

    oom = _oom_error()
    min_fill = MIN_FILL.get(device.type, MIN_FILL["default"])
    pos, bs = 0, batch_size
    with (
        torch.inference_mode(),
        autocast(device),
        tqdm(total=len(order), desc=desc, unit="cell", disable=not settings.progress) as bar,
    ):
        while pos < len(order):
            batch = order[pos : pos + _batch_len(sorted_lengths[pos:], bs, min_fill)]
            try:
                result = process(batch)
            except oom:
                shrunk = on_oom() if on_oom is not None else False
                if len(batch) == 1 and not shrunk:
                    raise
                bs = max(1, len(batch) // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning("Out of memory on %s; retrying with batch_size=%d.", device, bs)
                continue
            yield batch, result
            pos += len(batch)
            bar.update(len(batch))


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
    run goes on.

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
    """
    import torch

    from sc_dta._utils import autocast, resolve_device
    from sc_dta.models._forward import contextual_embeddings, resolve_emb_layer

    if forward is None:
        forward = contextual_embeddings
    if not specs:
        raise ValueError("run_perturbations: no perturbation given.")
    for s in specs:
        if s.kind not in ("delete", "overexpress", "embedding"):
            raise ValueError(f"kind: expected 'delete', 'overexpress' or 'embedding', got {s.kind!r}.")
        if s.kind == "embedding" and not hasattr(model, "embed_tokens"):
            raise TypeError(
                f"A DNA-embedding perturbation needs a BioDTA model with `embed_tokens`, got {type(model).__name__}."
            )
    if cell_emb not in ("auto", "cls", "mean"):
        raise ValueError(f"cell_emb: expected 'auto', 'cls' or 'mean', got {cell_emb!r}.")
    if overexpress_absent and max_length is None:
        raise ValueError("max_length is required to overexpress absent genes.")
    resolve_emb_layer(model, emb_layer)
    device = resolve_device(device)
    batch_size = settings.batch_size_cells if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}.")
    special = np.asarray(sorted({int(i) for i in special_ids if i is not None}), dtype=np.int64)
    max_len = int(max_length) if max_length is not None else 10**9

    n_cells = len(cells)
    cells = [np.asarray(c, dtype=np.int64) for c in cells]
    # which cells each spec evaluates (the perturbed tokens themselves are built batch by batch)
    evaluable = np.zeros((len(specs), n_cells), dtype=bool)
    for k, s in enumerate(specs):
        has = np.fromiter((bool(np.any(c == s.token_id)) for c in cells), dtype=bool, count=n_cells)
        evaluable[k] = has | (s.kind == "overexpress" and overexpress_absent)
    todo = np.flatnonzero(evaluable.any(axis=0))
    lengths = np.array([len(cells[i]) for i in todo], dtype=np.int64)
    order = todo[np.argsort(-lengths, kind="stable")]
    sorted_lengths = np.sort(lengths)[::-1]

    starts_with_cls = cls_id is not None and len(order) > 0 and all(cells[i][0] == cls_id for i in order)
    if cell_emb == "cls" and not starts_with_cls:
        raise ValueError("cell_emb='cls' needs every evaluated cell to start with the <cls> token.")
    use_cls = cell_emb != "mean" and starts_with_cls

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    if param is not None and param.device != device:
        model.to(device)

    # outputs, per spec
    out_cell: list[list[np.ndarray]] = [[] for _ in specs]
    out_tok: list[list[np.ndarray]] = [[] for _ in specs]
    out_shift: list[list[np.ndarray]] = [[] for _ in specs]
    cell_mean = np.full((len(specs), n_cells), np.nan, dtype=np.float32)
    cell_embs = np.full((len(specs), n_cells), np.nan, dtype=np.float32)
    evaluated = np.zeros((len(specs), n_cells), dtype=bool)

    overrides = [
        None
        if s.dna_override is None
        else {
            int(s.token_id): torch.as_tensor(
                np.asarray(s.dna_override), dtype=param.dtype if param is not None else torch.float32, device=device
            )
        }
        for s in specs
    ]

    def fwd(ids_np: np.ndarray, mask_np: np.ndarray, override: dict | None) -> torch.Tensor:
        ids = torch.from_numpy(ids_np).to(device)
        mask = torch.from_numpy(mask_np).to(device)
        with autocast(device):
            embeds = None
            if override is not None:
                embeds = model.embed_tokens(ids, dna_overrides=override)
            return forward(model, ids, mask, inputs_embeds=embeds, emb_layer=emb_layer)

    def process(batch: np.ndarray) -> list[tuple]:
        ids0, mask0 = pad_tokens([cells[i] for i in batch], pad_id)
        h0 = fwd(ids0, mask0, None)
        results = []
        for k, s in enumerate(specs):
            rows = [
                (j, perturb_tokens(cells[i], s, special_ids=special, cls_id=cls_id, eos_id=eos_id, max_length=max_len))
                for j, i in enumerate(batch)
                if evaluable[k, i]
            ]
            # a cell whose only gene token is the perturbed one has no affected gene: not evaluated
            rows = [r for r in rows if r[1] is not None and len(r[1][1])]
            if not rows:
                results.append(None)
                continue
            ids1, mask1 = pad_tokens([r[1][0] for r in rows], pad_id)
            h1 = fwd(ids1, mask1, overrides[k])
            b0 = np.concatenate([np.full(len(r[1][1]), r[0]) for r in rows]).astype(np.int64)
            b1 = np.concatenate([np.full(len(r[1][1]), j) for j, r in enumerate(rows)]).astype(np.int64)
            p0 = np.concatenate([r[1][1] for r in rows]).astype(np.int64)
            p1 = np.concatenate([r[1][2] for r in rows]).astype(np.int64)
            tb0, tb1 = torch.from_numpy(b0).to(device), torch.from_numpy(b1).to(device)
            a = h0[tb0, torch.from_numpy(p0).to(device)].float()
            c = h1[tb1, torch.from_numpy(p1).to(device)].float()
            shift = 1.0 - torch.nn.functional.cosine_similarity(a, c, dim=-1)
            n_rows = len(rows)
            counts = torch.bincount(tb1, minlength=n_rows).float()
            mean_shift = torch.zeros(n_rows, device=device).index_add_(0, tb1, shift) / counts
            if use_cls:
                e0 = h0[torch.tensor([r[0] for r in rows], device=device), 0].float()
                e1 = h1[:, 0].float()
            else:
                e0 = torch.zeros(n_rows, a.shape[1], device=device).index_add_(0, tb1, a) / counts[:, None]
                e1 = torch.zeros(n_rows, c.shape[1], device=device).index_add_(0, tb1, c) / counts[:, None]
            emb_shift = 1.0 - torch.nn.functional.cosine_similarity(e0, e1, dim=-1)
            toks = np.asarray(ids0[b0, p0])
            results.append(
                (
                    np.asarray(batch)[b0],
                    toks,
                    shift.cpu().numpy(),
                    np.asarray([batch[r[0]] for r in rows]),
                    mean_shift.cpu().numpy(),
                    emb_shift.cpu().numpy(),
                )
            )
        return results

    try:
        for _, results in length_sorted_batches(order, sorted_lengths, batch_size, device, process, desc=desc):
            for k, res in enumerate(results):
                if res is None:
                    continue
                rc, toks, sh, ec, ms, es = res
                out_cell[k].append(rc.astype(np.int32))
                out_tok[k].append(toks.astype(np.int32))
                out_shift[k].append(sh)
                cell_mean[k, ec] = ms
                cell_embs[k, ec] = es
                evaluated[k, ec] = True
    finally:
        model.train(was_training)

    mode = "cls" if use_cls else "mean"
    final = []
    for k in range(len(specs)):
        final.append(
            ShiftResult(
                cell=_cat(out_cell[k], np.int32),
                token=_cat(out_tok[k], np.int32),
                shift=_cat(out_shift[k], np.float32),
                cell_mean=cell_mean[k],
                cell_emb=cell_embs[k],
                evaluated=evaluated[k],
                cell_emb_mode=mode,
            )
        )
    return final


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
