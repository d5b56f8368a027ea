"""The masked-gene training loop behind :func:`sc_dta.tl.train_adapter` (tensors and token arrays only).

Pieces: :class:`Masker` (BERT masking of gene tokens), :func:`length_grouped_batches` (the sampler),
:func:`masked_batches` (fixed masks for held-out cells), :func:`held_out_loss` and :func:`context_gain`
(diagnostics), :func:`linear_warmup_decay` (learning-rate schedule), and :class:`Trainer`, the loop itself, whose
:class:`Progress` is what a checkpoint saves.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sc_dta._utils import autocast
from sc_dta.models._padding import pad_tokens

if TYPE_CHECKING:
    import torch

    from sc_dta._distributed import Distributed
    from sc_dta.models.biodta import BioDTA

logger = logging.getLogger(__name__)

#: Batches per length-sorted group of the sampler (as in transformers' LengthGroupedSampler).
MEGA_BATCH = 50


def length_grouped_batches(
    cells: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle, sort by length (longest first) within mega-batches, cut into batches; longest batch first."""
    perm = rng.permutation(cells)
    mega = batch_size * MEGA_BATCH
    batches: list[np.ndarray] = []
    for start in range(0, perm.size, mega):
        chunk = perm[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, chunk.size, batch_size)]
    if batches:
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


class Masker:
    """BERT masking of gene tokens: choose ``mask_prob`` of them (at least one per cell), then 80/10/10.

    Of the chosen tokens ``replace_mask`` are replaced by ``<mask>``, ``replace_random`` by a random gene
    token and the rest left unchanged (BERT: 0.8 / 0.1). Held-out cells use ``replace_mask=1``: a loss that
    counts tokens left in place would reward copying the input.
    """

    def __init__(
        self,
        special: np.ndarray,
        pad_id: int,
        mask_id: int,
        gene_ids: torch.Tensor,
        mask_prob: float,
        *,
        replace_mask: float = 0.8,
        replace_random: float = 0.1,
    ):
        import torch

        self.special = torch.as_tensor(np.union1d(special, [pad_id]))
        self.pad_id, self.mask_id, self.gene_ids, self.mask_prob = pad_id, mask_id, gene_ids, mask_prob
        self.replace_mask, self.replace_random = replace_mask, replace_random

    def __call__(self, batch: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked inputs, labels (-100 = not predicted) and attention mask of a padded batch."""
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
        to_mask = chosen & (action < self.replace_mask)
        to_random = chosen & (action >= self.replace_mask) & (action < self.replace_mask + self.replace_random)
        inputs = ids.clone()
        inputs[to_mask] = self.mask_id
        random_ids = self.gene_ids[torch.randint(len(self.gene_ids), ids.shape, generator=gen)]
        inputs[to_random] = random_ids[to_random]
        return inputs, labels, attn


def masked_batches(
    seqs: Sequence[np.ndarray], lengths: np.ndarray, cells: np.ndarray, batch_size: int, masker: Masker, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mask held-out cells once (own generator: the same every epoch, training RNG untouched)."""
    import torch

    if cells.size == 0:
        return []
    gen = torch.Generator().manual_seed(seed + 1)
    ordered = cells[np.argsort(-lengths[cells], kind="stable")]
    return [
        masker(pad_tokens([seqs[c] for c in ordered[i : i + batch_size]], masker.pad_id)[0], gen)
        for i in range(0, ordered.size, batch_size)
    ]


def held_out_loss(bio: BioDTA, batches: list, dev: torch.device, dist: Distributed | None = None) -> float:
    """Mean masked-gene cross-entropy (nats) over ``batches``, in eval mode (train/eval flags restored).

    With an active ``dist`` the batches are shared out by token count, each process evaluates its own and the sums
    are reduced: every process returns the same loss, that of all ``batches``.
    """
    import torch

    mine = range(len(batches))
    if dist is not None and dist.active:
        mine = dist.shard(np.asarray([int(attn.sum()) for _, _, attn in batches], dtype=np.int64))
    was_training = {m: m.training for m in (bio.adapter, bio.backbone)}
    bio.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in mine:
            inputs, labels, attn = batches[i]
            with autocast(dev):
                loss = bio.masked_lm_loss(inputs.to(dev), labels.to(dev), attn.to(dev), reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    for m, flag in was_training.items():
        m.train(flag)
    if dist is not None and dist.active:
        total, count = (float(v) for v in dist.all_reduce([total, count]))
    return total / max(count, 1)


def shuffled_context(
    batches: list, gene_ids: np.ndarray, frequencies: np.ndarray, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Return the same masked batches with every visible gene token replaced by a gene drawn from ``frequencies``.

    Masked positions, labels and lengths are kept; the context loses everything it said about the cell.
    """
    import torch

    rng = np.random.default_rng([seed, 7])
    p = frequencies / frequencies.sum()
    out = []
    for inputs, labels, attn in batches:
        ids = inputs.numpy().copy()
        visible = np.isin(ids, gene_ids) & (labels.numpy() == -100)
        ids[visible] = rng.choice(gene_ids, size=int(visible.sum()), p=p)
        out.append((torch.from_numpy(ids), labels, attn))
    return out


def context_gain(
    bio: BioDTA, batches: list, shuffled: list, dev: torch.device, dist: Distributed | None = None
) -> tuple[float, float, float]:
    """``(gain, loss_real, loss_shuffled)``: how many nats per masked gene the real context is worth."""
    real = held_out_loss(bio, batches, dev, dist)
    fake = held_out_loss(bio, shuffled, dev, dist)
    return fake - real, real, fake


def data_parallel(bio: BioDTA, device: torch.device):
    """Wrap ``bio``'s masked-gene loss in :class:`~torch.nn.parallel.DistributedDataParallel`.

    The wrapper's ``forward(input_ids, labels, attention_mask)`` returns ``bio.masked_lm_loss(..., reduction="sum")``.
    Building it broadcasts the main process's parameters and buffers, so every process starts from its weights.
    ``device_ids`` is the CUDA device on GPUs (gloo on CPUs needs none); buffers (the DNA table) are not
    re-broadcast at every forward: training does not change them.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class MaskedLMLoss(torch.nn.Module):
        def __init__(self, model: BioDTA) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels, attention_mask):
            return self.model.masked_lm_loss(input_ids, labels, attention_mask, reduction="sum")

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    # buffers synced once, at construction, not at every forward (torch >= 2.13 names it forward_sync_buffers)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_forward_sync = {"forward_sync_buffers": False}
    else:  # pragma: no cover - torch < 2.13
        no_forward_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(MaskedLMLoss(bio), device_ids=ids, **no_forward_sync)


def train_mode(bio: BioDTA, freeze_backbone: bool) -> None:
    """Training mode; a frozen backbone runs as at inference (no dropout)."""
    bio.train()
    if freeze_backbone:
        bio.backbone.eval()
    bio.adapter.train()


def linear_warmup_decay(warmup: int, total: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


@dataclass
class Progress:
    """Where a training run stands: the state a checkpoint saves and a resumed run restores."""

    step: int = 0
    epoch: int = 0
    group: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"loss": math.inf, "epoch": -1, "weights": None, "bad_epochs": 0})
    stopped: bool = False


class Trainer:
    """The masked-gene training loop: epochs of length-grouped batches, accumulation, held-out loss, early stopping.

    Parameters
    ----------
    bio
        The model (on ``device``), with the parameters to train set ``requires_grad``.
    optimizer, scheduler
        AdamW and its learning-rate schedule.
    masker, mask_gen
        Masking of training batches and its generator (part of the checkpointed random state).
    seqs, lengths, train_cells
        Token ids per cell, their lengths, and the training cells.
    batch_size, accumulation_steps, epochs, max_grad_norm, freeze_backbone, seed, device
        Run settings (see :func:`sc_dta.tl.train_adapter`).
    val_batches, early_stopping, min_epochs
        Held-out batches (fixed masks), the patience in epochs (None: no early stopping) and the epochs always
        trained before early stopping may end the run.
    checkpoint
        Called as ``checkpoint(progress, rng_state)`` to save a checkpoint (None: no checkpoints).
    stop_after_steps
        Interrupt after this many steps (tests of resuming).
    dist
        The :mod:`torch.distributed` process group (:class:`sc_dta._distributed.Distributed`). When active, the
        model runs inside :class:`~torch.nn.parallel.DistributedDataParallel`; every process draws the same global
        batches and masks and computes the loss of its own slice of each, scaled so that the averaged gradient is
        the one-process gradient of the global batch; held-out losses are shared out and reduced. Dropout draws
        differ per process (seeded by seed, rank and step).
    """

    def __init__(
        self,
        bio,
        optimizer,
        scheduler,
        masker: Masker,
        mask_gen,
        *,
        seqs: Sequence[np.ndarray],
        lengths: np.ndarray,
        train_cells: np.ndarray,
        batch_size: int,
        accumulation_steps: int,
        epochs: int,
        max_grad_norm: float | None,
        freeze_backbone: bool,
        seed: int,
        device,
        val_batches: list,
        early_stopping: int | None,
        min_epochs: int = 0,
        checkpoint=None,
        stop_after_steps: int | None = None,
        dist: Distributed | None = None,
    ) -> None:
        self.bio, self.optimizer, self.scheduler = bio, optimizer, scheduler
        self.masker, self.mask_gen = masker, mask_gen
        self.seqs, self.lengths, self.train_cells = seqs, lengths, train_cells
        self.batch_size, self.accumulation_steps, self.epochs = batch_size, accumulation_steps, epochs
        self.max_grad_norm, self.freeze_backbone, self.seed, self.device = max_grad_norm, freeze_backbone, seed, device
        self.val_batches, self.early_stopping, self.min_epochs = val_batches, early_stopping, min_epochs
        self.checkpoint, self.stop_after_steps = checkpoint, stop_after_steps
        self.params = [p for p in bio.parameters() if p.requires_grad]
        self.cuda_devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
        self.n_tokens = 0
        self._running: float | None = None
        self.dist = dist if dist is not None and dist.active else None
        self.ddp = data_parallel(bio, device) if self.dist is not None else None

    def rng_state(self) -> dict:
        """Random states to checkpoint."""
        from sc_dta.tl._checkpoint import get_rng_state

        return get_rng_state(self.mask_gen, self.cuda_devices)

    def groups(self, epoch: int) -> list[list[np.ndarray]]:
        """Cut an epoch into optimiser steps: groups of ``accumulation_steps`` length-grouped batches."""
        batches = length_grouped_batches(
            self.train_cells, self.lengths, self.batch_size, np.random.default_rng([self.seed, 2, epoch])
        )
        k = self.accumulation_steps
        return [batches[i : i + k] for i in range(0, len(batches), k)]

    def step(self, group: list[np.ndarray], index: int = 0) -> float:
        """One optimiser step over the micro-batches of ``group``; returns the mean loss per masked gene.

        ``index`` (the number of steps before this one) seeds the dropout of this process when distributed.
        """
        import torch

        micro = [
            self.masker(pad_tokens([self.seqs[c] for c in b], self.masker.pad_id)[0], self.mask_gen) for b in group
        ]
        n_masked = sum(int((lab != -100).sum()) for _, lab, _ in micro)  # of the global batches: every process
        scale = 1.0
        if self.dist is not None:
            scale = float(self.dist.size)  # DDP averages the gradients of the processes: their sum is wanted
            self._seed_dropout(index)
        loss_total = 0.0
        for k, batch in enumerate(micro):
            inputs, labels, attn = self._own_rows(*batch) if self.dist is not None else batch
            inputs, labels, attn = inputs.to(self.device), labels.to(self.device), attn.to(self.device)
            sync = self.ddp is None or k == len(micro) - 1  # all-reduce the gradients once per optimiser step
            with nullcontext() if sync else self.ddp.no_sync():
                with autocast(self.device):
                    if self.ddp is not None:
                        loss = self.ddp(inputs, labels, attn)
                    else:
                        loss = self.bio.masked_lm_loss(inputs, labels, attn, reduction="sum")
                (loss * scale / n_masked if scale != 1.0 else loss / n_masked).backward()
            loss_total += float(loss.detach())
            self.n_tokens += int(attn.sum())
        if self.dist is not None:
            loss_total = float(self.dist.all_reduce(loss_total))
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total / n_masked

    def _own_rows(self, inputs, labels, attn):
        """Return this process's rows of a global micro-batch, without the padding columns they do not need.

        With fewer cells than processes a process gets one row that predicts nothing (labels all -100): its
        gradient is zero, but it takes part in the all-reduce as DDP requires.
        """
        import torch

        rows = self.dist.slice(inputs.shape[0])
        if rows.start == rows.stop:
            inputs, attn, labels = inputs[:1], attn[:1], torch.full_like(labels[:1], -100)
        else:
            inputs, labels, attn = inputs[rows], labels[rows], attn[rows]
        used = attn.any(dim=0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        return inputs[:, :width], labels[:, :width], attn[:, :width]

    def _seed_dropout(self, index: int) -> None:
        """Seed this process's dropout for step ``index`` from (seed, rank, step).

        Independent per process, and a resumed run draws what the uninterrupted one drew.
        """
        import torch

        value = int(np.random.SeedSequence([self.seed, 3, self.dist.rank, int(index)]).generate_state(1)[0])
        torch.default_generator.manual_seed(value)
        for d in self.cuda_devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(value)

    def end_of_epoch(self, state: Progress, epoch: int, bar) -> None:
        """Held-out loss, best weights and the early-stopping decision after ``epoch``."""
        from sc_dta.tl._checkpoint import snapshot_weights

        if not self.val_batches:
            return
        val_loss = held_out_loss(self.bio, self.val_batches, self.device, self.dist)
        state.history.append({"epoch": epoch, "step": state.step, "val_loss": val_loss})
        logger.info("Epoch %d: held-out loss %.4f.", epoch, val_loss)
        running = self._running if self._running is not None else float("nan")
        bar.set_postfix(loss=f"{running:.4f}", val=f"{val_loss:.4f}")
        if self.early_stopping is None:
            return
        best = state.best
        if val_loss < best["loss"]:
            state.best = {"loss": val_loss, "epoch": epoch, "weights": snapshot_weights(self.bio), "bad_epochs": 0}
            return
        best["bad_epochs"] += 1
        if best["bad_epochs"] >= self.early_stopping and epoch + 1 >= self.min_epochs:
            state.stopped = True
            logger.info(
                "Early stopping after epoch %d: no improvement on %.4f (epoch %d) for %d epochs.",
                epoch,
                best["loss"],
                best["epoch"],
                self.early_stopping,
            )

    def fit(self, state: Progress, bar) -> Progress:
        """Train from ``state`` to the last epoch (or early stop); checkpoint every epoch and on Ctrl-C."""
        save = self.checkpoint or (lambda progress, rng: None)
        start_epoch, start_group = state.epoch, state.group
        for epoch in range(start_epoch, self.epochs):
            if state.stopped:
                break
            groups = self.groups(epoch)
            train_mode(self.bio, self.freeze_backbone)
            for g in range(start_group if epoch == start_epoch else 0, len(groups)):
                rng_before = self.rng_state()
                done = False
                try:
                    lr_now = self.scheduler.get_last_lr()[0]
                    mean_loss = self.step(groups[g], state.step)
                    state.step += 1
                    state.history.append({"epoch": epoch, "step": state.step, "loss": mean_loss, "lr": lr_now})
                    done = True
                    self._running = mean_loss if self._running is None else 0.98 * self._running + 0.02 * mean_loss
                    bar.update(1)
                    bar.set_postfix(loss=f"{self._running:.4f}", epoch=epoch)
                    if self.stop_after_steps is not None and state.step >= self.stop_after_steps:
                        raise KeyboardInterrupt(f"stopped after {state.step} steps (_stop_after_steps)")
                except KeyboardInterrupt:
                    self.optimizer.zero_grad(set_to_none=True)
                    state.epoch, state.group = epoch, (g + 1 if done else g)
                    save(state, self.rng_state() if done else rng_before)
                    raise
            self.end_of_epoch(state, epoch, bar)
            state.epoch, state.group = epoch + 1, 0
            save(state, self.rng_state())
        return state
