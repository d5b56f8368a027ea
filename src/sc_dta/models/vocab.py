"""Geneformer gene vocabularies: token ids, gene medians and the gene-id mapping.

A :class:`GeneformerVocab` holds what Geneformer's rank-value encoding needs:

* ``token_ids``: Ensembl id or special token -> token id (the model's embedding rows),
* ``medians``: Ensembl id -> non-zero median of ``counts / n_counts * 10,000`` over the
  pretraining corpus (the normalisation factor of each gene),
* ``mapping``: upper-case symbol / alias / old Ensembl id -> Ensembl id.

The published dictionaries are Python pickles. They are read with a restricted unpickler
that accepts plain containers and numpy scalars only, never arbitrary objects, so a tampered
download cannot execute code. Vocabularies can also be written to (and read from) a single
JSON file with :meth:`GeneformerVocab.save`, which is faster to load and safe by design.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

logger = logging.getLogger(__name__)

__all__ = ["GeneformerVocab"]

#: Known published vocabularies: number of tokens, special tokens and model input size.
_VERSIONS: dict[str, dict[str, Any]] = {
    "V1": {"suffix": "_gc30M", "n_tokens": 25_426, "max_length": 2048, "registry": "v1"},
    "V2": {"suffix": "_gc104M", "n_tokens": 20_275, "max_length": 4096, "registry": "v2"},
}
#: The four dictionary kinds, their file stems and whether they must be present.
_KINDS: dict[str, tuple[str, bool]] = {
    "token_ids": ("token_dictionary", True),
    "medians": ("gene_median_dictionary", True),
    "mapping": ("ensembl_mapping_dict", False),
    "gene_names": ("gene_name_id_dict", False),
}
_JSON_NAME = "vocab.json"
#: The last vocabulary of each version loaded through the registry (treated as read-only).
_REGISTRY_CACHE: dict[tuple, GeneformerVocab] = {}
_JSON_FORMAT = "sc_dta.GeneformerVocab"
_SPECIAL_RE = re.compile(r"^<[^<>]+>$")

# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


def _numpy_scalar_constructor() -> Any:
    try:  # numpy >= 2
        module = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy 1.x
        module = importlib.import_module("numpy.core.multiarray")
    return module.scalar


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds builtin containers and numpy scalars.

    Every global a pickle asks for goes through :meth:`find_class`; everything but numpy's scalar
    reconstructor and :class:`numpy.dtype` is refused, so no function of the pickle's choosing can run.
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return np.dtype if name == "dtype" else _numpy_scalar_constructor()
        raise pickle.UnpicklingError(
            f"Refusing to load global {module}.{name} from {self._source}: Geneformer dictionaries may only "
            "contain strings, numbers and numpy scalars."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"Refusing persistent id {pid!r} in {self._source}.")


def _restricted_load(path: Path) -> Any:
    with open(path, "rb") as fh:
        return _RestrictedUnpickler(fh, source=str(path)).load()


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    return None


def _validate(obj: Any, kind: str, source: str) -> dict:
    """Check that ``obj`` is a dict of str -> (int | float | str) as ``kind`` requires; cast numpy scalars."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict for the {kind} dictionary, found {type(obj).__name__}.")
    out: dict = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: {kind} dictionary has a non-string key {key!r}.")
        if kind == "token_ids":
            cast = _as_int(value)
            if cast is None or cast < 0:
                raise ValueError(f"{source}: token id of {key!r} is {value!r}, not a non-negative integer.")
        elif kind == "medians":
            cast = _as_float(value)
            if cast is None:
                raise ValueError(f"{source}: median of {key!r} is {value!r}, not a number.")
        else:
            if not isinstance(value, str):
                raise ValueError(f"{source}: {kind} dictionary maps {key!r} to {value!r}, not a string.")
            cast = value
        out[key] = cast
    return out


def _read_dictionary(path: Path, kind: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"Geneformer {kind} dictionary not found: {path}")
    return _validate(_restricted_load(path), kind, str(path))


# --------------------------------------------------------------------------------------------
# The vocabulary
# --------------------------------------------------------------------------------------------


class GeneformerVocab:
    """A Geneformer gene vocabulary (token ids, gene medians, gene-id mapping).

    Usually obtained with :meth:`load` (the published ``"V1"`` / ``"V2"`` dictionaries or a local
    folder) or built from data with :meth:`from_adata`.

    Parameters
    ----------
    version
        ``"V1"``, ``"V2"`` or the name of a custom vocabulary.
    token_ids
        Ensembl id or special token (``"<pad>"``, ``"<mask>"``, ``"<cls>"``, ``"<eos>"``) -> token id.
        Ids must be unique and cover ``0 .. len - 1``.
    medians
        Ensembl id -> gene median used as normalisation factor. Every gene token needs one.
    mapping
        Upper-case symbol / alias / Ensembl id -> Ensembl id. Identity entries for every gene token
        are added when missing.
    gene_names
        Gene symbol -> Ensembl id (informative; its upper-cased symbols are added to ``mapping`` where
        ``mapping`` lacks them).
    max_length
        Model input size in tokens (special tokens included). Default: 2,048 for V1, 4,096 for V2 and
        custom vocabularies with ``<cls>``/``<eos>``, else 2,048.

    Attributes
    ----------
    pad_id, mask_id
        Token ids of ``<pad>`` and ``<mask>``.
    cls_id, eos_id
        Token ids of ``<cls>`` and ``<eos>``, or None when the vocabulary has none (V1).
    special_ids
        Sorted tuple of the special token ids.
    id_to_token
        Array of tokens (str) indexed by token id.
    median_by_id
        float64 array of gene medians indexed by token id (NaN for special tokens).
    """

    def __init__(
        self,
        version: str,
        token_ids: Mapping[str, int],
        medians: Mapping[str, float],
        mapping: Mapping[str, str] | None = None,
        gene_names: Mapping[str, str] | None = None,
        *,
        max_length: int | None = None,
    ) -> None:
        self.version = str(version)
        self.token_ids: dict[str, int] = {str(k): int(v) for k, v in token_ids.items()}
        self.medians: dict[str, float] = {str(k): float(v) for k, v in medians.items()}
        self.gene_names: dict[str, str] = dict(gene_names) if gene_names is not None else {}
        n = len(self.token_ids)
        if n == 0:
            raise ValueError("token_ids: the vocabulary is empty.")
        id_to_token = np.empty(n, dtype=object)
        seen = np.zeros(n, dtype=bool)
        for token, idx in self.token_ids.items():
            if not 0 <= idx < n:
                raise ValueError(f"token_ids: id {idx} of {token!r} is outside 0..{n - 1} (ids must be contiguous).")
            if seen[idx]:
                raise ValueError(f"token_ids: id {idx} is used twice (second time by {token!r}).")
            seen[idx] = True
            id_to_token[idx] = token
        self.id_to_token = id_to_token.astype(str)

        for name in ("<pad>", "<mask>"):
            if name not in self.token_ids:
                raise ValueError(f"token_ids: the vocabulary has no {name} token.")
        self.pad_id: int = self.token_ids["<pad>"]
        self.mask_id: int = self.token_ids["<mask>"]
        self.cls_id: int | None = self.token_ids.get("<cls>")
        self.eos_id: int | None = self.token_ids.get("<eos>")
        if (self.cls_id is None) != (self.eos_id is None):
            raise ValueError("token_ids: a vocabulary must have both <cls> and <eos> or neither.")
        self.special_ids: tuple[int, ...] = tuple(sorted(v for k, v in self.token_ids.items() if _SPECIAL_RE.match(k)))

        genes = [t for t in self.token_ids if not _SPECIAL_RE.match(t)]
        missing = [g for g in genes if g not in self.medians]
        if missing:
            raise ValueError(
                f"medians: {len(missing)} gene tokens have no median (e.g. {missing[:3]}); every gene token needs one."
            )
        median_by_id = np.full(n, np.nan)
        for g in genes:
            median_by_id[self.token_ids[g]] = self.medians[g]
        bad = genes and not np.all(np.isfinite(median_by_id[[self.token_ids[g] for g in genes]]))
        if bad or np.any(median_by_id[np.isfinite(median_by_id)] <= 0):
            raise ValueError("medians: gene medians must be finite and positive.")
        self.median_by_id = median_by_id

        full_mapping: dict[str, str] = {str(k).upper(): str(v) for k, v in (mapping or {}).items()}
        for symbol, gene in self.gene_names.items():
            full_mapping.setdefault(str(symbol).upper(), str(gene))
        for g in genes:
            full_mapping.setdefault(g.upper(), g)
        self.mapping: dict[str, str] = full_mapping

        if max_length is None:
            if self.version in _VERSIONS:
                max_length = _VERSIONS[self.version]["max_length"]
            else:
                max_length = 4096 if self.cls_id is not None else 2048
        max_length = int(max_length)
        if max_length < (3 if self.cls_id is not None else 1):
            raise ValueError(f"max_length={max_length} is too small for this vocabulary.")
        self.max_length: int = max_length

    # ---------------------------------------------------------------- basic protocol
    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        specials = ", ".join(self.id_to_token[i] for i in self.special_ids)
        return (
            f"GeneformerVocab(version={self.version!r}, n_tokens={len(self)}, max_length={self.max_length}, "
            f"special=[{specials}])"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneformerVocab):
            return NotImplemented
        return (
            self.version == other.version
            and self.max_length == other.max_length
            and self.token_ids == other.token_ids
            and self.medians == other.medians
            and self.mapping == other.mapping
            and self.gene_names == other.gene_names
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def has_special_tokens(self) -> bool:
        """Whether sequences carry ``<cls>`` ... ``<eos>`` (V2 style)."""
        return self.cls_id is not None

    @property
    def n_genes(self) -> int:
        """Number of gene (non-special) tokens."""
        return len(self) - len(self.special_ids)

    def gene_id(self, gene: str) -> str:
        """Resolve a symbol, alias or Ensembl id (any case) to the Ensembl id of a token in this vocabulary.

        Raises
        ------
        KeyError
            When ``gene`` does not map to a gene token.
        """
        key = str(gene).strip().upper()
        target = self.mapping.get(key, key)
        if target not in self.token_ids or _SPECIAL_RE.match(target):
            stripped = _strip_ensembl_version(key)
            target = self.mapping.get(stripped, stripped)
        if target not in self.token_ids or _SPECIAL_RE.match(target):
            raise KeyError(f"gene {gene!r} is not in the Geneformer {self.version} vocabulary.")
        return target

    def token_id(self, gene: str) -> int:
        """Token id of a gene given by symbol, alias or Ensembl id (see :meth:`gene_id`)."""
        return self.token_ids[self.gene_id(gene)]

    def lookup(self, ids: Any) -> np.ndarray:
        """Token id of each gene identifier (upper-cased, mapped, Ensembl versions stripped); -1 where absent."""
        out = np.full(len(ids), -1, dtype=np.int64)
        specials = {self.id_to_token[i] for i in self.special_ids}
        for i, raw in enumerate(ids):
            key = str(raw).strip().upper()
            target = self.mapping.get(key)
            if target is None or target not in self.token_ids:
                stripped = _strip_ensembl_version(key)
                if stripped != key:
                    target = self.mapping.get(stripped)
            if target is not None and target not in specials:
                tok = self.token_ids.get(target)
                if tok is not None:
                    out[i] = tok
        return out

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the vocabulary as ``vocab.json`` into ``directory`` (created if needed).

        Returns
        -------
        The path of the written file. Load it back with ``GeneformerVocab.load(directory)``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / _JSON_NAME
        content = {
            "format": _JSON_FORMAT,
            "format_version": 1,
            "version": self.version,
            "max_length": self.max_length,
            "token_ids": self.token_ids,
            "medians": self.medians,
            "mapping": self.mapping,
            "gene_names": self.gene_names,
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(content, fh, separators=(",", ":"))
        os.replace(tmp, path)
        return path

    @classmethod
    def _from_json(cls, path: Path) -> GeneformerVocab:
        try:
            with open(path, encoding="utf-8") as fh:
                content = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(content, dict) or content.get("format") != _JSON_FORMAT:
            raise ValueError(f"{path} is not a vocabulary written by GeneformerVocab.save.")
        src = str(path)
        return cls(
            content["version"],
            _validate(content["token_ids"], "token_ids", src),
            _validate(content["medians"], "medians", src),
            _validate(content.get("mapping") or {}, "mapping", src),
            _validate(content.get("gene_names") or {}, "gene_names", src),
            max_length=content.get("max_length"),
        )

    @classmethod
    def from_files(
        cls,
        token_dictionary: str | os.PathLike,
        gene_median_dictionary: str | os.PathLike,
        ensembl_mapping_dict: str | os.PathLike | None = None,
        gene_name_id_dict: str | os.PathLike | None = None,
        *,
        version: str | None = None,
        max_length: int | None = None,
    ) -> GeneformerVocab:
        """Build a vocabulary from Geneformer's pickled dictionaries (read with a restricted unpickler).

        ``version`` defaults to ``"V1"``/``"V2"`` when the token dictionary matches one of the published
        vocabularies (size and special tokens), else to the token dictionary's file stem.
        """
        paths = {
            "token_ids": token_dictionary,
            "medians": gene_median_dictionary,
            "mapping": ensembl_mapping_dict,
            "gene_names": gene_name_id_dict,
        }
        loaded = {kind: (_read_dictionary(Path(p), kind) if p is not None else None) for kind, p in paths.items()}
        token_ids = loaded["token_ids"]
        if version is None:
            version = _infer_version(token_ids) or Path(token_dictionary).stem
        elif version.upper() in _VERSIONS:
            version = version.upper()
            expected = _VERSIONS[version]["n_tokens"]
            if len(token_ids) != expected:
                logger.warning(
                    "Token dictionary %s has %d tokens; Geneformer %s has %d.",
                    token_dictionary,
                    len(token_ids),
                    version,
                    expected,
                )
        return cls(
            version,
            token_ids,
            loaded["medians"],
            loaded["mapping"],
            loaded["gene_names"],
            max_length=max_length,
        )

    @classmethod
    def load(
        cls, name_or_path: str | os.PathLike, *, version: str | None = None, max_length: int | None = None
    ) -> GeneformerVocab:
        """Load a Geneformer vocabulary.

        Parameters
        ----------
        name_or_path
            ``"V1"`` (gc30M dictionaries, 25,426 tokens) or ``"V2"`` (gc104M dictionaries, 20,275 tokens),
            fetched through :func:`sc_dta.datasets.fetch` (pinned revision, sha256-checked, cached; the
            loaded vocabulary is kept in memory and shared by later calls, so treat it as read-only); or a
            local path: a folder holding ``vocab.json`` (written by :meth:`save`) or the pickled dictionaries
            (``token_dictionary_gc104M.pkl``, ``gene_median_dictionary_gc104M.pkl``,
            ``ensembl_mapping_dict_gc104M.pkl``, ``gene_name_id_dict_gc104M.pkl``; ``*_gc30M.pkl`` for V1;
            or the same stems without suffix), or one of those files directly.
        version
            Which vocabulary to pick when a folder holds both V1 and V2 dictionaries; also the name
            given to the vocabulary.
        max_length
            Override the model input size (default 2,048 for V1, 4,096 for V2).

        Returns
        -------
        The vocabulary.
        """
        if (
            isinstance(name_or_path, str)
            and name_or_path.strip().upper() in _VERSIONS
            and not Path(name_or_path).exists()
        ):
            return cls._load_registry(name_or_path.strip().upper(), max_length=max_length)
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"name_or_path={str(name_or_path)!r} is neither 'V1', 'V2' nor an existing file or folder."
            )
        if path.is_file():
            if path.suffix == ".json":
                vocab = cls._from_json(path)
                return vocab if max_length is None else cls._with_max_length(vocab, max_length)
            return cls._load_pickles(path.parent, version=version, max_length=max_length, token_file=path)
        if (path / _JSON_NAME).is_file() and not _has_pickles(path):
            vocab = cls._from_json(path / _JSON_NAME)
            return vocab if max_length is None else cls._with_max_length(vocab, max_length)
        return cls._load_pickles(path, version=version, max_length=max_length)

    @classmethod
    def _with_max_length(cls, vocab: GeneformerVocab, max_length: int) -> GeneformerVocab:
        return cls(
            vocab.version, vocab.token_ids, vocab.medians, vocab.mapping, vocab.gene_names, max_length=max_length
        )

    @classmethod
    def _load_pickles(
        cls, folder: Path, *, version: str | None, max_length: int | None, token_file: Path | None = None
    ) -> GeneformerVocab:
        if token_file is not None:
            match = re.fullmatch(r"token_dictionary(.*)\.pkl", token_file.name)
            if match is None:
                raise ValueError(
                    f"{token_file} is not a token dictionary (expected token_dictionary*.pkl or vocab.json)."
                )
            suffixes = [match.group(1)]
        else:
            suffixes = [
                m.group(1)
                for p in folder.glob("token_dictionary*.pkl")
                if (m := re.fullmatch(r"token_dictionary(.*)\.pkl", p.name))
            ]
            if version is not None and version.upper() in _VERSIONS:
                wanted = _VERSIONS[version.upper()]["suffix"]
                suffixes = [s for s in suffixes if s == wanted] or [s for s in suffixes if s == ""]
            if not suffixes:
                if (folder / _JSON_NAME).is_file():
                    return cls._from_json(folder / _JSON_NAME)
                raise FileNotFoundError(
                    f"No Geneformer vocabulary in {folder}: expected vocab.json or token_dictionary*.pkl"
                    + (f" for version={version!r}" if version else "")
                    + "."
                )
            if len(suffixes) > 1:
                names = sorted(f"token_dictionary{s}.pkl" for s in suffixes)
                raise ValueError(f"{folder} holds several vocabularies ({names}); pass version='V1' or 'V2'.")
        suffix = suffixes[0]
        files: dict[str, Path | None] = {}
        for kind, (stem, required) in _KINDS.items():
            p = folder / f"{stem}{suffix}.pkl"
            if not p.is_file():
                if required:
                    raise FileNotFoundError(f"{p} is missing (needed with {folder / f'token_dictionary{suffix}.pkl'}).")
                p = None
            files[kind] = p
        if version is None:
            version = next((v for v, spec in _VERSIONS.items() if spec["suffix"] == suffix), None)
        return cls.from_files(
            files["token_ids"],  # type: ignore[arg-type]
            files["medians"],  # type: ignore[arg-type]
            files["mapping"],
            files["gene_names"],
            version=version,
            max_length=max_length,
        )

    @classmethod
    def _load_registry(cls, version: str, *, max_length: int | None) -> GeneformerVocab:
        from sc_dta.datasets import fetch

        key = _VERSIONS[version]["registry"]
        files = {
            kind: fetch(f"geneformer_{key}_{name}")
            for kind, name in (
                ("token_ids", "token_dictionary"),
                ("medians", "gene_median_dictionary"),
                ("mapping", "ensembl_mapping_dict"),
                ("gene_names", "gene_name_id_dict"),
            )
        }
        stamp = (version, max_length, *((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files.values()))
        cached = _REGISTRY_CACHE.get(stamp)
        if cached is None:
            cached = cls.from_files(
                files["token_ids"],
                files["medians"],
                files["mapping"],
                files["gene_names"],
                version=version,
                max_length=max_length,
            )
            for old in [k for k in _REGISTRY_CACHE if k[0] == version]:
                del _REGISTRY_CACHE[old]
            _REGISTRY_CACHE[stamp] = cached
        return cached

    # ---------------------------------------------------------------- custom vocabularies
    @classmethod
    def from_adata(
        cls,
        adata: AnnData | MuData,
        *,
        layer: str | None = None,
        gene_id_key: str | None = None,
        n_counts_key: str = "n_counts",
        special_tokens: bool = True,
        max_length: int = 4096,
        name: str = "custom",
        mod: str = "rna",
        chunk_size: int = 4096,
    ) -> GeneformerVocab:
        """Build a vocabulary over the genes of an AnnData holding raw counts.

        The median of a gene is Geneformer's normalisation factor: the median over the cells that
        express it (non-zero values only) of ``counts / n_counts * 10,000``, with ``n_counts`` the cell's
        total over all genes (``obs[n_counts_key]`` when present). Gene ids are upper-cased; vars with the
        same id are summed first. Token ids follow the special tokens (``<pad>`` = 0, ``<mask>`` = 1, and with
        ``special_tokens`` ``<cls>`` = 2, ``<eos>`` = 3) in var order; the mapping is the identity on the
        (upper-case) ids. Genes never expressed get no token (logged).

        Parameters
        ----------
        adata
            AnnData (or MuData, using modality ``mod``) with raw counts.
        layer
            Layer holding the counts (default ``X``).
        gene_id_key
            ``var`` column with the gene ids (default ``var_names``).
        n_counts_key
            ``obs`` column with total counts per cell; computed over all genes when absent.
        special_tokens
            Add ``<cls>``/``<eos>`` (V2-style sequences) or not (V1-style).
        max_length
            Model input size in tokens, special tokens included.
        name
            The vocabulary's ``version`` label.
        mod
            MuData modality.
        chunk_size
            Cells read at a time.

        Returns
        -------
        The new vocabulary.
        """
        from sc_dta.pp._tokenize import _gene_medians

        gene_ids, medians = _gene_medians(
            adata, layer=layer, gene_id_key=gene_id_key, n_counts_key=n_counts_key, mod=mod, chunk_size=chunk_size
        )
        specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if special_tokens else [])
        keep = np.isfinite(medians)
        if not keep.any():
            raise ValueError("adata: no gene has a non-zero count; cannot build a vocabulary.")
        if not keep.all():
            logger.info("from_adata: %d genes with no counts get no token.", int((~keep).sum()))
        token_ids = {tok: i for i, tok in enumerate(specials)}
        med: dict[str, float] = {}
        for gene, m in zip(gene_ids, medians, strict=True):
            if np.isfinite(m):
                token_ids[gene] = len(token_ids)
                med[gene] = float(m)
        return cls(name, token_ids, med, {g: g for g in med}, max_length=max_length)


def _strip_ensembl_version(key: str) -> str:
    match = re.fullmatch(r"(ENS[A-Z]*[GT]\d+)\.\d+(_PAR_Y)?", key)
    return match.group(1) if match and not match.group(2) else key


def _has_pickles(folder: Path) -> bool:
    return any(folder.glob("token_dictionary*.pkl"))


def _infer_version(token_ids: Mapping[str, int]) -> str | None:
    has_cls = "<cls>" in token_ids
    for version, spec in _VERSIONS.items():
        if len(token_ids) == spec["n_tokens"] and has_cls == (version == "V2"):
            return version
    return None
