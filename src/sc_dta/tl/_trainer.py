"""The masked-gene training loop behind :func:`sc_dta.tl.train_adapter` (tensors and token arrays only).

Pieces: :class:`Masker` (BERT masking of gene tokens), :func:`length_grouped_batches` (the sampler),
:func:`masked_batches` (fixed masks for held-out cells), :func:`held_out_loss` and :func:`context_gain`
(diagnostics), :func:`linear_warmup_decay` (learning-rate schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sc_dta._utils import autocast
from sc_dta.tl._padding import pad_tokens

if TYPE_CHECKING:
    import torch

    from sc_dta.models.biodta import BioDTA

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


def held_out_loss(bio: BioDTA, batches: list, dev: torch.device) -> float:
    """Mean masked-gene cross-entropy (nats) over ``batches``, in eval mode (train/eval flags restored)."""
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


def shuffled_context(
    batches: list, gene_ids: np.ndarray, frequencies: np.ndarray, mask_id: int, pad_id: int, seed: int
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
    del mask_id, pad_id
    return out


def context_gain(bio: BioDTA, batches: list, shuffled: list, dev: torch.device) -> tuple[float, float, float]:
    """``(gain, loss_real, loss_shuffled)``: how many nats per masked gene the real context is worth."""
    real = held_out_loss(bio, batches, dev)
    fake = held_out_loss(bio, shuffled, dev)
    return fake - real, real, fake


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
