"""The DNA adapter and the dynamic token embedding of Bio-DTA.

A gene's input embedding in the cell model is no longer a fixed row of the lookup table: for every
gene that has a DNA embedding (e.g. Enformer over a window centred on its TSS) it is computed by an
:class:`Adapter` from that DNA embedding. :class:`DynamicTokenEmbedding` produces the ``inputs_embeds``
that are fed to an unmodified ``transformers`` BERT model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

_MODES = ("replace", "add")
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class Adapter(nn.Module):
    """MLP mapping a DNA embedding (``d_dna``) to a token embedding of the cell model (``hidden``).

    Layout: optional :class:`~torch.nn.LayerNorm` over the DNA embedding (DNA encoders such as Enformer
    give features of very different scales), then ``n_layers`` linear layers with the activation and
    dropout between them.

    Parameters
    ----------
    d_dna
        Dimension of the DNA embeddings (e.g. 3072 for Enformer's trunk).
    hidden
        Hidden size of the cell model (e.g. 256 for Geneformer-V1-10M).
    n_layers
        Number of linear layers (1 = a single affine map).
    d_hidden
        Width of the intermediate layers; defaults to ``2 * hidden``.
    dropout
        Dropout probability after each intermediate activation and on the normalised input.
    activation
        ``"gelu"``, ``"relu"`` or ``"silu"``.
    layer_norm
        Whether to normalise the DNA embedding first.
    """

    def __init__(
        self,
        d_dna: int,
        hidden: int,
        *,
        n_layers: int = 2,
        d_hidden: int | None = None,
        dropout: float = 0.1,
        activation: Literal["gelu", "relu", "silu"] = "gelu",
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("d_dna", d_dna), ("hidden", hidden), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if d_hidden is None:
            d_hidden = 2 * hidden
        if isinstance(d_hidden, bool) or not isinstance(d_hidden, int | np.integer) or d_hidden < 1:
            raise ValueError(f"d_hidden must be a positive integer or None, got {d_hidden!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
        self.d_dna, self.hidden, self.n_layers, self.d_hidden = int(d_dna), int(hidden), int(n_layers), int(d_hidden)
        self.dropout_p, self.activation, self.layer_norm = float(dropout), activation, bool(layer_norm)

        self.norm = nn.LayerNorm(self.d_dna) if layer_norm else nn.Identity()
        layers: list[nn.Module] = [nn.Dropout(self.dropout_p)] if layer_norm and self.dropout_p > 0 else []
        d_in = self.d_dna
        for _ in range(self.n_layers - 1):
            layers += [nn.Linear(d_in, self.d_hidden), _ACTIVATIONS[activation](), nn.Dropout(self.dropout_p)]
            d_in = self.d_hidden
        layers.append(nn.Linear(d_in, self.hidden))
        self.mlp = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        """The last linear layer (its output is the token embedding)."""
        return self.mlp[-1]

    def hparams(self) -> dict:
        """Return the constructor arguments, JSON-serialisable (used by :meth:`BioDTA.save_pretrained`)."""
        return {
            "d_dna": self.d_dna,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
            "d_hidden": self.d_hidden,
            "dropout": self.dropout_p,
            "activation": self.activation,
            "layer_norm": self.layer_norm,
        }

    def forward(self, dna: torch.Tensor) -> torch.Tensor:
        """Map DNA embeddings ``(..., d_dna)`` to token embeddings ``(..., hidden)``."""
        if dna.shape[-1] != self.d_dna:
            raise ValueError(f"Adapter expects DNA embeddings of dimension {self.d_dna}, got shape {tuple(dna.shape)}.")
        return self.mlp(self.norm(dna))

    def extra_repr(self) -> str:  # noqa: D102
        return f"d_dna={self.d_dna}, hidden={self.hidden}, n_layers={self.n_layers}, d_hidden={self.d_hidden}"


class DynamicTokenEmbedding(nn.Module):
    """Token embeddings computed from DNA for genes that have a DNA embedding.

    For a token with a DNA embedding the input embedding is ``adapter(dna)`` (``mode="replace"``) or
    ``static + adapter(dna)`` (``mode="add"``). Tokens without a DNA embedding (genes without a TSS window,
    special tokens such as ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``) keep their static row. The adapter
    runs once per call on the unique token ids of the batch that have DNA, not once per token.

    The result is meant for ``BertForMaskedLM(inputs_embeds=...)``: BERT adds position and token-type
    embeddings and its LayerNorm exactly as for ``input_ids``.

    Parameters
    ----------
    static
        The model's input embedding table (``backbone.get_input_embeddings()``); shared, not copied.
    adapter
        Maps ``d_dna`` to the embedding size.
    dna_table
        ``(vocab_size, d_dna)`` DNA embedding per token id (rows without DNA are ignored), or
        ``(n, d_dna)`` together with ``token_ids``; None for an empty table.
    has_dna
        ``(vocab_size,)`` booleans: which rows of ``dna_table`` are valid. Defaults to the rows without NaN.
    mode
        ``"replace"`` or ``"add"``.
    special_ids
        Token ids that never take a DNA embedding.
    token_ids
        With an ``(n, d_dna)`` ``dna_table``: the token id of each row.

    Notes
    -----
    Only the rows of genes with DNA are stored (buffers ``dna_rows`` and ``dna_index``, the row of each
    token id or -1), so memory grows with the number of genes that have DNA, not with the vocabulary.
    """

    def __init__(
        self,
        static: nn.Embedding,
        adapter: Adapter,
        dna_table: torch.Tensor | np.ndarray | None = None,
        has_dna: torch.Tensor | np.ndarray | None = None,
        mode: Literal["replace", "add"] = "replace",
        *,
        special_ids: Iterable[int] = (),
        token_ids: Iterable[int] | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if not isinstance(static, nn.Embedding):
            raise TypeError(f"static must be an nn.Embedding, got {type(static).__name__}.")
        if adapter.hidden != static.embedding_dim:
            raise ValueError(
                f"The adapter outputs {adapter.hidden} dimensions but the embedding table has {static.embedding_dim}."
            )
        self.static = static
        self.adapter = adapter
        self.mode = mode
        self.vocab_size = static.num_embeddings
        self.d_dna = adapter.d_dna
        special = np.asarray(sorted({int(i) for i in special_ids}), dtype=np.int64)
        if special.size and (special.min() < 0 or special.max() >= self.vocab_size):
            raise ValueError(f"special_ids must lie in [0, {self.vocab_size}), got {special.tolist()}.")
        self.register_buffer("special_ids", torch.as_tensor(special), persistent=False)
        self.register_buffer("dna_rows", torch.zeros(0, self.d_dna), persistent=True)
        self.register_buffer("dna_index", torch.full((self.vocab_size,), -1, dtype=torch.long), persistent=True)
        if dna_table is not None:
            table = _as_float_array(dna_table, "dna_table")
            if token_ids is None:
                if table.shape != (self.vocab_size, self.d_dna):
                    raise ValueError(
                        f"dna_table must have shape (vocab_size, d_dna) = ({self.vocab_size}, {self.d_dna}), "
                        f"got {table.shape}; pass token_ids= for a table of selected tokens."
                    )
                valid = ~np.isnan(table).any(axis=1)
                if has_dna is not None:
                    mask = np.asarray(has_dna.cpu() if isinstance(has_dna, torch.Tensor) else has_dna, dtype=bool)
                    if mask.shape != (self.vocab_size,):
                        raise ValueError(f"has_dna must have shape ({self.vocab_size},), got {mask.shape}.")
                    if np.any(mask & ~valid):
                        raise ValueError("has_dna marks rows of dna_table that contain NaN.")
                    valid = mask
                ids = np.flatnonzero(valid)
                self.set_dna_embeddings(ids, table[ids])
            else:
                self.set_dna_embeddings(token_ids, table)
        elif has_dna is not None:
            raise ValueError("has_dna was given without dna_table.")

    # ------------------------------------------------------------------ table access
    @property
    def has_dna(self) -> torch.Tensor:
        """``(vocab_size,)`` booleans: which tokens take their embedding from DNA."""
        return self.dna_index >= 0

    @property
    def dna_token_ids(self) -> torch.Tensor:
        """Token ids that have a DNA embedding, in the order of the rows of ``dna_rows``."""
        ids = torch.full((self.dna_rows.shape[0],), -1, dtype=torch.long, device=self.dna_index.device)
        have = torch.nonzero(self.dna_index >= 0).squeeze(1)
        ids[self.dna_index[have]] = have
        return ids

    @property
    def dna_table(self) -> torch.Tensor:
        """Dense ``(vocab_size, d_dna)`` table, NaN for tokens without DNA (built on demand)."""
        table = torch.full((self.vocab_size, self.d_dna), float("nan"), dtype=self.dna_rows.dtype)
        table = table.to(self.dna_rows.device)
        have = self.dna_index >= 0
        table[have] = self.dna_rows[self.dna_index[have]]
        return table

    def set_dna_embeddings(
        self, token_ids: Iterable[int] | np.ndarray | torch.Tensor, embeddings: np.ndarray | torch.Tensor
    ) -> None:
        """Set (add or overwrite) the DNA embedding of ``token_ids``.

        Rows containing NaN remove the token's DNA embedding (it falls back to its static row).

        Parameters
        ----------
        token_ids
            ``(n,)`` token ids (unique).
        embeddings
            ``(n, d_dna)`` DNA embeddings.
        """
        ids = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else list(token_ids), dtype=np.int64)
        ids = ids.reshape(-1)
        emb = _as_float_array(embeddings, "embeddings")
        if emb.ndim != 2 or emb.shape != (ids.size, self.d_dna):
            raise ValueError(
                f"embeddings must have shape ({ids.size}, {self.d_dna}) for {ids.size} token ids, got {emb.shape}."
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token_ids must lie in [0, {self.vocab_size}), got values from {ids.min()} to {ids.max()}."
            )
        if np.unique(ids).size != ids.size:
            raise ValueError("token_ids contains duplicates.")
        special = np.intersect1d(ids, self.special_ids.cpu().numpy())
        if special.size:
            raise ValueError(f"Special tokens {special.tolist()} cannot take a DNA embedding.")
        if np.isinf(emb).any():
            raise ValueError("embeddings contains infinite values.")
        valid = ~np.isnan(emb).any(axis=1)
        # rebuild the compact table: keep old rows that are not touched, then the new valid rows
        index = self.dna_index.cpu().numpy().copy()
        old_ids = np.flatnonzero(index >= 0)
        keep = old_ids[~np.isin(old_ids, ids)]
        old_rows = self.dna_rows.detach().cpu().numpy()
        rows = np.concatenate([old_rows[index[keep]], emb[valid]], axis=0).astype(np.float32, copy=False)
        new_ids = np.concatenate([keep, ids[valid]])
        index[:] = -1
        index[new_ids] = np.arange(new_ids.size)
        device = self.dna_index.device
        self.dna_rows = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        self.dna_index = torch.from_numpy(index).to(device)

    # ------------------------------------------------------------------ forward
    def forward(
        self, input_ids: torch.Tensor, dna_overrides: Mapping[int, torch.Tensor | np.ndarray] | None = None
    ) -> torch.Tensor:
        """Input embeddings for ``input_ids``.

        Parameters
        ----------
        input_ids
            ``(batch, seq)`` token ids.
        dna_overrides
            Token id -> DNA embedding (``d_dna``) used instead of the table row for this call (e.g. the
            embedding of a mutated TSS window). A token without a DNA embedding in the table takes its
            embedding from the adapter when it is overridden.

        Returns
        -------
        ``(batch, seq, hidden)`` embeddings, suitable for ``inputs_embeds``.
        """
        weight = self.static.weight
        uniq, inverse = torch.unique(input_ids, return_inverse=True)
        rows = self.dna_index[uniq]
        use = rows >= 0
        overrides = self._check_overrides(dna_overrides, weight.device) if dna_overrides else {}
        for token in overrides:
            use = use | (uniq == token)
        table = nn.functional.embedding(uniq, weight)  # (n_unique, hidden), gradients reach the static rows
        idx = torch.nonzero(use).squeeze(1)
        if idx.numel():
            if self.dna_rows.shape[0]:
                dna = self.dna_rows[rows[idx].clamp(min=0)]  # only the unique tokens that take DNA
            else:
                dna = torch.zeros(idx.numel(), self.d_dna, device=weight.device)
            if overrides:
                used = uniq[idx]
                for token, vec in overrides.items():
                    dna[used == token] = vec.to(dna.dtype)
            out = self.adapter(dna).to(table.dtype)
            if self.mode == "add":
                out = table[idx] + out
            table = table.index_copy(0, idx, out)
        return table[inverse]

    def _check_overrides(
        self, dna_overrides: Mapping[int, torch.Tensor | np.ndarray], device: torch.device
    ) -> dict[int, torch.Tensor]:
        special = set(self.special_ids.tolist())
        out: dict[int, torch.Tensor] = {}
        for token, vector in dna_overrides.items():
            token = int(token)
            if token in special:
                raise ValueError(f"dna_overrides: token {token} is a special token and has no DNA embedding.")
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"dna_overrides: token id {token} is outside [0, {self.vocab_size}).")
            if isinstance(vector, torch.Tensor):
                vec = vector.to(device=device, dtype=torch.float32)
            else:
                vec = torch.as_tensor(np.asarray(vector, dtype=np.float32), device=device)
            vec = vec.reshape(-1)
            if vec.shape[0] != self.d_dna:
                raise ValueError(f"dna_overrides[{token}] has {vec.shape[0]} values, expected d_dna={self.d_dna}.")
            if not torch.isfinite(vec).all():
                raise ValueError(f"dna_overrides[{token}] contains NaN or infinite values.")
            out[token] = vec
        return out

    def extra_repr(self) -> str:  # noqa: D102
        return f"vocab_size={self.vocab_size}, d_dna={self.d_dna}, n_dna={self.dna_rows.shape[0]}, mode={self.mode!r}"


def _as_float_array(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}.")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional, got shape {arr.shape}.")
    return arr.astype(np.float32, copy=False)
