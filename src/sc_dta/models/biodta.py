"""``BioDTA``: a Geneformer backbone whose gene tokens are computed from DNA through an adapter."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from .adapter import Adapter, DynamicTokenEmbedding

if TYPE_CHECKING:
    from transformers import BertForMaskedLM
    from transformers.modeling_outputs import MaskedLMOutput

    from .vocab import GeneformerVocab

logger = logging.getLogger(__name__)

_FORMAT = "sc_dta.BioDTA"
_FORMAT_VERSION = 1
_CONFIG_FILE = "biodta_config.json"
_WEIGHTS_FILE = "adapter.safetensors"
_BACKBONE_DIR = "backbone"
_VOCAB_DIR = "vocab"


class BioDTA(nn.Module):
    """Geneformer with dynamic token adaptation (Bio-DTA).

    A ``transformers`` ``BertForMaskedLM`` backbone (unmodified) fed through ``inputs_embeds`` by a
    :class:`~sc_dta.models.DynamicTokenEmbedding`: genes with a DNA embedding get ``adapter(dna)`` as their
    input embedding (or ``static + adapter(dna)`` in ``"add"`` mode), all other tokens their static row.

    Parameters
    ----------
    backbone
        The cell model, e.g. from :func:`~sc_dta.models.load_geneformer` or :meth:`from_config`.
    vocab
        Its vocabulary; default :func:`~sc_dta.models.cell.model_vocab` of ``backbone``.
    d_dna
        Dimension of the DNA embeddings (required unless ``adapter`` is given).
    adapter
        A ready adapter; by default one is built from ``adapter_*``.
    mode
        ``"replace"`` or ``"add"``. In ``"add"`` mode a new adapter's last layer starts at zero, so the
        untrained BioDTA equals its backbone.
    adapter_layers, adapter_hidden, adapter_dropout, adapter_activation, adapter_layer_norm
        Passed to :class:`~sc_dta.models.Adapter` (``n_layers``, ``d_hidden``, ``dropout``, ...).
    dna_encoder_info
        The DNA encoder the adapter is trained for: ``name``, ``window``, ``pooling``, ``weights_id``, ...
    backbone_source
        Where the backbone weights come from (``name_or_path``, ``revision``); default taken from a model
        loaded by :func:`~sc_dta.models.load_geneformer`. Used to save a frozen backbone as a reference.
    backbone_trained
        Whether the backbone weights differ from ``backbone_source`` (then they are saved in full).

    Attributes
    ----------
    backbone
        The ``BertForMaskedLM``.
    adapter
        The :class:`~sc_dta.models.Adapter`.
    token_embedding
        The :class:`~sc_dta.models.DynamicTokenEmbedding` (shares the backbone's static table).
    vocab
        The :class:`~sc_dta.models.GeneformerVocab`.
    dna_encoder_info
        dict describing the DNA encoder.
    loss_history
        Training records (list of dicts) appended by :func:`sc_dta.tl.train_adapter`.
    """

    def __init__(
        self,
        backbone: BertForMaskedLM,
        vocab: GeneformerVocab | None = None,
        *,
        d_dna: int | None = None,
        adapter: Adapter | None = None,
        mode: Literal["replace", "add"] = "replace",
        adapter_layers: int = 2,
        adapter_hidden: int | None = None,
        adapter_dropout: float = 0.1,
        adapter_activation: Literal["gelu", "relu", "silu"] = "gelu",
        adapter_layer_norm: bool = True,
        dna_encoder_info: Mapping[str, Any] | None = None,
        backbone_source: Mapping[str, Any] | None = None,
        backbone_trained: bool = False,
    ) -> None:
        super().__init__()
        from .cell import model_source, model_vocab

        if not hasattr(backbone, "get_input_embeddings") or not hasattr(backbone, "bert"):
            raise TypeError(f"backbone must be a transformers BertForMaskedLM, got {type(backbone).__name__}.")
        self.backbone = backbone
        self.vocab = model_vocab(backbone) if vocab is None else vocab
        if len(self.vocab) > backbone.config.vocab_size:
            raise ValueError(
                f"The vocabulary has {len(self.vocab)} tokens, more than the backbone's {backbone.config.vocab_size}."
            )
        hidden = int(backbone.config.hidden_size)
        if adapter is None:
            if d_dna is None:
                raise ValueError("d_dna is required when no adapter is given.")
            adapter = Adapter(
                int(d_dna),
                hidden,
                n_layers=adapter_layers,
                d_hidden=adapter_hidden,
                dropout=adapter_dropout,
                activation=adapter_activation,
                layer_norm=adapter_layer_norm,
            )
            if mode == "add":
                nn.init.zeros_(adapter.output_layer.weight)
                nn.init.zeros_(adapter.output_layer.bias)
        elif d_dna is not None and int(d_dna) != adapter.d_dna:
            raise ValueError(f"d_dna={d_dna} does not match the adapter's d_dna={adapter.d_dna}.")
        self.adapter = adapter
        self.token_embedding = DynamicTokenEmbedding(
            backbone.get_input_embeddings(), adapter, mode=mode, special_ids=self.vocab.special_ids
        )
        self.token_embedding.to(backbone.device)
        self.dna_encoder_info: dict[str, Any] = dict(dna_encoder_info or {})
        source = backbone_source if backbone_source is not None else model_source(backbone)
        self.backbone_source: dict[str, Any] | None = dict(source) if source else None
        self.backbone_trained = bool(backbone_trained) or self.backbone_source is None
        self.loss_history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ properties
    @property
    def d_dna(self) -> int:
        """Dimension of the DNA embeddings."""
        return self.adapter.d_dna

    @property
    def mode(self) -> str:
        """``"replace"`` or ``"add"``."""
        return self.token_embedding.mode

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.backbone.device

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the model (written by :meth:`save_pretrained`)."""
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "mode": self.mode,
            "adapter": self.adapter.hparams(),
            "vocab_version": str(self.vocab.version),
            "n_dna_tokens": int(self.token_embedding.dna_rows.shape[0]),
            "dna_encoder": self.dna_encoder_info,
            "backbone": {
                "source": self.backbone_source,
                "trained": self.backbone_trained,
                "config": self.backbone.config.to_diff_dict(),
            },
        }

    @property
    def has_dna(self) -> torch.Tensor:
        """``(vocab_size,)`` booleans: tokens whose embedding comes from DNA."""
        return self.token_embedding.has_dna

    # ------------------------------------------------------------------ DNA table
    def set_dna_embeddings(
        self, token_ids: Iterable[int] | np.ndarray | torch.Tensor, embeddings: np.ndarray | torch.Tensor
    ) -> None:
        """Set the DNA embedding of ``token_ids`` (``(n,)``) to ``embeddings`` (``(n, d_dna)``).

        Rows with NaN remove the token's DNA embedding; tokens not listed keep their current one.
        """
        self.token_embedding.set_dna_embeddings(token_ids, embeddings)

    def freeze_backbone(self, freeze: bool = True) -> None:
        """Set ``requires_grad`` of all backbone parameters to ``not freeze`` (adapter untouched)."""
        for p in self.backbone.parameters():
            p.requires_grad_(not freeze)

    # ------------------------------------------------------------------ forward passes
    def embed_tokens(
        self, input_ids: torch.Tensor, dna_overrides: Mapping[int, torch.Tensor | np.ndarray] | None = None
    ) -> torch.Tensor:
        """Input embeddings ``(batch, seq, hidden)`` for ``backbone(inputs_embeds=...)``.

        ``dna_overrides`` maps a token id to a DNA embedding used instead of its table row.
        """
        return self.token_embedding(input_ids, dna_overrides)

    def _attention_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != self.vocab.pad_id).long()
        return attention_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        dna_overrides: Mapping[int, torch.Tensor | np.ndarray] | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """Run the backbone on dynamic token embeddings.

        Parameters
        ----------
        input_ids
            ``(batch, seq)`` token ids.
        attention_mask
            ``(batch, seq)``; default: every non-``<pad>`` token.
        labels
            Masked-gene labels (``-100`` = ignored) for the loss.
        dna_overrides
            Token id -> DNA embedding used instead of the table row.
        **kwargs
            Passed to the backbone (e.g. ``output_hidden_states``).

        Returns
        -------
        ``transformers`` ``MaskedLMOutput`` (loss, logits, hidden_states).
        """
        embeds = self.embed_tokens(input_ids, dna_overrides)
        return self.backbone(
            inputs_embeds=embeds,
            attention_mask=self._attention_mask(input_ids, attention_mask),
            labels=labels,
            **kwargs,
        )

    def masked_lm_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> torch.Tensor:
        """Masked-gene cross-entropy, computing vocabulary logits only at the masked positions.

        Equivalent to ``forward(..., labels=labels).loss`` (for ``reduction="mean"``) without building the
        ``(batch, seq, vocab)`` logits tensor.
        """
        embeds = self.embed_tokens(input_ids)
        out = self.backbone.bert(
            inputs_embeds=embeds,
            attention_mask=self._attention_mask(input_ids, attention_mask),
            output_hidden_states=False,
            return_dict=True,
        )
        selected = labels != -100
        hidden = out.last_hidden_state[selected]
        logits = self.backbone.cls(hidden)
        return nn.functional.cross_entropy(logits.float(), labels[selected], reduction=reduction)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        vocab: GeneformerVocab,
        *,
        d_dna: int,
        hidden_size: int = 256,
        n_layers: int = 6,
        n_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int | None = None,
        dropout: float = 0.02,
        seed: int | None = None,
        **kwargs: Any,
    ) -> BioDTA:
        """Build a BioDTA with a new, randomly initialised Geneformer-style backbone (to train from scratch).

        The backbone is a ``BertForMaskedLM`` like Geneformer's (relu, absolute positions, ``<pad>`` = 0,
        SDPA attention); the defaults are the Geneformer-V1-10M architecture.

        Parameters
        ----------
        vocab
            The vocabulary (its size sets the embedding table).
        d_dna
            Dimension of the DNA embeddings.
        hidden_size, n_layers, n_heads, intermediate_size
            Backbone architecture.
        max_position_embeddings
            Longest input; default ``vocab.max_length``.
        dropout
            Hidden and attention dropout of the backbone.
        seed
            Seed for the random initialisation (default: the current torch RNG).
        **kwargs
            Passed to :class:`BioDTA` (``mode``, ``adapter_layers``, ``dna_encoder_info``, ...).
        """
        from transformers import BertConfig, BertForMaskedLM

        if hidden_size % n_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by n_heads={n_heads}.")
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=intermediate_size,
            hidden_act="relu",
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=int(max_position_embeddings or vocab.max_length),
            position_embedding_type="absolute",
            pad_token_id=int(vocab.pad_id),
            type_vocab_size=2,
            initializer_range=0.02,
            layer_norm_eps=1e-12,
            output_hidden_states=True,
        )
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            backbone = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
            model = cls(backbone, vocab, d_dna=d_dna, backbone_source=None, backbone_trained=True, **kwargs)
        return model

    # ------------------------------------------------------------------ persistence
    def _backbone_fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.backbone.state_dict().items()):
            if "word_embeddings" in name or name.endswith("encoder.layer.0.output.dense.weight"):
                h.update(name.encode())
                h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        tensors["dna_rows"] = self.token_embedding.dna_rows.detach().cpu().contiguous()
        tensors["dna_token_ids"] = self.token_embedding.dna_token_ids.cpu().contiguous()
        return tensors

    def _load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        state = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
        self.adapter.load_state_dict(state)
        emb = self.token_embedding
        emb.dna_index.fill_(-1)
        emb.dna_rows = torch.zeros(0, emb.d_dna, device=emb.dna_index.device)
        self.set_dna_embeddings(tensors["dna_token_ids"], tensors["dna_rows"])

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Save to a folder: ``biodta_config.json``, ``adapter.safetensors``, ``vocab/`` and the backbone.

        A backbone that was not trained is stored as a reference (``name_or_path`` + ``revision`` and a
        fingerprint of its weights, checked on loading); a trained or randomly initialised one is saved in
        full under ``backbone/`` (``transformers`` safetensors).

        Returns
        -------
        The folder.
        """
        from safetensors.torch import save_file

        folder = Path(save_directory).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config
        config["loss_history"] = self.loss_history
        if self.backbone_trained:
            self.backbone.save_pretrained(folder / _BACKBONE_DIR, safe_serialization=True)
            config["backbone"]["saved"] = _BACKBONE_DIR
        else:
            config["backbone"]["saved"] = None
            config["backbone"]["fingerprint"] = self._backbone_fingerprint()
        self.vocab.save(folder / _VOCAB_DIR)
        save_file(self._adapter_tensors(), str(folder / _WEIGHTS_FILE), metadata={"format": _FORMAT})
        (folder / _CONFIG_FILE).write_text(json.dumps(_jsonable(config), indent=2))
        logger.info("Saved BioDTA to %s.", folder)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        backbone: BertForMaskedLM | None = None,
        device: str | torch.device | None = None,
        check_backbone: bool = True,
    ) -> BioDTA:
        """Load a BioDTA saved by :meth:`save_pretrained`.

        Parameters
        ----------
        directory
            The folder.
        backbone
            A ready backbone to use instead of loading the referenced one (e.g. on an offline machine).
        device
            Torch device; default ``dta.settings.device``.
        check_backbone
            Check that a referenced backbone has the weights the adapter was trained with.

        Returns
        -------
        The model in eval mode.
        """
        from safetensors.torch import load_file
        from transformers import BertForMaskedLM

        from sc_dta._utils import resolve_device

        from .cell import attach_vocab, load_geneformer
        from .vocab import GeneformerVocab

        folder = Path(directory).expanduser()
        config_file = folder / _CONFIG_FILE
        if not config_file.exists():
            raise FileNotFoundError(f"directory={str(directory)!r} has no {_CONFIG_FILE}: not a saved BioDTA.")
        config = json.loads(config_file.read_text())
        if config.get("format") != _FORMAT or int(config.get("format_version", 0)) > _FORMAT_VERSION:
            raise ValueError(f"{config_file} is not a BioDTA config this version of sc_dta can read.")
        dev = resolve_device(device)
        vocab = GeneformerVocab.load(folder / _VOCAB_DIR)
        info = config["backbone"]
        fingerprint_ok = True
        if backbone is None:
            if info.get("saved"):
                backbone = BertForMaskedLM.from_pretrained(
                    folder / info["saved"], attn_implementation="sdpa", output_hidden_states=True
                )
            else:
                source = info.get("source") or {}
                if not source.get("name_or_path"):
                    raise ValueError(f"{config_file} references no backbone: pass backbone=.")
                backbone = load_geneformer(source["name_or_path"], revision=source.get("revision"), vocab=vocab)
        else:
            fingerprint_ok = info.get("saved") is None  # a trained backbone cannot be checked against a reference
        attach_vocab(backbone, vocab)
        hp = config["adapter"]
        adapter = Adapter(
            hp["d_dna"],
            hp["hidden"],
            n_layers=hp["n_layers"],
            d_hidden=hp["d_hidden"],
            dropout=hp["dropout"],
            activation=hp["activation"],
            layer_norm=hp["layer_norm"],
        )
        model = cls(
            backbone,
            vocab,
            adapter=adapter,
            mode=config["mode"],
            dna_encoder_info=config.get("dna_encoder"),
            backbone_source=info.get("source"),
            backbone_trained=bool(info.get("trained")),
        )
        if check_backbone and fingerprint_ok and info.get("fingerprint"):
            if model._backbone_fingerprint() != info["fingerprint"]:
                raise ValueError(
                    f"The backbone's weights differ from those the adapter in {folder} was trained with "
                    f"(source {info.get('source')}); pass the right backbone= or check_backbone=False."
                )
        model._load_adapter_tensors(load_file(str(folder / _WEIGHTS_FILE)))
        model.loss_history = list(config.get("loss_history", []))
        model.to(dev)
        model.eval()
        return model

    def extra_repr(self) -> str:  # noqa: D102
        return f"vocab={self.vocab.version!s}, mode={self.mode!r}, dna_encoder={self.dna_encoder_info.get('name')!r}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    return value
