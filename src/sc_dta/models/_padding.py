"""Right-padding of token sequences into one batch (shared by training and perturbation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_tokens(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, attention_mask)``, both int64 ``(len(seqs), longest)``; ``ids`` padded with ``pad_id``."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return ids, mask
