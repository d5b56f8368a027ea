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
    from anndata import AnnData
    from mudata import MuData
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
#: BertConfig attribute recording how the backbone encodes positions ("absolute" or "none").
POSITIONS_ATTR = "sc_dta_positions"
#: BioDTA constructor arguments accepted by :meth:`BioDTA.from_config` next to BertConfig fields.
_MODEL_KWARGS = (
    "adapter",
    "mode",
    "adapter_layers",
    "adapter_hidden",
    "adapter_dropout",
    "adapter_activation",
    "adapter_layer_norm",
    "dna_encoder_info",
)
#: Architecture of :meth:`BioDTA.from_adata` (measured in ``benchmarks/science.py``).
FROM_ADATA_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "n_layers": 2,
    "n_heads": 4,
    "dropout": 0.1,
    "position_embedding": "none",
    "mode": "replace",
    "adapter_layers": 2,
    "adapter_dropout": 0.1,
}


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
        if self.position_free:
            _clear_positions(backbone)

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
    def position_free(self) -> bool:
        """Whether the backbone ignores token positions (built with ``position_embedding="none"``).

        A position-free backbone sees a cell as a set of genes: its position embeddings are zero and stay
        frozen, so deleting a gene does not move the others and ties in sparse counts carry no meaning.
        """
        return getattr(self.backbone.config, POSITIONS_ATTR, "absolute") == "none"

    @property
    def pretrained_backbone(self) -> bool:
        """Whether the backbone comes from pretrained weights (then it is frozen by default when training)."""
        return self.backbone_source is not None and not self.backbone_trained

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
        if self.position_free:
            _clear_positions(self.backbone)

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
        position_embedding: Literal["absolute", "none"] = "absolute",
        seed: int | None = None,
        **kwargs: Any,
    ) -> BioDTA:
        """Build a BioDTA with a new, randomly initialised Geneformer-style backbone (to train from scratch).

        The backbone is a ``BertForMaskedLM`` like Geneformer's (relu, ``<pad>`` = 0, SDPA attention); the
        defaults are the Geneformer-V1-10M architecture with its absolute position embeddings.

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
        position_embedding
            ``"absolute"`` (Geneformer: the rank of a gene in the cell is its position) or ``"none"``
            (position-free: the cell is a set of genes, see :attr:`position_free`).
        seed
            Seed for the random initialisation (default: the current torch RNG).
        **kwargs
            :class:`BioDTA` arguments (``mode``, ``adapter_layers``, ``adapter_hidden``, ``adapter_dropout``,
            ``adapter_activation``, ``adapter_layer_norm``, ``dna_encoder_info``); any other keyword is a
            ``transformers.BertConfig`` field (e.g. ``layer_norm_eps``, ``initializer_range``).
        """
        from transformers import BertConfig, BertForMaskedLM

        if hidden_size % n_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by n_heads={n_heads}.")
        if position_embedding not in ("absolute", "none"):
            raise ValueError(f"position_embedding must be 'absolute' or 'none', got {position_embedding!r}.")
        model_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _MODEL_KWARGS}
        for reserved in ("vocab_size", "position_embedding_type", "pad_token_id"):
            if reserved in kwargs:
                raise ValueError(f"{reserved} is set by from_config and cannot be overridden.")
        config_fields = {
            "hidden_act": "relu",
            "type_vocab_size": 2,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-12,
            "output_hidden_states": True,
        } | kwargs
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=intermediate_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=int(max_position_embeddings or vocab.max_length),
            position_embedding_type="absolute",
            pad_token_id=int(vocab.pad_id),
            **config_fields,
        )
        unknown = sorted(k for k in kwargs if not hasattr(BertConfig(), k))
        if unknown:
            raise TypeError(f"from_config: unknown arguments {unknown} (neither BioDTA nor BertConfig arguments).")
        setattr(config, POSITIONS_ATTR, position_embedding)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            backbone = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
            model = cls(backbone, vocab, d_dna=d_dna, backbone_source=None, backbone_trained=True, **model_kwargs)
        return model

    @classmethod
    def from_adata(
        cls,
        adata: AnnData | MuData,
        *,
        dna_key: str = "dna_emb",
        layer: str | None = None,
        gene_id_key: str | None = None,
        seed: int = 0,
        mod: str = "rna",
        **overrides: Any,
    ) -> BioDTA:
        """Build a BioDTA sized for the cells of ``adata``, to train from scratch with :func:`sc_dta.tl.train_adapter`.

        The recipe measured to learn gene co-regulation from small, sparse data (``benchmarks/science.py``):
        a vocabulary with one token per expressed gene (:meth:`GeneformerVocab.from_adata
        <sc_dta.models.GeneformerVocab.from_adata>`, no ``<cls>``/``<eos>``); a position-free backbone
        (``position_embedding="none"``: a cell is the set of its detected genes, so deleting a gene moves no other
        gene and the arbitrary order of tied counts carries no signal); a small transformer (see
        :data:`FROM_ADATA_DEFAULTS`); and an adapter in ``"replace"`` mode: a gene's token is computed from its DNA
        alone, so a promoter mutation changes everything the model knows of the gene (with ``"add"`` mode, a learned
        per-gene row plus a function of DNA, matched control deletions ranked the targets almost as well as the motif
        deletion on SERGIO data; with ``"replace"`` they were near chance). The DNA embeddings ``adata.varm[dna_key]`` are loaded into the
        model and the encoder that made them (``adata.uns[dna_key]['params']``) is recorded.

        Parameters
        ----------
        adata
            Raw counts (``X`` or ``layer``) with DNA embeddings in ``varm[dna_key]`` (:func:`sc_dta.tl.embed_dna`).
        dna_key
            Key of the DNA embeddings in ``adata.varm``.
        layer
            Layer with the raw counts (default ``X``).
        gene_id_key
            ``var`` column with the gene ids (default ``var_names``).
        seed
            Seed of the weight initialisation.
        mod
            Modality of a MuData.
        **overrides
            Any :meth:`from_config` argument, e.g. ``hidden_size=128``, ``n_layers=4``,
            ``position_embedding="absolute"``, ``mode="replace"``, ``adapter_dropout=0.2``; and ``max_length``
            (tokens per cell, default: every gene of the vocabulary fits).

        Returns
        -------
        The new, untrained model.
        """
        from sc_dta._utils import get_anndata

        from .vocab import GeneformerVocab

        ad = get_anndata(adata, mod)
        if dna_key not in ad.varm:
            raise KeyError(
                f"dna_key={dna_key!r} is not in adata.varm (keys: {list(ad.varm.keys())}); run sc_dta.tl.embed_dna first."
            )
        emb = np.asarray(ad.varm[dna_key], dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != ad.n_vars:
            raise ValueError(f"adata.varm[{dna_key!r}] must have shape (n_vars, d_dna), got {emb.shape}.")
        settings_ = dict(FROM_ADATA_DEFAULTS) | overrides
        max_length = settings_.pop("max_length", None)
        vocab = GeneformerVocab.from_adata(
            ad,
            layer=layer,
            gene_id_key=gene_id_key,
            special_tokens=False,
            max_length=int(max_length) if max_length is not None else ad.n_vars + 2,
            name="custom",
        )
        if max_length is None:
            vocab.max_length = len(vocab) - len(vocab.special_ids) + 2
        hidden = int(settings_.pop("hidden_size"))
        settings_.setdefault("intermediate_size", 2 * hidden)
        params = dict(ad.uns.get(dna_key, {}).get("params", {}) or {})
        info = {
            k: params[k] for k in ("encoder", "weights_id", "window", "pooling", "center_shift", "dim") if k in params
        }
        if "encoder" in info:
            info["name"] = info.pop("encoder")
        settings_.setdefault("dna_encoder_info", info)
        model = cls.from_config(
            vocab,
            d_dna=emb.shape[1],
            hidden_size=hidden,
            max_position_embeddings=vocab.max_length,
            seed=seed,
            **settings_,
        )
        ids = np.asarray(
            [vocab.token_ids.get(str(g).upper(), -1) for g in (ad.var[gene_id_key] if gene_id_key else ad.var_names)],
            dtype=np.int64,
        )
        ok = (ids >= 0) & np.isfinite(emb).all(axis=1)
        ids, first = np.unique(ids[ok], return_index=True)
        if ids.size == 0:
            raise ValueError(f"No expressed gene has a DNA embedding in adata.varm[{dna_key!r}].")
        model.set_dna_embeddings(ids, emb[np.flatnonzero(ok)[first]])
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

        Raises
        ------
        FileNotFoundError
            The folder, its ``biodta_config.json``, ``adapter.safetensors``, ``vocab/`` or a saved ``backbone/``
            (or a file in it) is missing. The error names the path. A local folder is never looked up on the
            Hugging Face Hub; only a backbone *referenced* by a published name (e.g. ``"Geneformer-V1-10M"``) is
            fetched, through :func:`~sc_dta.models.load_geneformer`.
        ValueError
            A damaged file (truncated ``adapter.safetensors``, invalid JSON, missing config entries, adapter
            tensors that do not fit the config); the error names the file.
        """
        from sc_dta._utils import resolve_device

        from .cell import attach_vocab, load_geneformer
        from .vocab import GeneformerVocab

        folder = Path(directory).expanduser()
        config_file = folder / _CONFIG_FILE
        config = _read_saved_config(folder, directory)
        weights_file = folder / _WEIGHTS_FILE
        if not weights_file.is_file():
            raise FileNotFoundError(f"The saved BioDTA in {folder} lacks {_WEIGHTS_FILE} (the adapter weights).")
        if not (folder / _VOCAB_DIR).is_dir():
            raise FileNotFoundError(f"The saved BioDTA in {folder} lacks its {_VOCAB_DIR}/ folder (the vocabulary).")
        info = config["backbone"]
        if backbone is None and info.get("saved"):
            _check_saved_backbone(folder / info["saved"])
        tensors = _read_adapter_file(weights_file)  # read (and checked) before any backbone is loaded
        dev = resolve_device(device)
        vocab = GeneformerVocab.load(folder / _VOCAB_DIR)
        fingerprint_ok = True
        if backbone is None:
            if info.get("saved"):
                backbone = _load_saved_backbone(folder / info["saved"])
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
        try:
            model._load_adapter_tensors(tensors)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(
                f"{weights_file} does not fit {config_file} (missing or mis-shaped adapter tensors: {e}); "
                "the folder is damaged or mixes files of two models: save the model again."
            ) from e
        model.loss_history = list(config.get("loss_history", []))
        model.to(dev)
        model.eval()
        return model

    def extra_repr(self) -> str:  # noqa: D102
        return f"vocab={self.vocab.version!s}, mode={self.mode!r}, dna_encoder={self.dna_encoder_info.get('name')!r}"


def _clear_positions(backbone: BertForMaskedLM) -> None:
    """Zero and freeze the position embeddings of a position-free backbone."""
    table = backbone.bert.embeddings.position_embeddings.weight
    with torch.no_grad():
        table.zero_()
    table.requires_grad_(False)


def _read_saved_config(folder: Path, directory: str | Path) -> dict[str, Any]:
    """Read and check ``biodta_config.json`` of a saved BioDTA; errors name the folder or the file."""
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"directory={str(directory)!r} {what}; expected a folder written by save_pretrained.")
    config_file = folder / _CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"directory={str(directory)!r} has no {_CONFIG_FILE}: not a saved BioDTA.")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file} is damaged (not valid JSON: {e}); save the model again.") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is damaged: expected a JSON object, got {type(config).__name__}.")
    try:
        version = int(config.get("format_version", 0))
    except (TypeError, ValueError):
        version = _FORMAT_VERSION + 1
    if config.get("format") != _FORMAT or version > _FORMAT_VERSION:
        raise ValueError(f"{config_file} is not a BioDTA config this version of sc_dta can read.")
    missing = [k for k in ("mode", "adapter", "backbone") if not isinstance(config.get(k), str | dict)]
    if missing:
        raise ValueError(f"{config_file} is damaged: it lacks the entries {missing}; save the model again.")
    return config


def _check_saved_backbone(path: Path) -> None:
    """Fail fast, naming the path, when a saved backbone folder or its config/weights are missing."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"The saved BioDTA's backbone folder {path} is missing (its {_CONFIG_FILE} says the trained backbone "
            "was saved there). Copy the whole model folder, or pass backbone= with the right weights."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"The saved backbone folder {path} lacks config.json.")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / name).is_file() for name in weights):
        raise FileNotFoundError(f"The saved backbone folder {path} holds no weights (model.safetensors).")


def _load_saved_backbone(path: Path) -> BertForMaskedLM:
    """Load a backbone saved under the model folder: local files only, never the Hugging Face Hub."""
    from safetensors import SafetensorError
    from transformers import BertForMaskedLM

    _check_saved_backbone(path)
    try:
        return BertForMaskedLM.from_pretrained(
            path, attn_implementation="sdpa", output_hidden_states=True, local_files_only=True
        )
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated weights, a bad config.json, ...
        raise ValueError(f"The saved backbone in {path} could not be loaded (damaged files?): {e}") from e


def _read_adapter_file(path: Path) -> dict[str, torch.Tensor]:
    """Read ``adapter.safetensors``, turning a damaged file into an error that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is damaged (truncated or not a safetensors file: {e}); copy it again or save the model again."
        ) from e
    missing = [k for k in ("dna_rows", "dna_token_ids") if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks the tensors {missing}: not a BioDTA adapter file.")
    return tensors


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
