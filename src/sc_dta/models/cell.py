"""Geneformer cell models: loading checkpoints with ``transformers`` and knowing their vocabulary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from .vocab import GeneformerVocab

logger = logging.getLogger(__name__)

#: Geneformer checkpoints in ``ctheodoris/Geneformer`` (folder name -> vocabulary version).
GENEFORMER_MODELS: dict[str, str] = {
    "Geneformer-V1-10M": "V1",
    "Geneformer-V2-104M": "V2",
    "Geneformer-V2-316M": "V2",
}
#: (vocab_size, max_position_embeddings) of the published vocabularies.
_VOCAB_SHAPES: dict[str, tuple[int, int]] = {"V1": (25_426, 2_048), "V2": (20_275, 4_096)}

_VOCAB_ATTR = "sc_dta_vocab"
_SOURCE_ATTR = "sc_dta_source"


def infer_vocab_version(config: BertConfig) -> str:
    """Geneformer vocabulary version (``"V1"`` / ``"V2"``) of a checkpoint from its config.

    Raises
    ------
    ValueError
        When the vocabulary size and positions match neither published vocabulary.
    """
    shape = (int(config.vocab_size), int(config.max_position_embeddings))
    for version, known in _VOCAB_SHAPES.items():
        if shape == known:
            return version
    raise ValueError(
        f"Cannot infer the Geneformer vocabulary of a checkpoint with vocab_size={shape[0]} and "
        f"max_position_embeddings={shape[1]} (V1 is 25,426 / 2,048, V2 is 20,275 / 4,096): pass vocab= "
        "(a GeneformerVocab, 'V1', 'V2' or a vocabulary folder)."
    )


class _LazyVocab:
    """A vocabulary spec (``"V1"``, ``"V2"`` or a folder) loaded on first use."""

    def __init__(self, spec: str | Path) -> None:
        self.spec = spec
        self._vocab: GeneformerVocab | None = None

    def get(self) -> GeneformerVocab:
        if self._vocab is None:
            from .vocab import GeneformerVocab

            self._vocab = GeneformerVocab.load(self.spec)
        return self._vocab

    def __repr__(self) -> str:
        return f"_LazyVocab({self.spec!r})"


def _check_vocab_fits(vocab: GeneformerVocab, config: BertConfig, what: str) -> None:
    if len(vocab) > config.vocab_size:
        raise ValueError(
            f"vocab={what} has {len(vocab)} tokens but the model's embedding table has only {config.vocab_size}."
        )
    if len(vocab) != config.vocab_size:
        logger.warning("The vocabulary has %d tokens, the model's embedding table %d.", len(vocab), config.vocab_size)


def attach_vocab(model: torch.nn.Module, vocab: GeneformerVocab | str | Path | None) -> None:
    """Attach ``vocab`` to a ``BertForMaskedLM`` so that :func:`model_vocab` returns it.

    ``vocab`` may be a :class:`~sc_dta.models.GeneformerVocab`, ``"V1"``, ``"V2"``, a vocabulary folder,
    or None to infer the published vocabulary from the model's config (checked eagerly, loaded lazily).
    """
    from .vocab import GeneformerVocab

    config = model.config
    if vocab is None:
        value: Any = _LazyVocab(infer_vocab_version(config))
    elif isinstance(vocab, GeneformerVocab):
        _check_vocab_fits(vocab, config, f"<GeneformerVocab {vocab.version}>")
        value = vocab
    elif isinstance(vocab, str | Path):
        if str(vocab) in _VOCAB_SHAPES:
            n_tokens = _VOCAB_SHAPES[str(vocab)][0]
            if n_tokens != config.vocab_size:
                raise ValueError(
                    f"vocab={vocab!r} has {n_tokens} tokens but the model's embedding table has {config.vocab_size}."
                )
            value = _LazyVocab(str(vocab))
        else:
            value = GeneformerVocab.load(vocab)
            _check_vocab_fits(value, config, repr(str(vocab)))
    else:
        raise TypeError(f"vocab must be a GeneformerVocab, 'V1', 'V2', a folder or None, got {type(vocab).__name__}.")
    # set as a plain attribute: not a parameter, not part of the state dict
    object.__setattr__(model, _VOCAB_ATTR, value)


def model_vocab(model: Any) -> GeneformerVocab:
    """Return the vocabulary a cell model was trained with (a Geneformer model or a :class:`~sc_dta.models.BioDTA`).

    Models returned by :func:`load_geneformer` and :class:`~sc_dta.models.BioDTA` know their vocabulary;
    for any other ``BertForMaskedLM`` the published vocabulary is inferred from the config.
    """
    from .biodta import BioDTA

    if isinstance(model, BioDTA):
        return model.vocab
    value = getattr(model, _VOCAB_ATTR, None)
    if value is None:
        if not hasattr(model, "config"):
            raise TypeError(f"model must be a Geneformer BertForMaskedLM or a BioDTA, got {type(model).__name__}.")
        attach_vocab(model, None)
        value = getattr(model, _VOCAB_ATTR)
    return value.get() if isinstance(value, _LazyVocab) else value


def model_source(model: Any) -> dict | None:
    """Where a model loaded by :func:`load_geneformer` came from (``name_or_path``, ``revision``), or None."""
    return getattr(model, _SOURCE_ATTR, None)


def resolve_geneformer_path(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """Local folder of a Geneformer checkpoint: a published name (downloaded at a pinned revision) or a folder."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"name_or_path={str(name_or_path)!r} is a folder without a config.json.")
        return path
    name = str(name_or_path)
    if name not in GENEFORMER_MODELS:
        raise FileNotFoundError(
            f"name_or_path={name!r} is neither a local checkpoint folder nor one of the published Geneformer "
            f"models {sorted(GENEFORMER_MODELS)}."
        )
    from sc_dta.datasets import hf_snapshot

    # the registry entry of each checkpoint pins the revision and points at its folder in ctheodoris/Geneformer
    folder = Path(hf_snapshot(name, revision=revision))
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"The Geneformer snapshot folder {folder} has no config.json.")
    return folder


def _pinned_revision(name: str) -> str | None:
    try:
        from sc_dta.datasets import _registry

        return _registry.resolve(name, kinds=("model",)).get("revision")
    except (KeyError, ImportError):  # a missing pin only loses provenance
        return None


def load_geneformer(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    vocab: GeneformerVocab | str | Path | None = None,
    device: str | torch.device | None = None,
) -> BertForMaskedLM:
    """Load a Geneformer checkpoint as a ``transformers`` ``BertForMaskedLM``.

    Parameters
    ----------
    name_or_path
        ``"Geneformer-V1-10M"``, ``"Geneformer-V2-104M"``, ``"Geneformer-V2-316M"`` (fetched from
        ``ctheodoris/Geneformer`` at the registry's pinned revision, offline when cached) or a local folder
        holding ``config.json`` and the weights.
    revision
        Git revision of the Hugging Face repository (default: the registry's pinned one).
    vocab
        The model's vocabulary (a :class:`~sc_dta.models.GeneformerVocab`, ``"V1"``, ``"V2"`` or a folder).
        By default inferred from the checkpoint: 25,426 tokens / 2,048 positions is V1, 20,275 / 4,096 is V2.
    device
        Torch device; default ``dta.settings.device``.

    Returns
    -------
    The model in eval mode on ``device``, with SDPA attention and ``output_hidden_states=True``.
    Its vocabulary is returned by :func:`sc_dta.models.cell.model_vocab`. Run it under
    :func:`sc_dta._utils.autocast` for bf16 on CUDA.
    """
    from transformers import BertForMaskedLM

    from sc_dta._utils import resolve_device

    dev = resolve_device(device)
    path = resolve_geneformer_path(name_or_path, revision=revision)
    model = BertForMaskedLM.from_pretrained(path, attn_implementation="sdpa", output_hidden_states=True)
    attach_vocab(model, vocab)
    if Path(str(name_or_path)).expanduser().is_dir():
        source = {"name_or_path": str(Path(name_or_path).expanduser().resolve()), "revision": revision}
    else:
        source = {"name_or_path": str(name_or_path), "revision": revision or _pinned_revision(str(name_or_path))}
    object.__setattr__(model, _SOURCE_ATTR, source)
    model.eval()
    model.to(dev)
    logger.info(
        "Loaded %s (%d layers, hidden %d) on %s.",
        name_or_path,
        model.config.num_hidden_layers,
        model.config.hidden_size,
        dev,
    )
    return model
