"""Contextual embeddings from a Geneformer-style BERT, computed only up to the requested layer.

This is the forward pass used by in-silico perturbation. It runs ``bert.embeddings`` and then
only the encoder layers below ``emb_layer``; the layers above it and the masked-LM head (whose
vocabulary-sized logits dominate the cost of a full ``BertForMaskedLM`` call on small models)
are never evaluated.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class _Attention:
    """How the encoder layers of one batch attend: built once per batch, shared by every layer.

    ``lengths`` (right-padded batch): each sequence attends over its own real tokens only, one SDPA call per
    sequence without a mask, so padded keys and queries cost nothing. ``mask``: a (batch, 1, 1, seq) additive mask
    for one masked SDPA call (padding that is not at the right end). Neither: no padding, one unmasked call.
    """

    lengths: tuple[int, ...] | None = None
    mask: torch.Tensor | None = None


#: A right-padded batch attends sequence by sequence when that skips at least this fraction of the attention work
#: (below it, one masked call: fewer operators, which matters more on a CPU shared with other work).
PER_SEQUENCE_MIN_SAVING = 0.2


def _attention_plan(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> _Attention:
    """Per-sequence lengths for a right-padded batch with enough padding, else an additive mask (None: no padding)."""
    if attention_mask is None:
        return _Attention()
    keep = attention_mask.to(torch.bool)
    if keep.ndim != 2:
        raise ValueError(f"attention_mask: expected (batch, seq), got shape {tuple(attention_mask.shape)}.")
    if bool(keep.all()):
        return _Attention()
    lengths = keep.sum(dim=1)
    positions = torch.arange(keep.shape[1], device=keep.device)
    right_padded = bool(torch.equal(keep, positions[None, :] < lengths[:, None])) and bool((lengths > 0).all())
    n = lengths.tolist()
    if right_padded and sum(x * x for x in n) <= (1 - PER_SEQUENCE_MIN_SAVING) * len(n) * keep.shape[1] ** 2:
        return _Attention(lengths=tuple(int(x) for x in n))
    return _Attention(mask=_additive_mask(attention_mask, dtype))


def _fast_layers(bert: nn.Module) -> bool:
    """Whether :func:`_bert_layer` can evaluate every encoder layer of ``bert``.

    True for plain (absolute-position, non-decoder) ``transformers`` BERT layers in eval mode without hooks; anything
    else (including a layer with forward hooks, e.g. for interpretation or counting, and layers whose attributes
    differ from the ``transformers`` layout this was written for) runs through the layer modules themselves.
    """
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for layer in bert.encoder.layer:
        attention = getattr(layer, "attention", None)
        sa = getattr(attention, "self", None)
        if (
            layer.training
            or any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())
            or not all(hasattr(sa, k) for k in ("num_attention_heads", "attention_head_size"))
            or not hasattr(getattr(layer, "output", None), "LayerNorm")
            or not hasattr(getattr(attention, "output", None), "LayerNorm")
            or not hasattr(getattr(layer, "intermediate", None), "intermediate_act_fn")
            or getattr(layer, "is_decoder", True)
            or not all(isinstance(getattr(sa, k, None), nn.Linear) for k in ("query", "key", "value"))
            or any(getattr(sa, k).bias is None for k in ("query", "key", "value"))
            or getattr(sa, "position_embedding_type", None) != "absolute"
            or not isinstance(getattr(getattr(attention, "output", None), "dense", None), nn.Linear)
            or not isinstance(getattr(getattr(layer, "intermediate", None), "dense", None), nn.Linear)
            or not isinstance(getattr(getattr(layer, "output", None), "dense", None), nn.Linear)
        ):
            return False
    return True


_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fused_qkv(sa: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the query, key and value projections of ``sa`` as one weight and one bias.

    Without autograd the concatenation (3 x hidden^2 values per layer) is cached per module and rebuilt when any of the six tensors changes
    (another tensor, or an in-place update such as an optimiser step); with autograd it is rebuilt at each call so
    that gradients reach the parameters.
    """
    parts = [sa.query.weight, sa.key.weight, sa.value.weight, sa.query.bias, sa.key.bias, sa.value.bias]
    if torch.is_grad_enabled() and any(t.requires_grad for t in parts):
        return torch.cat(parts[:3]), torch.cat(parts[3:])
    try:
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in parts)
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return torch.cat(parts[:3]), torch.cat(parts[3:])
    hit = _FUSED.get(sa)
    if hit is None or hit[0] != key:
        hit = (key, torch.cat(parts[:3]), torch.cat(parts[3:]))
        _FUSED[sa] = hit
    return hit[1], hit[2]


def _bert_layer(layer: nn.Module, hidden: torch.Tensor, attend: _Attention) -> torch.Tensor:
    """Evaluate one ``transformers`` ``BertLayer`` in eval mode.

    The query, key and value projections run as one matrix product and scaled-dot-product attention is called
    directly (see :class:`_Attention` for padding).
    """
    sa = layer.attention.self
    batch, seq, _ = hidden.shape
    heads, head_dim = sa.num_attention_heads, sa.attention_head_size
    width = heads * head_dim
    weight, bias = _fused_qkv(sa)
    # (batch, seq, 3 * width) -> three (batch, heads, seq, head_dim) views
    q, k, v = F.linear(hidden, weight, bias).view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    if attend.lengths is None:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attend.mask)
        context = context.transpose(1, 2).reshape(batch, seq, width)
    else:
        context = hidden.new_zeros(batch, seq, width)
        for i, n in enumerate(attend.lengths):
            part = F.scaled_dot_product_attention(q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n])
            context[i, :n] = part[0].transpose(0, 1).reshape(n, width)
    out = layer.attention.output
    hidden = out.LayerNorm(out.dense(context) + hidden)
    inter = layer.intermediate
    out = layer.output
    return out.LayerNorm(out.dense(inter.intermediate_act_fn(inter.dense(hidden))) + hidden)


def _encode(bert: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None, n_run: int) -> torch.Tensor:
    """Run the first ``n_run`` encoder layers of ``bert`` on the embedding output ``hidden``."""
    layers = bert.encoder.layer[:n_run]
    if n_run and _fast_layers(bert):
        attend = _attention_plan(attention_mask, hidden.dtype)
        for layer in layers:
            hidden = _bert_layer(layer, hidden, attend)
        return hidden
    mask = _additive_mask(attention_mask, hidden.dtype)
    for layer in layers:
        out: Any = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple | list) else out
    return hidden


def _embed(
    model: nn.Module, bert: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> torch.Tensor:
    """Embedding output: a BioDTA's dynamic token embedding, ``inputs_embeds`` or the word-embedding lookup."""
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("contextual_embeddings: pass input_ids or inputs_embeds.")
        embed_tokens = getattr(model, "embed_tokens", None)
        if embed_tokens is not None and hasattr(model, "backbone"):
            inputs_embeds = embed_tokens(input_ids)
    if inputs_embeds is not None:
        return bert.embeddings(inputs_embeds=inputs_embeds)
    return bert.embeddings(input_ids=input_ids)


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

    For plain ``transformers`` BERT layers in eval mode the layers are evaluated here rather than through their
    modules: the query, key and value projections run as one matrix product, attention is
    :func:`torch.nn.functional.scaled_dot_product_attention` whatever the model's ``attn_implementation`` (eager
    attention gives the same values to float rounding), and in a right-padded batch each sequence attends over its
    own tokens only (no mask, no work on padded keys). Float32 results equal the SDPA model's hidden states exactly
    for unpadded sequences.

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
    hidden = _embed(model, bert, input_ids, inputs_embeds)
    return _encode(bert, hidden, attention_mask, n_run)


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
    bert = backbone_bert(model)
    hidden = _embed(model, bert, input_ids, inputs_embeds)
    hidden = _encode(bert, hidden, attention_mask, len(bert.encoder.layer))
    logits = inner.cls(hidden[select]).float()
    if exclude is not None:
        logits = logits.masked_fill(exclude[None, : logits.shape[1]], float("-inf"))
    return torch.log_softmax(logits, dim=-1)
