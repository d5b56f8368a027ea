"""Motif-aware DNA encoder: JASPAR position weight matrices scanned over both strands of a window.

:class:`MotifEncoder` implements the :class:`~sc_dta.models.dna.DNAEncoder` protocol. For every motif it reports
how well the motif's best site in the window matches (``"max"``) and a soft count of near-consensus sites
(``"occupancy"``). Unlike a k-mer spectrum, these features change a lot when a mutation destroys a binding site
and hardly at all when a same-length change elsewhere leaves the sites intact, which is what a promoter
perturbation needs in order to depend on *what* it changes.

Motifs come from the JASPAR database shipped with :mod:`pyjaspar` (SQLite files inside the package, so no
network access is needed), or are given as position frequency matrices.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sc_dta._utils import progress, resolve_device
from sc_dta.models.dna import encode_bases

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: Pooled features per motif, in the order :class:`MotifEncoder` accepts them.
POOLINGS = ("max", "occupancy")
#: JASPAR release used when none is given.
DEFAULT_RELEASE = "JASPAR2024"
_BASES = "ACGT"
_JASPAR_ID = re.compile(r"^[A-Z]{2}\d{4}(\.\d+)?$", re.IGNORECASE)
_LN2 = math.log(2.0)
#: Target size (bytes) of the largest score tensor of one batch when ``batch_size`` is not given: small on the CPU
#: (the scores of a few windows stay in cache; larger batches are no faster), large on accelerators.
_BATCH_BYTES = {"cpu": 1 << 24, "other": 1 << 28}


@dataclass(frozen=True, eq=False)
class Motif:
    """One position frequency matrix.

    Attributes
    ----------
    id
        JASPAR matrix id with version (``"MA0482.3"``) or, for custom motifs, the name given.
    name
        TF name (``"GATA4"``).
    counts
        float64 array ``(4, length)``: rows A, C, G, T; columns motif positions (read-only).
    """

    id: str
    name: str
    counts: np.ndarray = field(repr=False)

    @property
    def length(self) -> int:
        """Motif length in bp."""
        return int(self.counts.shape[1])

    @property
    def label(self) -> str:
        """``"<id> <name>"``, or just the name for a custom motif (whose id is its name)."""
        return self.name if self.id == self.name else f"{self.id} {self.name}"

    @property
    def consensus(self) -> str:
        """Most frequent base at each position."""
        return "".join(_BASES[i] for i in self.counts.argmax(axis=0))


# ----------------------------------------------------------------------------------------------------------------
# JASPAR access (pyjaspar's bundled SQLite databases; results cached in-process)
# ----------------------------------------------------------------------------------------------------------------


def _releases() -> list[str]:
    import pyjaspar

    return list(pyjaspar.jaspar_releases)


def _open_db(release: str) -> Any:
    import pyjaspar

    releases = _releases()
    if release not in releases:
        raise ValueError(f"release={release!r} is not a JASPAR release shipped with pyjaspar; choose from {releases}.")
    return pyjaspar.jaspardb(release=release)


def _to_motif(record: Any) -> Motif:
    counts = np.array([record.counts[b] for b in _BASES], dtype=np.float64)
    counts.setflags(write=False)
    return Motif(id=str(record.matrix_id), name=str(record.name), counts=counts)


@lru_cache(maxsize=8)
def _db_choices(release: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return ``(collections, tax_groups)`` present in ``release``."""
    db = _open_db(release)
    try:
        cur = db.conn.cursor()
        collections = tuple(sorted(r[0] for r in cur.execute("select distinct COLLECTION from MATRIX")))
        groups = cur.execute("select distinct VAL from MATRIX_ANNOTATION where TAG = 'tax_group'")
        tax_groups = tuple(sorted(r[0] for r in groups))
    finally:
        db.conn.close()
    return collections, tax_groups


def _check_choice(argument: str, value: str | None, choices: Sequence[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a string or None, got {type(value).__name__}.")
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ValueError(f"{argument}={value!r} is not in this JASPAR release; choose from {list(choices)} or None (all).")


@lru_cache(maxsize=16)
def _load_collection(release: str, collection: str | None, tax_group: str | None) -> tuple[Motif, ...]:
    collections, tax_groups = _db_choices(release)
    collection = _check_choice("collection", collection, collections)
    tax_group = _check_choice("tax_group", tax_group, tax_groups)
    db = _open_db(release)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyjaspar warns (BiopythonWarning) when a selection is empty
            records = db.fetch_motifs(collection=collection, tax_group=tax_group)
    finally:
        db.conn.close()
    motifs = tuple(sorted((_to_motif(r) for r in records), key=lambda m: m.id))
    logger.info("Loaded %d JASPAR motifs (%s, %s, %s)", len(motifs), release, collection, tax_group)
    return motifs


@lru_cache(maxsize=4096)
def _fetch_by_id(release: str, matrix_id: str) -> Motif | None:
    db = _open_db(release)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown ids: pyjaspar warns and returns None
            record = db.fetch_motif_by_id(matrix_id)
    finally:
        db.conn.close()
    return None if record is None else _to_motif(record)


def load_jaspar(
    release: str = DEFAULT_RELEASE, *, collection: str | None = "CORE", tax_group: str | None = "vertebrates"
) -> list[Motif]:
    """All motifs (latest version of each matrix) of a JASPAR collection and taxonomic group.

    Read offline from the SQLite database bundled with :mod:`pyjaspar`; cached in-process, so repeated calls are
    free.

    Parameters
    ----------
    release
        JASPAR release, e.g. ``"JASPAR2024"`` (see ``pyjaspar.jaspar_releases``).
    collection
        JASPAR collection (``"CORE"``, ``"UNVALIDATED"``; None: all).
    tax_group
        Taxonomic group (``"vertebrates"``, ``"insects"``, ``"plants"``, ...; None: all).

    Returns
    -------
    List of :class:`Motif`, sorted by matrix id.
    """
    motifs = _load_collection(release, collection, tax_group)
    if not motifs:
        raise ValueError(f"No motifs in {release} with collection={collection!r} and tax_group={tax_group!r}.")
    return list(motifs)


# ----------------------------------------------------------------------------------------------------------------
# Matrices
# ----------------------------------------------------------------------------------------------------------------


def _custom_counts(key: str, value: Any) -> np.ndarray:
    """Read a user's matrix (4 x L, L x 4 or a mapping A/C/G/T -> column values) as float64 ``(4, L)``."""
    if isinstance(value, Mapping):
        letters = {str(k).upper(): v for k, v in value.items()}
        if set(letters) != set(_BASES):
            raise ValueError(f"motifs[{key!r}]: a mapping must have exactly the keys A, C, G, T, got {sorted(value)}.")
        value = [letters[b] for b in _BASES]
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"motifs[{key!r}]: could not read a numeric matrix ({e}).") from e
    if arr.ndim != 2 or 4 not in arr.shape or min(arr.shape) < 1:
        raise ValueError(
            f"motifs[{key!r}]: expected a 4 x L or L x 4 matrix (rows/columns A, C, G, T), got shape {arr.shape}."
        )
    if arr.shape[0] != 4:  # L x 4 (a 4 x 4 matrix is read as rows A, C, G, T)
        arr = arr.T
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"motifs[{key!r}]: counts must be finite and non-negative.")
    if np.allclose(arr.sum(axis=0), 1.0, atol=1e-3):
        warnings.warn(
            f"motifs[{key!r}]: the columns sum to 1, so this looks like a probability matrix. Values are read as "
            "counts, to which the pseudocount is added; multiply probabilities by the number of sites (e.g. 100).",
            UserWarning,
            stacklevel=4,
        )
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def log_odds(counts: np.ndarray, *, pseudocount: float = 0.8, background: Sequence[float] | None = None) -> np.ndarray:
    """Log-odds position weight matrix in bits, float64 ``(4, L)``.

    ``p[b, j] = (counts[b, j] + 4 * pseudocount * bg[b]) / (N_j + 4 * pseudocount)`` with ``N_j`` the column
    total, and ``pwm = log2(p / bg)``. With the uniform background this is Biopython's
    ``counts.normalize(pseudocounts=pseudocount).log_odds()``.
    """
    bg = _background(background)
    counts = np.asarray(counts, dtype=np.float64)
    probs = (counts + 4 * pseudocount * bg[:, None]) / (counts.sum(axis=0) + 4 * pseudocount)
    with np.errstate(divide="ignore"):
        return np.log2(probs / bg[:, None])


def _background(background: Sequence[float] | Mapping[str, float] | None) -> np.ndarray:
    if background is None:
        return np.full(4, 0.25)
    if isinstance(background, Mapping):
        letters = {str(k).upper(): v for k, v in background.items()}
        if set(letters) != set(_BASES):
            raise ValueError(f"background: a mapping must have the keys A, C, G, T, got {sorted(background)}.")
        background = [letters[b] for b in _BASES]
    try:
        bg = np.array(background, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"background must be 4 probabilities (A, C, G, T), got {background!r}.") from e
    if bg.shape != (4,) or not np.isfinite(bg).all() or (bg <= 0).any() or abs(bg.sum() - 1) > 1e-3:
        raise ValueError(f"background must be 4 positive probabilities (A, C, G, T) summing to 1, got {background!r}.")
    return bg / bg.sum()


def _revcomp_pwm(pwm: np.ndarray) -> np.ndarray:
    """Return the matrix that scores the reverse strand: complemented bases (A<->T, C<->G), reversed positions."""
    return pwm[::-1, ::-1]


@dataclass(frozen=True)
class _Group:
    """Motifs of one length, scanned with one convolution."""

    length: int
    index: np.ndarray  # positions of these motifs in the encoder's motif list
    weight: torch.Tensor  # (2 * n, 4, length) float32: forward matrices, then reverse-strand matrices
    best: torch.Tensor  # (n,) float32, best achievable score in bits


class _Scanner:
    """Score every position of one-hot windows against every motif, on both strands."""

    def __init__(self, pwms: Sequence[np.ndarray]) -> None:
        self.best = np.array([p.max(axis=0).sum() for p in pwms], dtype=np.float64)
        lengths = np.array([p.shape[1] for p in pwms])
        self.groups: list[_Group] = []
        for length in np.unique(lengths):
            index = np.flatnonzero(lengths == length)
            fwd = np.stack([pwms[i] for i in index])
            rev = np.stack([_revcomp_pwm(pwms[i]) for i in index])
            weight = torch.from_numpy(np.concatenate([fwd, rev]).astype(np.float32))
            best = torch.from_numpy(self.best[index].astype(np.float32))
            self.groups.append(_Group(int(length), index, weight, best))
        self.max_group = max(len(g.index) for g in self.groups)
        self._on: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def tensors(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(weight, best, index)`` of each group on ``device`` (moved once, then reused)."""
        if device not in self._on:
            self._on[device] = [
                (g.weight.to(device), g.best.to(device), torch.from_numpy(g.index).to(device)) for g in self.groups
            ]
        return self._on[device]

    @staticmethod
    def one_hot(codes: np.ndarray, device: torch.device) -> torch.Tensor:
        """uint8 codes ``(b, L)`` -> float32 ``(b, 4, L)``; code 4 (N, other letters) -> a zero column."""
        table = torch.cat([torch.eye(4), torch.zeros(1, 4)]).to(device)
        return table[torch.from_numpy(codes).to(device=device, dtype=torch.long)].transpose(1, 2).contiguous()

    def scores(self, x: torch.Tensor, g: int, device: torch.device) -> torch.Tensor:
        """Scores (bits) of group ``g``: ``(b, 2, n, L - length + 1)``, strand 0 = forward, 1 = reverse."""
        weight = self.tensors(device)[g][0]
        s = torch.nn.functional.conv1d(x, weight)
        return s.view(x.shape[0], 2, weight.shape[0] // 2, s.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------


class MotifEncoder:
    """Transcription-factor motif features of a DNA window (JASPAR position weight matrices).

    Each motif's counts become a log-odds matrix in bits (:func:`log_odds`: counts plus ``pseudocount`` against
    ``background``), which is scored at every position of the window on both strands (a second, reverse-complement
    matrix; one ``torch`` convolution per motif length over the one-hot window). N and other non-ACGT letters
    contribute 0, i.e. are as likely under the motif as under the background. Per motif, with ``best`` the
    highest score the motif can reach (its consensus):

    ``"max"``
        ``max(score) / best`` over positions and strands, clipped to ``[0, 1]``: 1 means a consensus site.
    ``"occupancy"``
        ``log1p(sum(exp(ln_score - ln_best)))`` over positions and strands, where ``exp(ln_score - ln_best) =
        2 ** (score - best)`` is a site's likelihood ratio relative to the consensus: a soft count of
        near-consensus sites (a consensus site adds 1, one mismatch at an informative position about 1/10 or less;
        a palindromic consensus site counts on both strands).

    Columns are motif-major: column ``i * len(pooling) + j`` is pooling ``pooling[j]`` of motif ``i`` (see
    :attr:`feature_names`, :meth:`feature_index`). The window is centred on the TSS (``center_shift = 0``).

    Parameters
    ----------
    motifs
        None: every motif (latest version of each matrix) of ``release``/``collection``/``tax_group``. A list of
        JASPAR matrix ids (``"MA0482.3"``; without a version, the latest; looked up in the whole release) and/or
        TF names (case-insensitive, matched within ``collection``/``tax_group``; a name that several matrices
        share selects all of them). Or a dict ``name -> position frequency matrix``: counts as a ``4 x L`` or
        ``L x 4`` array (rows/columns A, C, G, T; a 4 x 4 matrix is read as rows A, C, G, T) or a mapping
        ``{"A": [...], "C": [...], "G": [...], "T": [...]}``.
    window
        Window length in bp; at least the longest motif.
    release
        JASPAR release shipped with :mod:`pyjaspar`.
    collection
        JASPAR collection (None: all).
    tax_group
        JASPAR taxonomic group (None: all).
    pooling
        Features per motif, a subset of ``("max", "occupancy")`` in the order wanted (or one string such as
        ``"max+occupancy"``).
    pseudocount
        Added to the counts of each column, spread over the bases in proportion to the background (see
        :func:`log_odds`; JASPAR's default 0.8). Must be positive unless no matrix has a zero count.
    background
        Base probabilities A, C, G, T (sequence or mapping; default uniform 0.25).

    Examples
    --------
    >>> enc = MotifEncoder(["GATA4", "TBX5"], window=500)  # doctest: +SKIP
    >>> enc.hits(window_sequence)  # doctest: +SKIP
    """

    center_shift = 0

    def __init__(
        self,
        motifs: Sequence[str] | str | Mapping[str, Any] | None = None,
        window: int = 1000,
        *,
        release: str = DEFAULT_RELEASE,
        collection: str | None = "CORE",
        tax_group: str | None = "vertebrates",
        pooling: Sequence[str] | str = ("max", "occupancy"),
        pseudocount: float = 0.8,
        background: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        self.pooling_steps = _parse_pooling(pooling)
        if (
            isinstance(pseudocount, bool)
            or not isinstance(pseudocount, numbers.Real)
            or not math.isfinite(pseudocount)
            or pseudocount < 0
        ):
            raise ValueError(f"pseudocount must be a non-negative number, got {pseudocount!r}.")
        self.pseudocount = float(pseudocount)
        self.background = _background(background)
        self.release = release
        self.collection = collection
        self.tax_group = tax_group
        resolved, self.name = self._resolve(motifs)
        self.motifs: tuple[Motif, ...] = resolved
        self._pwms = []
        for m in resolved:
            pwm = log_odds(m.counts, pseudocount=self.pseudocount, background=self.background)
            if not np.isfinite(pwm).all():
                raise ValueError(
                    f"motif {m.label} has zero counts, which give -inf scores with pseudocount=0; use pseudocount > 0."
                )
            if pwm.max(axis=0).sum() <= 1e-6:
                raise ValueError(
                    f"motif {m.label} is uninformative: every column equals the background, so its best score is 0."
                )
            pwm.setflags(write=False)
            self._pwms.append(pwm)
        self._scanner = _Scanner(self._pwms)
        self.dim = len(resolved) * len(self.pooling_steps)
        self.window = self._check_window(window)
        self.weights_id = self._weights_id()

    # -- construction helpers -----------------------------------------------------------------------------------
    def _resolve(self, motifs: Any) -> tuple[tuple[Motif, ...], str]:
        if not isinstance(self.release, str):
            raise TypeError(f"release must be a string such as 'JASPAR2024', got {type(self.release).__name__}.")
        if motifs is None:
            found = load_jaspar(self.release, collection=self.collection, tax_group=self.tax_group)
            parts = [self.release, self.collection or "all", self.tax_group or "all"]
            return tuple(found), "-".join(p.lower() for p in parts)
        if isinstance(motifs, Mapping):
            if not motifs:
                raise ValueError("motifs is empty: give at least one motif.")
            out = []
            for key, value in motifs.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"motifs: dict keys must be non-empty motif names, got {key!r}.")
                out.append(Motif(id=key, name=key, counts=_custom_counts(key, value)))
            return tuple(out), "motif-custom"
        if isinstance(motifs, str):
            motifs = [motifs]
        if not isinstance(motifs, Iterable):
            raise TypeError(f"motifs must be None, a list of JASPAR ids/names or a dict, got {type(motifs).__name__}.")
        motifs = list(motifs)
        if not motifs:
            raise ValueError("motifs is empty: give at least one motif id or name (or None for the whole collection).")
        _open_db(self.release).conn.close()  # validates the release before any lookup
        out, seen = [], set()
        pool: tuple[Motif, ...] | None = None
        for item in motifs:
            if not isinstance(item, str) or not item.strip():
                raise TypeError(f"motifs: expected JASPAR matrix ids or TF names (strings), got {item!r}.")
            item = item.strip()
            if _JASPAR_ID.match(item):
                m = _fetch_by_id(self.release, item.upper())
                if m is None:
                    raise ValueError(f"motifs: {item!r} is not a matrix id in {self.release}.")
                matches = [m]
            else:
                if pool is None:
                    pool = _load_collection(self.release, self.collection, self.tax_group)
                matches = [m for m in pool if m.name.lower() == item.lower()]
                if not matches:
                    close = difflib.get_close_matches(item, sorted({m.name for m in pool}), n=5)
                    hint = f"; close matches: {close}" if close else ""
                    raise ValueError(
                        f"motifs: no motif named {item!r} in {self.release} (collection={self.collection!r}, "
                        f"tax_group={self.tax_group!r}){hint}. Pass a matrix id, or collection=None/tax_group=None."
                    )
            for m in matches:
                if m.id in seen:
                    raise ValueError(f"motifs: {m.id} ({m.name}) is selected twice (by {item!r}).")
                seen.add(m.id)
                out.append(m)
        return tuple(out), f"{self.release.lower()}-selected"

    def _check_window(self, window: Any) -> int:
        longest = max(self.motifs, key=lambda m: m.length)
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < longest.length:
            raise ValueError(
                f"window must be an integer of at least the longest motif's length ({longest.label}, {longest.length} bp), "
                f"got {window!r}."
            )
        return int(window)

    def _weights_id(self) -> str:
        h = hashlib.sha256()
        params = {
            "encoder": "MotifEncoder/1",
            "release": self.release if self.name != "motif-custom" else None,
            "pooling": list(self.pooling_steps),
            "pseudocount": self.pseudocount,
            "background": self.background.tolist(),
            "window": self.window,
        }
        h.update(json.dumps(params, sort_keys=True).encode())
        for m, pwm in zip(self.motifs, self._pwms, strict=True):
            h.update(f"|{m.id}|{m.name}|{pwm.shape[1]}|".encode())
            h.update(np.ascontiguousarray(pwm, dtype="<f8").tobytes())
        return "sha256:" + h.hexdigest()

    # -- protocol attributes and descriptions -------------------------------------------------------------------
    @property
    def pooling(self) -> str:
        """Features per motif joined by ``+``, e.g. ``"max+occupancy"``."""
        return "+".join(self.pooling_steps)

    @property
    def n_motifs(self) -> int:
        """Number of motifs."""
        return len(self.motifs)

    @property
    def motif_ids(self) -> list[str]:
        """Matrix id of each motif (custom motifs: their name)."""
        return [m.id for m in self.motifs]

    @property
    def motif_names(self) -> list[str]:
        """TF name of each motif."""
        return [m.name for m in self.motifs]

    @property
    def pwms(self) -> list[np.ndarray]:
        """Log-odds matrices in bits, float64 ``(4, length)`` each (rows A, C, G, T)."""
        return list(self._pwms)

    @property
    def best_scores(self) -> np.ndarray:
        """Best achievable score (bits) of each motif: the score of its consensus."""
        return self._scanner.best.copy()

    @property
    def feature_names(self) -> list[str]:
        """Name of each output column: ``"<id> <name> <pooling>"`` (custom motifs: ``"<name> <pooling>"``)."""
        return [f"{m.label} {p}" for m in self.motifs for p in self.pooling_steps]

    def feature_index(self, motif: str, pooling: str = "max") -> int:
        """Column of ``pooling`` of ``motif`` (a matrix id, with or without version, or a unique TF name)."""
        if pooling not in self.pooling_steps:
            raise ValueError(f"pooling={pooling!r} is not computed by this encoder ({list(self.pooling_steps)}).")
        (i,) = self._motif_indices([motif], unique=True)
        return i * len(self.pooling_steps) + self.pooling_steps.index(pooling)

    def _motif_indices(self, motifs: Sequence[str], *, unique: bool = False) -> list[int]:
        out: list[int] = []
        for item in motifs:
            if not isinstance(item, str):
                raise TypeError(f"motifs: expected motif ids or names, got {item!r}.")
            key = item.strip().upper()
            found = [i for i, m in enumerate(self.motifs) if m.id.upper() == key]
            if not found:
                found = [i for i, m in enumerate(self.motifs) if m.id.split(".")[0].upper() == key]
            if not found:
                found = [i for i, m in enumerate(self.motifs) if m.name.upper() == key]
            if not found:
                raise ValueError(f"motif {item!r} is not one of this encoder's {self.n_motifs} motifs.")
            if unique and len(found) > 1:
                ids = [self.motifs[i].id for i in found]
                raise ValueError(f"motif {item!r} names several motifs {ids}; pass a matrix id.")
            out.extend(i for i in found if i not in out)
        return out

    def with_window(self, window: int) -> MotifEncoder:
        """Return a copy of this encoder (sharing the matrices) with another window length."""
        new = copy.copy(self)
        new.window = new._check_window(window)
        new.weights_id = new._weights_id()
        return new

    def __repr__(self) -> str:
        return (
            f"MotifEncoder(name={self.name!r}, n_motifs={self.n_motifs}, window={self.window}, "
            f"pooling={self.pooling!r}, dim={self.dim}, pseudocount={self.pseudocount})"
        )

    # -- computation --------------------------------------------------------------------------------------------
    def _auto_batch_size(self, device: torch.device) -> int:
        per_window = 4 * 2 * self._scanner.max_group * self.window
        return max(1, _BATCH_BYTES["cpu" if device.type == "cpu" else "other"] // per_window)

    def embed(
        self,
        sequences: Sequence[str],
        *,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """Motif features of windows of :attr:`window` bp.

        Parameters
        ----------
        sequences
            Window sequences, all :attr:`window` bp (A/C/G/T in any case; N and other letters score 0).
        batch_size
            Windows scanned together (default: as many as keep each score tensor near 16 MiB on the CPU, 256 MiB
            on an accelerator).
        device
            Compute device (default ``settings.device``); always float32 (TF32 off on CUDA).

        Returns
        -------
        float32 array ``(len(sequences), dim)``, columns as in :attr:`feature_names`.
        """
        sequences = list(sequences)
        codes = encode_bases(sequences, length=self.window)
        n = len(sequences)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        dev = resolve_device(device)
        if batch_size is None:
            batch_size = self._auto_batch_size(dev)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        batch_size = int(batch_size)
        steps = self.pooling_steps
        n_steps = len(steps)
        starts = range(0, n, batch_size)
        batches = progress(starts, total=len(starts), desc=f"{self.name} batches") if len(starts) > 1 else starts
        with torch.inference_mode(), _full_float32(dev):
            tensors = self._scanner.tensors(dev)
            for start in batches:
                stop = min(start + batch_size, n)
                x = self._scanner.one_hot(codes[start:stop], dev)
                feats = torch.empty((stop - start, self.n_motifs, n_steps), dtype=torch.float32, device=dev)
                for g in range(len(self._scanner.groups)):
                    s = self._scanner.scores(x, g, dev)  # (b, 2, n_g, positions)
                    _, best, index = tensors[g]
                    if "max" in steps:
                        rel = (s.amax(dim=(1, 3)) / best).clamp_(0.0, 1.0)
                        feats[:, index, steps.index("max")] = rel
                    if "occupancy" in steps:  # in place: s is not needed afterwards
                        s.sub_(best[None, None, :, None]).mul_(_LN2).exp_()
                        feats[:, index, steps.index("occupancy")] = torch.log1p(s.sum(dim=(1, 3)))
                out[start:stop] = feats.reshape(stop - start, self.dim).cpu().numpy()
        return out

    def hits(
        self,
        sequence: str,
        *,
        min_relative_score: float = 0.85,
        motifs: Sequence[str] | str | None = None,
    ) -> pd.DataFrame:
        """Strong motif sites in one sequence.

        Parameters
        ----------
        sequence
            DNA sequence of any length (normally a window); coordinates refer to it.
        min_relative_score
            Report sites with ``score / best >= min_relative_score`` (the quantity behind the ``"max"`` feature;
            1 = consensus). Note that this is stricter than JASPAR's ``(score - min) / (max - min)``.
        motifs
            Restrict to these motifs of the encoder (matrix ids, with or without version, or TF names).

        Returns
        -------
        DataFrame with one row per site, sorted by ``start``: ``motif_id``, ``name``, ``start``, ``end`` (0-based,
        end exclusive), ``strand`` (``"+"``: the motif reads along the sequence; ``"-"``: along its reverse
        complement, on the same bases ``start:end``), ``score`` (bits) and ``relative_score``.
        """
        import pandas as pd

        if not isinstance(sequence, str):
            raise TypeError(f"sequence must be a str, got {type(sequence).__name__}.")
        if (
            isinstance(min_relative_score, bool)
            or not isinstance(min_relative_score, numbers.Real)
            or not 0 <= min_relative_score <= 1
        ):
            raise ValueError(f"min_relative_score must be a number in [0, 1], got {min_relative_score!r}.")
        selected = None
        if motifs is not None:
            selected = set(self._motif_indices([motifs] if isinstance(motifs, str) else list(motifs)))
        codes = encode_bases([sequence])
        dev = torch.device("cpu")
        x = self._scanner.one_hot(codes, dev)
        rows: dict[str, list[np.ndarray]] = {k: [] for k in ("motif", "start", "strand", "score")}
        with torch.inference_mode():
            for g, group in enumerate(self._scanner.groups):
                if group.length > len(sequence) or (selected is not None and selected.isdisjoint(group.index.tolist())):
                    continue
                s = self._scanner.scores(x, g, dev)[0].double().numpy()  # (2, n_g, positions)
                rel = s / self._scanner.best[group.index][None, :, None]
                strand, local, start = np.nonzero(rel >= min_relative_score - 1e-6)
                motif = group.index[local]
                if selected is not None:
                    keep = np.isin(motif, list(selected))
                    strand, local, start, motif = strand[keep], local[keep], start[keep], motif[keep]
                rows["motif"].append(motif)
                rows["start"].append(start)
                rows["strand"].append(strand)
                rows["score"].append(s[strand, local, start])
        cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}
        motif = cat["motif"].astype(np.int64)
        lengths = np.array([m.length for m in self.motifs], dtype=np.int64)
        start = cat["start"].astype(np.int64)
        best = self._scanner.best[motif]
        frame = pd.DataFrame(
            {
                "motif_id": pd.Series([self.motifs[i].id for i in motif], dtype=object),
                "name": pd.Series([self.motifs[i].name for i in motif], dtype=object),
                "start": start,
                "end": start + lengths[motif],
                "strand": np.where(cat["strand"].astype(np.int64) == 0, "+", "-"),
                "score": cat["score"].astype(np.float64),
                "relative_score": np.minimum(cat["score"] / best, 1.0) if len(motif) else np.zeros(0),
            }
        )
        frame = frame.sort_values(["start", "end", "motif_id", "strand"], kind="stable", ignore_index=True)
        return frame


def _parse_pooling(pooling: Sequence[str] | str) -> tuple[str, ...]:
    steps = tuple(pooling.split("+")) if isinstance(pooling, str) else tuple(pooling)
    if not steps:
        raise ValueError(f"pooling must name at least one of {POOLINGS}.")
    for s in steps:
        if s not in POOLINGS:
            raise ValueError(f"pooling: {s!r} is not one of {POOLINGS}.")
    if len(set(steps)) != len(steps):
        raise ValueError(f"pooling: {pooling!r} names a feature twice.")
    return steps


@contextlib.contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """Full float32 convolutions on CUDA while scanning (TF32 would round the scores to about 3 digits)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved
