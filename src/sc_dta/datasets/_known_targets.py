"""Known transcription-factor targets: the CollecTRI TF -> target network through the data registry.

CollecTRI (Müller-Dott et al. 2023) is the signed TF -> target network that decoupler
(``dc.op.collectri``) and OmniPath serve. :func:`known_targets` downloads it once through
:func:`~sc_dta.datasets.fetch` (hash-checked, cached, offline-capable) or reads a local copy,
and returns a decoupler-style table: ``source`` (regulator), ``target``, ``weight``
(+1 activation, -1 repression). :func:`targets_from_table` turns such a table, or one a user
brings, into the gene list of one TF.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["known_targets", "targets_from_table"]

logger = logging.getLogger(__name__)

#: Registry file entry of each network, by source and organism.
SOURCES: Mapping[str, Mapping[str, str]] = {
    "collectri": {"human": "collectri_human", "mouse": "collectri_mouse"},
}
_SOURCE_LABELS = {"collectri": "CollecTRI"}
_ORGANISM_ALIASES = {
    "human": "human",
    "homo sapiens": "human",
    "homo_sapiens": "human",
    "hsapiens": "human",
    "9606": "human",
    "mouse": "mouse",
    "mus musculus": "mouse",
    "mus_musculus": "mouse",
    "mmusculus": "mouse",
    "10090": "mouse",
}
_SIGNS = ("any", "activating", "repressing")

# Column names understood in a network file or table, in order of preference (matched case-insensitively).
# OmniPath tables have both `source` (UniProt ids, "COMPLEX:...") and `source_genesymbol`: the symbol wins.
_SOURCE_COLUMNS = ("source_genesymbol", "source", "tf", "regulator", "transcription_factor")
_TARGET_COLUMNS = ("target_genesymbol", "target", "target_gene", "gene", "gene_symbol")
_WEIGHT_COLUMNS = ("weight", "mor")
_EVIDENCE_COLUMNS = {"resources": ("resources", "sources"), "references": ("references", "pmid")}
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def known_targets(
    tf: str | Sequence[str] | None = None,
    source: str = "collectri",
    *,
    organism: str | int = "human",
    sign: Literal["any", "activating", "repressing"] = "any",
    path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Known targets of transcription factors from a curated TF -> target network (CollecTRI).

    The network is read from the data registry (downloaded once, hash-checked where a hash is
    pinned, cached under ``dta.settings.cache_dir / "data"``; see :func:`~sc_dta.datasets.fetch`
    for offline use and the ``SC_DTA_DATA_URL`` mirror) or from a local file given as ``path``.

    ============ ======================================================================= =================
    organism     file (registry name)                                                    complexes
    ============ ======================================================================= =================
    ``"human"``  Zenodo record 8192729, ``CollecTRI_regulons.csv`` (``collectri_human``) ``AP1``, ``NFKB``
    ``"mouse"``  OmniPath web service, CollecTRI for taxon 10090 (``collectri_mouse``)   OmniPath names
    ============ ======================================================================= =================

    The human file is the one decoupler's ``dc.op.collectri`` reads; the mouse table is generated
    by OmniPath on request and is not hash-pinned (keep a copy and pass ``path=`` for reproducible
    work). TF complexes keep the names they have in the file.

    Parameters
    ----------
    tf
        One regulator symbol, several, or None for the whole network. Matched
        case-insensitively (``"gata4"`` finds ``GATA4``; ``"GATA4"`` finds mouse ``Gata4``);
        the returned ``source`` column keeps the file's spelling. Rows come grouped by TF in the
        order asked, each in file order.
    source
        The network. Only ``"collectri"`` for now.
    organism
        ``"human"`` or ``"mouse"`` (also ``"homo sapiens"``, ``"mus musculus"``, ``9606``,
        ``10090``). Ignored for the choice of file when ``path`` is given.
    sign
        ``"any"``; ``"activating"`` (weight +1) or ``"repressing"`` (weight -1) only.
    path
        A local copy of the network: CSV or TSV, gzip-compressed or not, in decoupler form
        (``source``, ``target``, ``weight``) or OmniPath form (``source_genesymbol``,
        ``target_genesymbol``, ``is_stimulation``/``is_inhibition`` or ``consensus_*``).
        No registry look-up and no network access then.

    Returns
    -------
    A :class:`pandas.DataFrame` with columns ``source``, ``target`` (str) and ``weight``
    (float, +1.0 or -1.0), followed by ``resources`` and ``references`` (str) when the file has
    them; one row per (``source``, ``target``) pair, index ``0..n-1``. A TF of the network without
    targets of the requested ``sign`` gives no rows.

    Raises
    ------
    ValueError
        Unknown ``source`` (the message lists the sources), ``organism`` or ``sign``; a file without
        a TF, target or sign column (the message names the columns found).
    KeyError
        A ``tf`` that is not a regulator of the network; the message names it and close names.
    FileNotFoundError
        ``path`` does not exist; or offline mode (``SC_DTA_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``)
        and the network is not cached.

    Notes
    -----
    Signs: a ``weight`` (or ``mor``) column gives the sign of its value, and a zero or missing
    weight is an error. OmniPath flags are read from ``consensus_stimulation`` /
    ``consensus_inhibition`` where these decide, else from ``is_stimulation`` / ``is_inhibition``:
    inhibition gives -1, stimulation alone or no flag +1 (as decoupler does). Exact duplicate
    rows are dropped; where a pair is listed with both signs, the repressing row is kept (as
    decoupler's OmniPath loader does).

    Examples
    --------
    >>> import sc_dta as dta
    >>> net = dta.datasets.known_targets(["GATA4", "TBX5"])  # doctest: +SKIP
    >>> net.groupby("source")["target"].size()  # doctest: +SKIP
    """
    sign = _check_sign(sign)
    entry_name = _registry_name(source, organism)
    tfs = None if tf is None else _tf_list(tf)
    if path is None:
        from ._fetch import fetch

        try:
            file = fetch(entry_name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} Or pass path= to a local copy of the network file.") from e
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            state = "is a directory" if file.is_dir() else "does not exist"
            raise FileNotFoundError(f"known_targets: path={os.fspath(path)!r} {state}; expected a CSV or TSV file.")

    net = _load_network(file)
    label = f"{_SOURCE_LABELS.get(source, source)} ({os.fspath(file)})"
    if tfs is not None:
        net = _select_tfs(net, tfs, label=label)
    net = _filter_sign(net, sign)
    return net.reset_index(drop=True)


def targets_from_table(
    table: pd.DataFrame | str | os.PathLike,
    tf: str | Sequence[str] | None = None,
    *,
    sign: Literal["any", "activating", "repressing"] = "any",
) -> list[str]:
    """Target genes of a TF from a TF -> target table (decoupler, OmniPath or CollecTRI form).

    Parameters
    ----------
    table
        A :class:`pandas.DataFrame`, or the path of a CSV/TSV file (gzip or not), with a TF column
        (``source``, ``source_genesymbol``, ``tf`` or ``regulator``) and a target column
        (``target``, ``target_genesymbol``, ``target_gene`` or ``gene``), names matched
        case-insensitively; sign columns as for :func:`known_targets` are optional. A table with
        only a target column is a plain list of targets. The output of :func:`known_targets`
        works as is.
    tf
        The TF (or several: the union of their targets), matched case-insensitively. None: the
        table must hold a single TF (or no TF column), whose targets are returned.
    sign
        ``"any"``, ``"activating"`` or ``"repressing"``; the last two need a sign column.

    Returns
    -------
    Target gene symbols, each once, in the order of first appearance in the table.

    Raises
    ------
    KeyError
        ``tf`` is not in the table; the message names it and close names.
    ValueError
        The table lacks a target column, ``tf`` is None but the table holds several TFs, or
        ``sign`` needs a sign column the table does not have.
    """
    sign = _check_sign(sign)
    tfs = None if tf is None else _tf_list(tf)
    if isinstance(table, str | os.PathLike):
        file = Path(table).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"targets_from_table: table={os.fspath(table)!r} is not a file.")
        frame = _read_table(file)
        label = os.fspath(file)
    else:
        import pandas as pd

        if not isinstance(table, pd.DataFrame):
            raise TypeError(
                f"targets_from_table: table must be a pandas DataFrame or a file path, got {type(table).__name__}."
            )
        frame = table
        label = "the table"
    net = _normalize(frame, label=label, require_sign=sign != "any", require_source=False)

    if "source" not in net.columns:
        if tf is not None:
            raise ValueError(f"targets_from_table: tf={tf!r} was given but {label} has no TF column.")
    elif tf is None:
        tfs = net["source"].unique()
        if len(tfs) > 1:
            shown = ", ".join(map(repr, tfs[:5])) + (", ..." if len(tfs) > 5 else "")
            raise ValueError(
                f"targets_from_table: {label} holds {len(tfs)} TFs ({shown}); pass tf= to choose one or several."
            )
    else:
        net = _select_tfs(net, tfs, label=label)
    if sign != "any":
        net = _filter_sign(net, sign)
    return list(dict.fromkeys(net["target"].tolist()))


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def _check_sign(sign: str) -> str:
    if sign not in _SIGNS:
        raise ValueError(f"sign={sign!r} is not one of {', '.join(map(repr, _SIGNS))}.")
    return sign


def _registry_name(source: str, organism: str | int) -> str:
    if not isinstance(source, str) or source.lower() not in SOURCES:
        raise ValueError(f"source={source!r} is not a known network; known sources: {', '.join(map(repr, SOURCES))}.")
    by_organism = SOURCES[source.lower()]
    key = _ORGANISM_ALIASES.get(str(organism).strip().lower())
    if key is None or key not in by_organism:
        raise ValueError(
            f"organism={organism!r} is not available for source={source!r}; "
            f"choose one of {', '.join(map(repr, by_organism))}."
        )
    return by_organism[key]


def _tf_list(tf: str | Sequence[str]) -> list[str]:
    names = [tf] if isinstance(tf, str) else list(tf)
    bad = [t for t in names if not isinstance(t, str) or not t.strip()]
    if bad or not names:
        raise ValueError(f"tf must be a TF symbol or a non-empty list of them, got {tf!r}.")
    return [t.strip() for t in names]


# --------------------------------------------------------------------------------------------------
# Reading and normalising network tables
# --------------------------------------------------------------------------------------------------


def _read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or TSV file (gzip or not, told apart by content) with every cell as text."""
    import pandas as pd

    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    opener = gzip.open if compressed else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        header = f.readline()
    if not header.strip():
        raise ValueError(f"{path} is empty; expected a CSV or TSV table with a header line.")
    sep = "\t" if header.count("\t") >= header.count(",") and "\t" in header else ","
    # Text only, and only empty cells are missing: gene symbols such as "NA" or "NULL" stay symbols.
    return pd.read_csv(
        path,
        sep=sep,
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        compression="gzip" if compressed else None,
        low_memory=False,
    )


def _find_column(columns: Mapping[str, str], candidates: Sequence[str]) -> str | None:
    for name in candidates:
        if name in columns:
            return columns[name]
    return None


def _flags(frame: pd.DataFrame, column: str | None) -> pd.Series | None:
    """Read a 0/1 OmniPath flag column as booleans (``1``, ``True``, ``yes`` are true)."""
    if column is None:
        return None
    text = frame[column].fillna("").astype(str).str.strip().str.lower()
    return text.isin({"1", "1.0", "true", "t", "yes", "y"})


def _signs(frame: pd.DataFrame, columns: Mapping[str, str], label: str) -> pd.Series | None:
    """+1.0 / -1.0 per row from a weight column or OmniPath flags; None when the table has neither."""
    import numpy as np
    import pandas as pd

    weight_col = _find_column(columns, _WEIGHT_COLUMNS)
    if weight_col is not None:
        values = pd.to_numeric(frame[weight_col], errors="coerce")
        bad = values.isna() | (values == 0)
        if bad.any():
            examples = frame.loc[bad, weight_col].head(3).tolist()
            raise ValueError(
                f"{label}: column {weight_col!r} has {int(bad.sum())} missing, zero or non-numeric values "
                f"(e.g. {examples}); every interaction needs a sign (+ activation, - repression)."
            )
        return pd.Series(np.sign(values.to_numpy(dtype=float)), index=frame.index)

    stim = _flags(frame, _find_column(columns, ("is_stimulation",)))
    inhib = _flags(frame, _find_column(columns, ("is_inhibition",)))
    c_stim = _flags(frame, _find_column(columns, ("consensus_stimulation",)))
    c_inhib = _flags(frame, _find_column(columns, ("consensus_inhibition",)))
    if stim is None and inhib is None and c_stim is None and c_inhib is None:
        return None
    false = pd.Series(False, index=frame.index)
    inhib = inhib if inhib is not None else false
    # Flags of the individual resources: inhibition wins, stimulation alone or no flag is activation.
    weight = pd.Series(np.where(inhib, -1.0, 1.0), index=frame.index)
    if c_stim is not None or c_inhib is not None:
        c_stim = c_stim if c_stim is not None else false
        c_inhib = c_inhib if c_inhib is not None else false
        weight[c_stim & ~c_inhib] = 1.0
        weight[c_inhib & ~c_stim] = -1.0
    return weight


def _normalize(
    frame: pd.DataFrame, *, label: str, require_sign: bool = True, require_source: bool = True
) -> pd.DataFrame:
    """Map a TF -> target table to ``source, target, weight[, resources, references]``, deduplicated."""
    import pandas as pd

    columns = {str(c).strip().lower().replace(".", "_"): c for c in frame.columns}
    source_col = _find_column(columns, _SOURCE_COLUMNS)
    target_col = _find_column(columns, _TARGET_COLUMNS)
    found = ", ".join(map(repr, map(str, frame.columns))) or "none"
    if target_col is None or (require_source and source_col is None):
        raise ValueError(
            f"{label}: no {'target' if target_col is None else 'TF'} column found. Expected a TF column "
            f"({' or '.join(_SOURCE_COLUMNS)}) and a target column ({' or '.join(_TARGET_COLUMNS)}); "
            f"columns found: {found}."
        )
    weight = _signs(frame, columns, label)
    if weight is None and require_sign:
        raise ValueError(
            f"{label}: no sign column found (weight or mor, or OmniPath is_stimulation/is_inhibition or "
            f"consensus_stimulation/consensus_inhibition); columns found: {found}. For an unsigned table of "
            "targets use dta.datasets.targets_from_table(table, tf)."
        )

    out = pd.DataFrame(index=frame.index)
    if source_col is not None:
        out["source"] = frame[source_col].fillna("").astype(str).str.strip()
    out["target"] = frame[target_col].fillna("").astype(str).str.strip()
    out["weight"] = weight.astype(float) if weight is not None else float("nan")
    for name, candidates in _EVIDENCE_COLUMNS.items():
        col = _find_column(columns, candidates)
        if col is not None and col not in (source_col, target_col):
            out[name] = frame[col].fillna("").astype(str)

    keys = [c for c in ("source", "target") if c in out.columns]
    empty = (out[keys] == "").any(axis=1)
    if empty.any():
        logger.debug("%s: dropped %d rows without a TF or target symbol.", label, int(empty.sum()))
        out = out[~empty]
    n = len(out)
    out = out.drop_duplicates(subset=[*keys, "weight"])
    if "source" in out.columns and weight is not None:
        # A pair listed with both signs keeps its repressing row.
        pairs = pd.MultiIndex.from_frame(out[["source", "target"]])
        repressed = pd.MultiIndex.from_frame(out.loc[out["weight"] < 0, ["source", "target"]])
        out = out[~((out["weight"] > 0).to_numpy() & pairs.isin(repressed))]
    out = out.drop_duplicates(subset=keys)
    if len(out) < n:
        logger.debug("%s: dropped %d duplicate interactions.", label, n - len(out))
    return out.reset_index(drop=True)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    net = _normalize(_read_table(Path(path)), label=path)
    logger.info("Read %d interactions of %d regulators from %s.", len(net), net["source"].nunique(), path)
    return net


def _load_network(path: Path) -> pd.DataFrame:
    """Return the normalised network in ``path`` (parsed once per file version; a fresh copy each call)."""
    stat = path.stat()
    return _load_cached(os.fspath(path.resolve()), stat.st_mtime_ns, stat.st_size).copy()


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def _select_tfs(net: pd.DataFrame, tfs: Sequence[str], *, label: str) -> pd.DataFrame:
    import pandas as pd

    folded = net["source"].str.casefold()
    known = dict.fromkeys(net["source"].tolist())
    by_fold: dict[str, str] = {}
    for name in known:
        by_fold.setdefault(name.casefold(), name)
    missing = [t for t in tfs if t.casefold() not in by_fold]
    if missing:
        hints = []
        for t in missing:
            close = difflib.get_close_matches(t.casefold(), list(by_fold), n=5, cutoff=0.6)
            names = ", ".join(repr(by_fold[c]) for c in close)
            hints.append(f"{t!r} (close names: {names})" if close else f"{t!r} (no close names)")
        raise KeyError(
            f"{'TF' if len(missing) == 1 else 'TFs'} {'; '.join(hints)} not found among the "
            f"{len(known)} regulators of {label}."
        )
    parts = [net[folded == t] for t in dict.fromkeys(t.casefold() for t in tfs)]
    return pd.concat(parts)


def _filter_sign(net: pd.DataFrame, sign: str) -> pd.DataFrame:
    if sign == "activating":
        return net[net["weight"] > 0]
    if sign == "repressing":
        return net[net["weight"] < 0]
    return net
