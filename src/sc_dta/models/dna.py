"""DNA encoders: turn transcription-oriented TSS windows into fixed-size embeddings.

Two encoders implement the :class:`DNAEncoder` protocol:

* :class:`EnformerEncoder` wraps an :class:`enformer_pytorch.Enformer` and pools its trunk embedding
  (``2 * config.dim`` features, 3,072 for the official model) over the bins at the TSS.
* :class:`KmerEncoder` is a fast CPU baseline: the normalised k-mer spectrum of the window.

Windows are built by :func:`sc_dta.tl._dna_cache.tss_window` as
``genome.window(chrom, tss ± center_shift, encoder.window, strand)``: the window is oriented in the direction of
transcription (reverse complemented for minus-strand genes) and the genomic base at its index ``window // 2`` is
``TSS + center_shift`` measured in transcription orientation, i.e. the TSS itself sits at index
``window // 2 - center_shift``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from sc_dta._settings import settings
from sc_dta._utils import autocast, autocast_dtype, progress, resolve_device

if TYPE_CHECKING:
    from enformer_pytorch import Enformer

logger = logging.getLogger(__name__)

OFFICIAL_ENFORMER = "EleutherAI/enformer-official-rough"
#: Number of trunk bins (before the final crop) for which the TensorFlow gamma positional features exist.
TF_GAMMA_BINS = 1536
#: Official Enformer: 196,608 bp input -> 1,536 bins of 128 bp, cropped to 896 output bins.
_OFFICIAL_INPUT_BINS = 1536
_OFFICIAL_TARGET_BINS = 896

# byte -> base code: A, C, G, T (either case) -> 0..3; anything else (N, IUPAC codes) -> 4 (all-zero one-hot).
_BASE_CODES = np.full(256, 4, dtype=np.uint8)
for _i, _b in enumerate("ACGT"):
    _BASE_CODES[ord(_b)] = _i
    _BASE_CODES[ord(_b.lower())] = _i
del _i, _b


@runtime_checkable
class DNAEncoder(Protocol):
    """What :func:`sc_dta.tl.embed_dna` needs from a DNA encoder.

    Attributes
    ----------
    name
        Short encoder name (``"enformer"``, ``"kmer4"``), recorded in ``adata.uns``.
    weights_id
        Identifies the weights (``repo@revision`` or a sha256); part of the embedding cache key.
    window
        Window length in bp.
    dim
        Embedding dimension.
    center_shift
        bp by which the window centre is moved relative to the TSS in transcription orientation
        (window centre = TSS + center_shift).
    pooling
        Description of how the per-position output is pooled into one vector.
    """

    name: str
    weights_id: str
    window: int
    dim: int
    center_shift: int
    pooling: str

    def embed(
        self, sequences: Sequence[str], *, batch_size: int | None = None, device: str | torch.device | None = None
    ) -> np.ndarray:
        """Embed equal-length windows; returns a float32 array of shape ``(len(sequences), dim)``."""
        ...


def encode_bases(sequences: Sequence[str], *, length: int | None = None) -> np.ndarray:
    """Encode equal-length sequences as uint8 base codes (A=0, C=1, G=2, T=3, other=4), shape ``(n, length)``.

    Raises ValueError naming the first sequence whose length differs from ``length`` (default: the first's).
    """
    if len(sequences) == 0:
        return np.zeros((0, length or 0), dtype=np.uint8)
    length = len(sequences[0]) if length is None else length
    out = np.empty((len(sequences), length), dtype=np.uint8)
    for i, seq in enumerate(sequences):
        if not isinstance(seq, str):
            raise TypeError(f"sequences[{i}] is a {type(seq).__name__}, expected str.")
        if len(seq) != length:
            raise ValueError(f"sequences[{i}] has length {len(seq)}, expected {length} bp.")
        try:
            raw = np.frombuffer(seq.encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError as e:
            raise ValueError(f"sequences[{i}] contains non-ASCII characters.") from e
        out[i] = _BASE_CODES[raw]
    return out


def _hash_state_dict(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of all parameters and buffers."""
    h = hashlib.sha256()
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ident in seen:  # Enformer registers every trunk module twice (stem and _trunk.1)
            continue
        seen.add(ident)
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _hash_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Enformer
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pooling:
    """Where the pooled trunk bins lie for a given window (all indices on the uncropped trunk)."""

    n_total_bins: int
    first_bin: int
    last_bin: int  # inclusive
    tss_index: int  # index of the TSS base inside the window
    center_shift: int


def _pooling_geometry(window: int, bin_size: int, n_bins: int) -> _Pooling:
    """Place the TSS at the centre of the ``n_bins`` pooled bins.

    The trunk bin ``i`` summarises window bases ``[i * bin_size, (i + 1) * bin_size)``. With ``n = window //
    bin_size`` bins, the reference bin is ``c = n // 2``. For an odd ``n_bins`` the pooled bins are
    ``c - n_bins // 2 .. c + n_bins // 2`` and the TSS is put at the middle of bin ``c``, window index
    ``c * bin_size + bin_size // 2``; for an even ``n_bins`` the pooled bins are ``c - n_bins / 2 .. c + n_bins / 2
    - 1`` and the TSS sits on the boundary, window index ``c * bin_size``. Because the window's base ``window // 2``
    is ``TSS + center_shift``, ``center_shift = window // 2 - tss_index``.

    Official Enformer, ``n_bins=1``: window 196,608, n = 1,536, c = 768, TSS index 768 * 128 + 64 = 98,368,
    center_shift = 98,304 - 98,368 = -64 (half a bin upstream); after Enformer's symmetric crop to 896 bins (320
    removed on each side) that is output bin 448 = 896 // 2.
    """
    n = window // bin_size
    if n_bins > n:
        raise ValueError(f"n_bins={n_bins} is larger than the {n} trunk bins of a {window} bp window.")
    c = n // 2
    if n_bins % 2:
        first, last = c - n_bins // 2, c + n_bins // 2
        tss_index = c * bin_size + bin_size // 2
    else:
        first, last = c - n_bins // 2, c + n_bins // 2 - 1
        tss_index = c * bin_size
    return _Pooling(n, first, last, tss_index, window // 2 - tss_index)


def native_window(model: Enformer) -> int:
    """Return the input length (bp) the model was built for.

    For the official architecture (``target_length=896``, ``num_downsamples=7``) that is 196,608 bp: 1,536 trunk
    bins of 128 bp, of which Enformer's crop keeps the central 896. Other ``target_length`` values keep the same
    1,536:896 ratio of trunk bins to output bins (rounded up so that the crop is symmetric). Models built with
    ``target_length=-1`` (no crop) have no native length: pass ``window=`` explicitly.
    """
    cfg = model.config
    bin_size = 2**cfg.num_downsamples
    target = cfg.target_length
    if target is None or target <= 0:
        raise ValueError(
            "window: this Enformer has target_length=-1 (no crop), so it has no native input length; pass window=."
        )
    n = math.ceil(target * _OFFICIAL_INPUT_BINS / _OFFICIAL_TARGET_BINS)
    if (n - target) % 2:
        n += 1
    return n * bin_size


def _has_native_window(model: Enformer) -> bool:
    """Whether the model has a native input length (it crops to a positive ``target_length``)."""
    target = model.config.target_length
    return target is not None and target > 0


class EnformerEncoder:
    """Enformer trunk embedding of the bins at the TSS.

    Runs only what the embedding needs — stem, convolution tower and transformer — then takes the bins to pool
    *before* the (pointwise) final layer, applies it to those bins only and averages them. The output heads and
    Enformer's crop to ``target_length`` bins are never computed.

    **Pooling.** With ``n_bins=1`` (default, as in seq2cells) the window is shifted half a bin (64 bp for the
    official model) upstream so that the TSS sits at the middle of trunk bin ``n_total_bins // 2``; the result is
    that bin's ``2 * config.dim``-dimensional trunk embedding (3,072 for the official model). With ``n_bins > 1``
    the mean of the ``n_bins`` bins centred on the TSS is returned (odd: the TSS is in the middle of the central
    bin; even: the TSS lies on the boundary between the two central bins and the window is not shifted).
    See :attr:`center_shift`.

    **TensorFlow gamma features.** The official weights were trained with positional gamma features computed by
    TensorFlow (``use_tf_gamma=True``), which enformer-pytorch ships precomputed for 1,536 trunk bins only. For any
    other window the encoder temporarily switches the model's attention layers to the PyTorch gamma features
    (``use_tf_gamma=False``, numerically slightly different) during :meth:`embed` and logs a warning once; the
    model is left as it was afterwards.

    Parameters
    ----------
    model
        An :class:`enformer_pytorch.Enformer` (e.g. from :meth:`from_pretrained` or ``Enformer.from_hparams``).
        It is put in eval mode and moved to the compute device by :meth:`embed`.
    window
        Input length in bp; any positive multiple of ``2 ** config.num_downsamples`` (the bin size). Default: the
        model's native input length (196,608 bp for the official model; see :func:`native_window`). A model built
        with ``target_length=-1`` (no crop) has no native length: the encoder is then created without a window
        (:attr:`window` is ``None``) and ``sc_dta.tl.embed_dna(..., window=W)`` or :meth:`with_window` supplies
        it; embedding before that raises a :class:`ValueError`.
    n_bins
        Number of trunk bins around the TSS to average.
    name
        Encoder name recorded in ``adata.uns`` (default ``"enformer"``).
    weights_id
        Identifier of the weights, part of the embedding-cache key. Default: a sha256 of the model's state dict,
        computed on first use (if you change the weights afterwards, create a new encoder).
    """

    def __init__(
        self,
        model: Enformer,
        *,
        window: int | None = None,
        n_bins: int = 1,
        name: str | None = None,
        weights_id: str | None = None,
    ) -> None:
        from enformer_pytorch import Enformer

        if not isinstance(model, Enformer):
            raise TypeError(f"model must be an enformer_pytorch.Enformer, got {type(model).__name__}.")
        if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
        n_bins = int(n_bins)
        self.model = model
        self.bin_size = 2**model.config.num_downsamples
        self.n_bins = n_bins
        self.name = "enformer" if name is None else str(name)
        self._weights_id = weights_id
        self.dim = 2 * model.config.dim
        if window is None and not _has_native_window(model):
            # Uncropped model: no native length. The window comes later (embed_dna(window=...) / with_window).
            self.window: int | None = None
            self._geometry: _Pooling | None = None
            self.use_tf_gamma = False
            return
        window = native_window(model) if window is None else window
        if isinstance(window, numbers.Integral) and not isinstance(window, bool):
            window = int(window)
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0 or window % self.bin_size:
            raise ValueError(
                f"window={window!r} must be a positive multiple of the bin size {self.bin_size} bp "
                f"(2 ** num_downsamples)."
            )
        self.window = window
        self._geometry = _pooling_geometry(window, self.bin_size, n_bins)
        self.use_tf_gamma = self._tf_gamma_requested() and self._geometry.n_total_bins == TF_GAMMA_BINS
        if self._tf_gamma_requested() and not self.use_tf_gamma:
            logger.warning(
                "EnformerEncoder: the model uses TensorFlow gamma positional features, which exist only for "
                "%d trunk bins (%d bp); window=%d gives %d bins, so use_tf_gamma=False is used while embedding.",
                TF_GAMMA_BINS,
                TF_GAMMA_BINS * self.bin_size,
                window,
                self._geometry.n_total_bins,
            )

    # -- protocol attributes ------------------------------------------------------------------------------------
    def _require_window(self) -> _Pooling:
        """Return the pooling geometry; raise a clear error for an uncropped model that was given no window."""
        if self._geometry is None:
            raise ValueError(
                f"EnformerEncoder {self.name!r} has no window: its Enformer was built with target_length=-1 (no "
                "crop), so it has no native input length. Pass the window in bp to sc_dta.tl.embed_dna(window=...) "
                f"(or EnformerEncoder(model, window=...) / encoder.with_window(...)); it must be a positive multiple "
                f"of the bin size {self.bin_size} bp."
            )
        return self._geometry

    @property
    def center_shift(self) -> int:
        """Distance in bp from the TSS to the window centre (window index ``window // 2``), in transcription orientation."""
        return self._require_window().center_shift

    @property
    def pooling(self) -> str:
        """``"mean_tss_bins:<n_bins>"``: mean trunk embedding of the ``n_bins`` bins centred on the TSS."""
        return f"mean_tss_bins:{self.n_bins}"

    @property
    def weights_id(self) -> str:
        """Weights identifier (given, or a sha256 of the state dict computed on first access)."""
        if self._weights_id is None:
            self._weights_id = _hash_state_dict(self.model)
        return self._weights_id

    @property
    def tss_bins(self) -> tuple[int, int]:
        """First and last (inclusive) pooled bin on the uncropped trunk of ``window // bin_size`` bins."""
        geometry = self._require_window()
        return geometry.first_bin, geometry.last_bin

    @property
    def tss_index(self) -> int:
        """Index of the TSS base inside the transcription-oriented window."""
        return self._require_window().tss_index

    def cache_tag(self, device: str | torch.device | None = None) -> str:
        """Describe the settings besides the weights that change the numbers (positional features, precision)."""
        dtype = autocast_dtype(resolve_device(device))
        return f"tf_gamma={self.use_tf_gamma};precision={'float32' if dtype is None else str(dtype)}"

    def with_window(self, window: int) -> EnformerEncoder:
        """Return a copy of this encoder (sharing the model) with another window length."""
        return EnformerEncoder(
            self.model, window=window, n_bins=self.n_bins, name=self.name, weights_id=self._weights_id
        )

    def __repr__(self) -> str:
        shift = None if self._geometry is None else self.center_shift
        return (
            f"EnformerEncoder(name={self.name!r}, window={self.window}, n_bins={self.n_bins}, dim={self.dim}, "
            f"center_shift={shift}, use_tf_gamma={self.use_tf_gamma})"
        )

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | Path = OFFICIAL_ENFORMER,
        revision: str | None = None,
        *,
        use_tf_gamma: bool | None = None,
        **kwargs: Any,
    ) -> EnformerEncoder:
        """Load Enformer weights from a Hugging Face repository or a local directory.

        Parameters
        ----------
        repo_or_path
            Hugging Face repository id (resolved with :func:`sc_dta.datasets.hf_snapshot`, which honours
            ``HF_HUB_OFFLINE=1`` and pinned revisions) or a local directory written by ``save_pretrained``.
        revision
            Repository revision (commit, tag or branch); ignored for local directories.
        use_tf_gamma
            Whether the attention layers use the TensorFlow gamma positional features. Default: True for
            ``EleutherAI/enformer-official-rough`` (how those weights were trained), else the value stored in the
            model config. A local directory holding the official ``pytorch_model.bin`` (recognised by the sha256
            in the :mod:`sc_dta.datasets` registry) counts as the official model.
        **kwargs
            Passed to :class:`EnformerEncoder` (``window``, ``n_bins``, ``name``, ``weights_id``).
        """
        import enformer_pytorch

        local = Path(repo_or_path).expanduser()
        if local.is_dir():
            local_dir = local
        elif local.exists():
            raise ValueError(f"repo_or_path={str(repo_or_path)!r} is a file; expected a model directory or repo id.")
        else:
            local_dir = _hf_snapshot(str(repo_or_path), revision)
        repo_id, commit = _hf_cache_origin(local_dir)
        weights_hash = None
        if repo_id is None:  # a plain directory: identify the weights by their content
            weights_hash = _hash_files(_weight_files(local_dir))
        official = repo_id == OFFICIAL_ENFORMER or weights_hash == _official_weights_sha256()
        model = enformer_pytorch.from_pretrained(str(local_dir), use_tf_gamma=use_tf_gamma)
        if use_tf_gamma is None:
            use_tf_gamma = official or bool(getattr(model.config, "use_tf_gamma", False))
        _set_tf_gamma(model, bool(use_tf_gamma))
        model.eval()
        if kwargs.get("weights_id") is None:
            kwargs["weights_id"] = weights_hash if repo_id is None else f"{repo_id}@{commit or revision or 'unpinned'}"
        logger.info(
            "Loaded Enformer from %s (weights_id=%s, use_tf_gamma=%s)", local_dir, kwargs["weights_id"], use_tf_gamma
        )
        return cls(model, **kwargs)

    # -- computation --------------------------------------------------------------------------------------------
    def _tf_gamma_requested(self) -> bool:
        return any(getattr(m, "use_tf_gamma", False) for m in _attention_modules(self.model))

    @contextlib.contextmanager
    def _gamma_mode(self) -> Iterator[None]:
        modules = _attention_modules(self.model)
        saved = [m.use_tf_gamma for m in modules]
        try:
            for m in modules:
                m.use_tf_gamma = self.use_tf_gamma
            yield
        finally:
            for m, value in zip(modules, saved, strict=True):
                m.use_tf_gamma = value

    def _one_hot(self, codes: np.ndarray, device: torch.device) -> torch.Tensor:
        dtype = self.model.stem[0].weight.dtype  # float32 normally; follows a model cast with .half()/.bfloat16()
        table = torch.cat([torch.eye(4, device=device, dtype=dtype), torch.zeros(1, 4, device=device, dtype=dtype)])
        return table[torch.from_numpy(codes).to(device=device, dtype=torch.long)]

    def _forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot batch ``(b, window, 4)`` -> pooled trunk embedding ``(b, dim)`` in float32."""
        m = self.model
        h = m.stem(x.transpose(1, 2))
        h = m.conv_tower(h)
        h = m.transformer(h.transpose(1, 2))
        first, last = self.tss_bins
        h = m.final_pointwise(h[:, first : last + 1])
        return h.float().mean(dim=1)

    def _embed_range(self, codes: np.ndarray, out: np.ndarray, lo: int, hi: int, dev: torch.device) -> None:
        """Embed ``codes[lo:hi]`` into ``out[lo:hi]``, splitting the batch in two on CUDA out-of-memory errors."""
        try:
            out[lo:hi] = self._forward_pooled(self._one_hot(codes[lo:hi], dev)).cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            if hi - lo == 1:
                raise
            torch.cuda.empty_cache()
            mid = (lo + hi) // 2
            logger.warning("CUDA out of memory with %d windows per batch; retrying with %d", hi - lo, mid - lo)
            self._embed_range(codes, out, lo, mid, dev)
            self._embed_range(codes, out, mid, hi, dev)

    def embed(
        self,
        sequences: Sequence[str],
        *,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """Embed transcription-oriented windows of :attr:`window` bp.

        Parameters
        ----------
        sequences
            Window sequences (A/C/G/T, any case; N and other letters are encoded as all-zero one-hot columns).
        batch_size
            Windows per forward pass (default ``settings.batch_size_dna``); split automatically on CUDA
            out-of-memory errors.
        device
            Compute device (default ``settings.device``); bf16 autocast on CUDA unless ``settings.dtype`` says
            otherwise.

        Returns
        -------
        float32 array of shape ``(len(sequences), dim)``.
        """
        self._require_window()
        sequences = list(sequences)
        codes = encode_bases(sequences, length=self.window)
        n = len(sequences)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        batch_size = settings.batch_size_dna if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        dev = resolve_device(device)
        self.model.to(dev)
        was_training = self.model.training
        self.model.eval()
        starts = range(0, n, batch_size)
        batches = progress(starts, total=len(starts), desc=f"{self.name} batches") if len(starts) > 1 else starts
        try:
            with torch.inference_mode(), autocast(dev), self._gamma_mode():
                for start in batches:
                    self._embed_range(codes, out, start, min(start + batch_size, n), dev)
        finally:
            self.model.train(was_training)
        return out


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from enformer_pytorch.modeling_enformer import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def _set_tf_gamma(model: torch.nn.Module, value: bool) -> None:
    for m in _attention_modules(model):
        m.use_tf_gamma = value
    model.use_tf_gamma = value
    model.config.use_tf_gamma = value


def _weight_files(directory: Path) -> list[Path]:
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"No weight files (*.safetensors, *.bin) in {directory}.")


def _hf_cache_origin(directory: Path) -> tuple[str | None, str | None]:
    """``(repo_id, commit)`` when ``directory`` is a snapshot in the Hugging Face cache layout, else Nones.

    The layout is ``.../models--<owner>--<name>/snapshots/<commit>[/subfolder]``.
    """
    for path in (directory, directory.resolve()):
        parts = path.parts
        for i in range(len(parts) - 2, 0, -1):
            if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
                return parts[i - 1][len("models--") :].replace("--", "/"), parts[i + 1]
    return None, None


def _official_weights_sha256() -> str | None:
    """sha256 of the official ``pytorch_model.bin`` as recorded in the datasets registry (None if unknown)."""
    try:
        from sc_dta.datasets import registry

        digest = registry()["enformer"]["files"]["pytorch_model.bin"]["sha256"]
    except (ImportError, AttributeError, KeyError, TypeError):
        return None
    return f"sha256:{digest}" if digest else None


def _hf_snapshot(repo_id: str, revision: str | None) -> Path:
    """Resolve a Hugging Face repository to a local directory through :mod:`sc_dta.datasets`."""
    try:
        from sc_dta.datasets import hf_snapshot
    except (ImportError, AttributeError):  # datasets module not available: plain huggingface_hub
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision))
    return Path(hf_snapshot(repo_id, revision=revision))


# ----------------------------------------------------------------------------------------------------------------
# k-mer spectrum
# ----------------------------------------------------------------------------------------------------------------


class KmerEncoder:
    """Normalised k-mer frequency spectrum of the window: a fast, weight-free CPU baseline.

    Each window is mapped to the counts of its overlapping k-mers (k-mers containing N or any other non-ACGT
    letter are skipped) divided by the number of counted k-mers, so every row sums to 1 (or is all zero for a
    window without any valid k-mer). Columns are in lexicographic order of the k-mers (``A < C < G < T``, see
    :attr:`kmers`). With ``canonical=True`` each k-mer is counted together with its reverse complement (columns:
    the lexicographically smaller of each pair), which makes the spectrum strand-independent.

    Parameters
    ----------
    k
        k-mer length (1-12).
    window
        Window length in bp, centred on the TSS (``center_shift = 0``).
    canonical
        Merge each k-mer with its reverse complement.
    """

    center_shift = 0
    pooling = "spectrum"

    def __init__(self, k: int = 4, window: int = 2_000, *, canonical: bool = False) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= 12:
            raise ValueError(f"k must be an integer between 1 and 12, got {k!r}.")
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < k:
            raise ValueError(f"window must be an integer >= k={k}, got {window!r}.")
        k, window = int(k), int(window)
        self.k = k
        self.window = window
        self.canonical = bool(canonical)
        idx = np.arange(4**k)
        if self.canonical:
            rc = _revcomp_index(idx, k)
            canon = np.minimum(idx, rc)
            self._columns = np.unique(canon)
            self._column_of = np.searchsorted(self._columns, canon)
        else:
            self._columns = idx
            self._column_of = idx
        self.dim = int(len(self._columns))
        suffix = "c" if self.canonical else ""
        self.name = f"kmer{k}{suffix}"
        self.weights_id = f"kmer{k}{suffix}-w{window}"

    @property
    def kmers(self) -> list[str]:
        """The k-mer of each output column."""
        letters = np.array(list("ACGT"))
        digits = (self._columns[:, None] // 4 ** np.arange(self.k - 1, -1, -1)) % 4
        return ["".join(row) for row in letters[digits]]

    def with_window(self, window: int) -> KmerEncoder:
        """Return a copy of this encoder with another window length."""
        return KmerEncoder(self.k, window, canonical=self.canonical)

    def __repr__(self) -> str:
        return f"KmerEncoder(k={self.k}, window={self.window}, canonical={self.canonical})"

    def embed(
        self,
        sequences: Sequence[str],
        *,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """k-mer spectra of ``sequences`` (any lengths), float32 ``(len(sequences), dim)``.

        ``batch_size`` and ``device`` are accepted for protocol compatibility and ignored (numpy on the CPU).
        """
        sequences = list(sequences)
        n = len(sequences)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, seq in enumerate(sequences):
            if not isinstance(seq, str):
                raise TypeError(f"sequences[{i}] is a {type(seq).__name__}, expected str.")
        # Join with a separator letter (code 4): k-mers spanning two sequences contain it and are skipped.
        try:
            raw = np.frombuffer("N".join(sequences).encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError as e:
            raise ValueError("sequences contain non-ASCII characters.") from e
        codes = _BASE_CODES[raw].astype(np.int64)
        k = self.k
        n_kmers = len(codes) - k + 1
        if n_kmers <= 0:
            return np.zeros((n, self.dim), dtype=np.float32)
        index = np.zeros(n_kmers, dtype=np.int64)
        invalid = np.zeros(n_kmers, dtype=bool)
        for j in range(k):  # loop over the k offsets only, vectorised over positions
            c = codes[j : j + n_kmers]
            invalid |= c == 4
            index = index * 4 + np.minimum(c, 3)
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=n)
        seq_of = np.repeat(np.arange(n), lengths + 1)[:n_kmers]
        valid = ~invalid
        flat = seq_of[valid] * self.dim + self._column_of[index[valid]]
        counts = np.bincount(flat, minlength=n * self.dim).reshape(n, self.dim).astype(np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        np.divide(counts, totals, out=counts, where=totals > 0)
        return counts.astype(np.float32)


def _revcomp_index(index: np.ndarray, k: int) -> np.ndarray:
    rc = np.zeros_like(index)
    rest = index.copy()
    for _ in range(k):
        rc = rc * 4 + (3 - rest % 4)
        rest //= 4
    return rc


def encoder_info(encoder: DNAEncoder) -> dict[str, Any]:
    """JSON-serialisable description of an encoder (name, weights, window, pooling, ...)."""
    info: dict[str, Any] = {
        "name": str(encoder.name),
        "weights_id": str(encoder.weights_id),
        "window": int(encoder.window),
        "dim": int(encoder.dim),
        "center_shift": int(encoder.center_shift),
        "pooling": str(encoder.pooling),
    }
    n_bins = getattr(encoder, "n_bins", None)
    if n_bins is not None:
        info["n_bins"] = int(n_bins)
    return info


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
