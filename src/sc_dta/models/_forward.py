"""Contextual embeddings from a Geneformer-style BERT, computed only up to the requested layer.

This is the forward pass used by in-silico perturbation. It runs ``bert.embeddings`` and then
only the encoder layers below ``emb_layer``; the layers above it and the masked-LM head (whose
vocabulary-sized logits dominate the cost of a full ``BertForMaskedLM`` call on small models)
are never evaluated.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

__all__ = ["backbone_bert", "contextual_embeddings", "n_layers", "resolve_emb_layer"]


def backbone_bert(model: nn.Module) -> nn.Module:
    """Return the ``BertModel`` inside ``model``.

    Accepts a :class:`transformers.BertForMaskedLM`, a :class:`~sc_dta.models.BioDTA`
    (through ``.backbone``) or a bare ``BertModel``.
    """
    inner = getattr(model, "backbone", model)
    bert = getattr(inner, "bert", inner)
    if not (hasattr(bert, "embeddings") and hasattr(bert, "encoder")):
        raise TypeError(
            f"model: expected a BertForMaskedLM, a BioDTA or a BertModel, got {type(model).__name__} "
            "(no `.bert.embeddings` / `.bert.encoder`)."
        )
    return bert


def n_layers(model: nn.Module) -> int:
    """Return the number of transformer layers of ``model``'s encoder."""
    return len(backbone_bert(model).encoder.layer)


def resolve_emb_layer(model: nn.Module, emb_layer: Literal["second_to_last", "last"] | int) -> int:
    """Translate ``emb_layer`` (which layer's contextual embeddings to compare) into an index of ``hidden_states``.

    ``emb_layer`` counts back from the model's last transformer layer, as in Geneformer:

    - ``"second_to_last"`` or ``-1`` (the default everywhere): the output of the second-to-last layer,
      ``hidden_states[n_layers - 1]``. Geneformer's choice: the last layer is specialised for predicting
      the masked gene, the one below it describes the gene in its cell more generally.
    - ``"last"`` or ``0``: the output of the last layer, ``hidden_states[n_layers]``.
    - ``-k`` (an integer between ``-n_layers`` and 0): ``k`` layers below the last; ``-n_layers`` is the
      input embedding output (before any transformer layer).

    Parameters
    ----------
    model
        A :class:`transformers.BertForMaskedLM`, a :class:`~sc_dta.models.BioDTA` or a ``BertModel``.
    emb_layer
        ``"second_to_last"``, ``"last"`` or an integer from ``-n_layers`` to 0 (numpy integers too).

    Returns
    -------
    The index into ``hidden_states`` (``n_layers + emb_layer``), which is also the number of transformer
    layers to run.

    Raises
    ------
    ValueError
        Any other value, naming the accepted ones for this model.
    """
    import numbers

    n = n_layers(model)
    names = {"second_to_last": -1, "last": 0}
    value: object = emb_layer
    if isinstance(emb_layer, str):
        value = names.get(emb_layer.strip().lower().replace("-", "_"), emb_layer)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -n <= int(value) <= 0:
        raise ValueError(
            f"emb_layer: must be 'second_to_last' (= -1, the default), 'last' (= 0) or an integer between {-n} "
            f"(the embedding output) and 0 for this {n}-layer model, got {emb_layer!r}."
        )
    return n + int(value)


def _additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, seq) 0/1 mask -> (batch, 1, 1, seq) additive mask; None when nothing is padded."""
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)
    if bool(keep.all()):
        return None  # lets SDPA use its unmasked fast path
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    mask.masked_fill_(~keep, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def contextual_embeddings(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    emb_layer: int = -1,
) -> torch.Tensor:
    """Contextual token embeddings at ``emb_layer``, without the layers above it or the MLM head.

    Equal to ``model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    .hidden_states[n_layers + emb_layer]`` at the non-padded positions, at a fraction of the cost.

    Parameters
    ----------
    model
        A :class:`transformers.BertForMaskedLM` (Geneformer), a :class:`~sc_dta.models.BioDTA`, or a
        ``BertModel``. For a BioDTA without ``inputs_embeds``, the input embeddings come from its
        dynamic token embedding (``model.embed_tokens(input_ids)``).
    input_ids
        ``(batch, seq)`` token ids (right-padded). May be None when ``inputs_embeds`` is given.
    attention_mask
        ``(batch, seq)`` with 1 for real tokens and 0 for padding; None means no padding.
    inputs_embeds
        ``(batch, seq, hidden)`` input (word) embeddings used instead of looking up ``input_ids``;
        position and token-type embeddings and the embedding LayerNorm are still applied.
    emb_layer
        0 for the last layer, -1 for the second-to-last (Geneformer's default), down to
        ``-n_layers`` for the embedding output.

    Returns
    -------
    ``(batch, seq, hidden)`` hidden states; values at padded positions are meaningless.
    """
    bert = backbone_bert(model)
    n_run = resolve_emb_layer(model, emb_layer)
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("contextual_embeddings: pass input_ids or inputs_embeds.")
        embed_tokens = getattr(model, "embed_tokens", None)
        if embed_tokens is not None and hasattr(model, "backbone"):
            inputs_embeds = embed_tokens(input_ids)
    if inputs_embeds is not None:
        hidden = bert.embeddings(inputs_embeds=inputs_embeds)
    else:
        hidden = bert.embeddings(input_ids=input_ids)
    mask = _additive_mask(attention_mask, hidden.dtype)
    for layer in bert.encoder.layer[:n_run]:
        out: Any = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple | list) else out
    return hidden


def masked_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    select: torch.Tensor,
    *,
    inputs_embeds: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked-LM log-probabilities over the vocabulary at the ``select`` positions only.

    Runs the full encoder and the masked-LM head on the selected positions (the head's vocabulary-sized
    output is never built for the other positions).

    Parameters
    ----------
    model
        A :class:`transformers.BertForMaskedLM` or a :class:`~sc_dta.models.BioDTA`.
    input_ids
        ``(batch, seq)`` token ids (right-padded).
    attention_mask
        ``(batch, seq)`` 1 for real tokens, 0 for padding; None means no padding.
    select
        ``(batch, seq)`` booleans: the positions to predict (usually those holding ``<mask>``).
    inputs_embeds
        Input embeddings used instead of looking up ``input_ids`` (e.g. a BioDTA's with DNA overrides).
    exclude
        ``(vocab,)`` booleans: tokens given probability 0 (the others are renormalised), e.g. special tokens.

    Returns
    -------
    ``(n_selected, vocab)`` float32 log-probabilities, rows in row-major order of ``select``.
    """
    inner = getattr(model, "backbone", model)
    if not hasattr(inner, "cls"):
        raise TypeError(f"model: a masked-LM readout needs a BertForMaskedLM head, got {type(inner).__name__}.")
    if inputs_embeds is None and hasattr(model, "embed_tokens") and hasattr(model, "backbone"):
        inputs_embeds = model.embed_tokens(input_ids)
    bert = backbone_bert(model)
    if inputs_embeds is not None:
        out = bert(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_hidden_states=False, return_dict=True
        )
    else:
        out = bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=False, return_dict=True)
    logits = inner.cls(out.last_hidden_state[select]).float()
    if exclude is not None:
        logits = logits.masked_fill(exclude[None, : logits.shape[1]], float("-inf"))
    return torch.log_softmax(logits, dim=-1)
