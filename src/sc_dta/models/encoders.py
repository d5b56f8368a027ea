"""Build a DNA encoder from a short name (the names the command line and the demo accept)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dna import DNAEncoder

#: Small random-weight Enformer built by ``encoder_from_name("enformer-small")`` (demos and tests).
ENFORMER_SMALL = {
    "dim": 96,
    "depth": 2,
    "heads": 4,
    "num_downsamples": 5,
    "dim_divisible_by": 16,
    "target_length": 4,
    "output_heads": {"human": 8},
}
#: Encoder names understood by :func:`encoder_from_name` (besides a local Enformer weights directory).
ENCODER_NAMES = ("kmer", "enformer", "enformer-small", "motif")
#: Window (bp) used when ``window`` is not given; Enformer's default is the model's native input length.
DEFAULT_WINDOWS = {"kmer": 512, "enformer-small": 512, "motif": 1000}


def encoder_from_name(name: str | os.PathLike, *, window: int | None = None, **kwargs: Any) -> DNAEncoder:
    """Build a DNA encoder from its name.

    Parameters
    ----------
    name
        ``"kmer"``
            :class:`~sc_dta.models.KmerEncoder`; keywords ``k`` (default 4) and ``canonical``.
        ``"enformer"``
            The official Enformer weights through :meth:`~sc_dta.models.EnformerEncoder.from_pretrained`
            (``EleutherAI/enformer-official-rough``); keywords ``revision``, ``use_tf_gamma``, ``n_bins``,
            ``name``, ``weights_id``.
        ``"enformer-small"``
            A small Enformer (:data:`ENFORMER_SMALL`) with random weights drawn from ``seed`` (default 0), for
            demos and tests; keywords ``seed``, ``n_bins``.
        ``"motif"``
            :class:`~sc_dta.models.MotifEncoder` (all JASPAR CORE vertebrate motifs by default); keywords are
            passed on (``motifs``, ``release``, ``collection``, ``tax_group``, ``pooling``, ``pseudocount``,
            ``background``).
        a local directory
            Enformer weights saved with ``save_pretrained``, loaded like ``"enformer"`` (keywords likewise).
    window
        Window in bp. Default: :data:`DEFAULT_WINDOWS` (512 for ``kmer`` and ``enformer-small``, 1,000 for
        ``motif``), the model's native input length for Enformer weights.
    **kwargs
        Encoder-specific options, listed above; others raise a :class:`TypeError`.

    Returns
    -------
    An object implementing :class:`~sc_dta.models.DNAEncoder`.

    Raises
    ------
    ValueError
        For an unknown name, listing the choices.
    TypeError
        For a keyword the chosen encoder does not take.
    """
    from .dna import OFFICIAL_ENFORMER, EnformerEncoder, KmerEncoder

    if not isinstance(name, str | os.PathLike):
        raise TypeError(f"name must be a string or a path, got {type(name).__name__}.")
    key = os.fspath(name)
    if key == "kmer":
        _check_kwargs(key, kwargs, {"k", "canonical"})
        return KmerEncoder(k=kwargs.pop("k", 4), window=_window(key, window), **kwargs)
    if key == "motif":
        from .motif import MotifEncoder

        return MotifEncoder(window=_window(key, window), **kwargs)
    if key == "enformer-small":
        _check_kwargs(key, kwargs, {"seed", "n_bins"})
        import torch
        from enformer_pytorch import Enformer

        seed = kwargs.pop("seed", 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Enformer.from_hparams(**ENFORMER_SMALL)
        return EnformerEncoder(model, window=_window(key, window), name="enformer-small", **kwargs)
    if key == "enformer" or Path(key).expanduser().is_dir():
        _check_kwargs(key, kwargs, {"revision", "use_tf_gamma", "n_bins", "name", "weights_id"})
        source = OFFICIAL_ENFORMER if key == "enformer" else Path(key).expanduser()
        revision = kwargs.pop("revision", None)
        return EnformerEncoder.from_pretrained(source, revision=revision, window=window, **kwargs)
    raise ValueError(
        f"encoder name {key!r}: expected one of {list(ENCODER_NAMES)} or an existing directory of Enformer weights."
    )


def _window(name: str, window: int | None) -> int:
    return DEFAULT_WINDOWS[name] if window is None else window


def _check_kwargs(name: str, kwargs: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"encoder {name!r} does not take the keyword(s) {unknown}; it takes {sorted(allowed)} (and window)."
        )
