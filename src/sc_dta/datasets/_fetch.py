"""Downloads: hash-checked files with pooch, model repositories with huggingface_hub, offline prefetch.

Environment variables
---------------------
``SC_DTA_OFFLINE`` / ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
    Truthy (``1``, ``true``, ``yes``, ``on``): never touch the network; only cached files and
    snapshots are used, and a missing one is a clear error pointing at :func:`prefetch`.
``SC_DTA_DATA_URL``
    Base URL of a mirror of the data cache: file entries are downloaded from
    ``<SC_DTA_DATA_URL>/<filename>`` (``filename`` as in the registry) instead of their upstream URL.
``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``
    The usual Hugging Face settings (mirror endpoint, cache location) apply to model repositories.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sc_dta._settings import settings

from . import _registry

__all__ = ["fetch", "hf_snapshot", "prefetch"]

logger = logging.getLogger(__name__)

_OFFLINE_VARS = ("SC_DTA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_RETRIES = 3
_CHUNK = 1 << 20
_TIMEOUT = (30, 300)  # seconds to connect, seconds between bytes


def is_offline() -> bool:
    """Whether ``SC_DTA_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbid network access (read now)."""
    return any(os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"} for var in _OFFLINE_VARS)


def _offline_var() -> str:
    return next(v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"})


def _human(n: int | None) -> str:
    if not n:
        return "size unknown"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _file_hash(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_ok(path: Path, known: str | None) -> bool:
    if known is None:
        return True
    algorithm, _, expected = known.partition(":")
    return _file_hash(path, algorithm) == expected.lower()


# --------------------------------------------------------------------------------------------------
# Files (pooch)
# --------------------------------------------------------------------------------------------------


def _data_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else settings.cache_dir / "data"


def _source_url(entry: Mapping[str, Any], base_url: str | None) -> str:
    base = base_url if base_url is not None else os.environ.get("SC_DTA_DATA_URL") or None
    if base:
        return base.rstrip("/") + "/" + entry["filename"]
    return entry["url"]


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Route pooch's own INFO messages below WARNING while we log our own."""
    import pooch

    pooch_logger = pooch.get_logger()
    level = pooch_logger.level
    pooch_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pooch_logger.setLevel(level)


def fetch(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    base_url: str | None = None,
) -> Path:
    """Download one registry file (once), check its hash and return its local path.

    The file is cached under ``cache_dir / filename`` (``filename`` from the registry); a cached
    file whose hash matches is returned without any network access. Downloads are retried
    3 times, go to a temporary file first and only land in the cache once the hash matched.

    Parameters
    ----------
    name
        A file entry of :func:`~sc_dta.datasets.registry`, e.g. ``"hg38_chr8"``,
        ``"gencode_v44_basic_gtf"`` or ``"geneformer_v2_token_dictionary"``.
    cache_dir
        Folder of the data cache. Default: ``dta.settings.cache_dir / "data"``.
    progress
        Show a download progress bar. Default: ``dta.settings.progress``.
    base_url
        Download from ``<base_url>/<filename>`` (a mirror of the cache layout) instead of the
        upstream URL. Default: the ``SC_DTA_DATA_URL`` environment variable, else upstream.

    Returns
    -------
    Path of the verified local file.

    Raises
    ------
    KeyError
        ``name`` is not a file of the registry (raised before any network access).
    ValueError
        The downloaded file does not have the registry's hash; the message names the file, the
        expected and the found hash, and nothing is left in the cache.
    FileNotFoundError
        Offline mode (``SC_DTA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) and the file is not cached.
    ConnectionError
        The download failed after all retries.
    """
    entry = _registry.resolve(name, kinds=("file",))
    name = entry["name"]
    cache = _data_dir(cache_dir)
    fname = entry["filename"]
    target = cache / fname
    known = _registry.known_hash(entry)

    if target.is_file() and _hash_ok(target, known):
        logger.debug("Using cached %s at %s.", name, target)
        return target
    if is_offline():
        state = "has a different hash than the registry's" if target.is_file() else "is not in the cache"
        raise FileNotFoundError(
            f"{name!r} ({fname}) {state} ({cache}) and {_offline_var()}=1 forbids downloading it. "
            f"Run `dta.datasets.prefetch([{name!r}])` on a machine with internet access and copy its cache "
            f"folder here (or point dta.settings.cache_dir / SC_DTA_CACHE_DIR at a shared copy)."
        )

    import pooch
    import requests

    url = _source_url(entry, base_url)
    show = settings.progress if progress is None else bool(progress)
    bar: Any = False
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=entry.get("size"), unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False)
    if url.startswith(("http://", "https://")):
        downloader = pooch.HTTPDownloader(progressbar=bar, chunk_size=_CHUNK, timeout=_TIMEOUT)
    else:
        downloader = pooch.choose_downloader(url, progressbar=bar)
    pup = pooch.create(path=cache, base_url="", registry={fname: known}, urls={fname: url}, retry_if_failed=_RETRIES)
    size = _human(entry.get("size")) + (" approx." if entry.get("size_approximate") else "")
    logger.info("Downloading %s (%s) from %s to %s.", name, size, url, target)
    try:
        with _quiet_pooch():
            path = Path(pup.fetch(fname, downloader=downloader))
    except ValueError as e:
        if "hash" not in str(e).lower():
            raise
        # A stale cached copy failed the check too: never leave an unverified file behind.
        target.unlink(missing_ok=True)
        algorithm, _, expected = (known or "").partition(":")
        found = re.search(r"got ([0-9A-Fa-f]+)", str(e))
        raise ValueError(
            f"Checksum mismatch for {name!r}: the file {fname!r} downloaded from {url} has "
            f"{algorithm} {found.group(1) if found else '(see below)'}, expected {expected}. "
            f"The download was discarded (nothing was left in {cache}). The file may have been corrupted "
            "in transit, or the upstream file changed; retry, or check the registry entry."
        ) from e
    except requests.RequestException as e:
        raise ConnectionError(
            f"Could not download {name!r} from {url} after {1 + _RETRIES} attempts ({e}). Check the network, "
            "use a mirror with SC_DTA_DATA_URL, or run `dta.datasets.prefetch(...)` on a machine with internet "
            f"access and copy {cache}."
        ) from e
    finally:
        if bar is not False:
            bar.close()
    logger.info("Stored %s at %s.", name, path)
    return path


# --------------------------------------------------------------------------------------------------
# Model repositories (huggingface_hub)
# --------------------------------------------------------------------------------------------------


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", ".\\")) or os.sep in value.replace("/", "") or value in {".", ".."}


def _model_spec(
    repo_id_or_name: str, revision: str | None, allow_patterns: str | Sequence[str] | None
) -> dict[str, Any]:
    """Repository, revision, subfolder and file patterns for a registry name or a raw repo id."""
    spec: dict[str, Any] = {"entry": None, "subfolder": None, "files": {}}
    text = repo_id_or_name
    if "@" in text and revision is None:
        text, revision = text.rsplit("@", 1)
    if "/" not in text:
        entry = _registry.resolve(text, kinds=("model",))
        spec.update(
            entry=entry,
            name=entry["name"],
            repo_id=entry["repo_id"],
            subfolder=entry.get("subfolder"),
            files=entry.get("files", {}),
        )
        pinned = entry.get("revision")
        default_patterns = entry.get("allow_patterns")
        branch = entry.get("revision_branch")
    else:
        if text.count("/") != 1 or not all(text.split("/")):
            raise ValueError(f"repo_id_or_name={repo_id_or_name!r} is neither a registry name nor 'owner/name'.")
        spec.update(name=text, repo_id=text)
        pinned = _registry.pinned_revision(text)
        default_patterns, branch = None, None
    if revision is None and pinned is None:
        revision = branch or "main"
        msg = (
            f"No revision is pinned for {spec['repo_id']!r}: downloading the moving branch {revision!r}, whose "
            "content can change. Pass revision=<40-hex commit> for reproducible results."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
        logger.warning(msg)
    spec["revision"] = revision if revision is not None else pinned
    if allow_patterns is None:
        allow_patterns = default_patterns
    spec["allow_patterns"] = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
    return spec


@contextlib.contextmanager
def _hf_session(*, show: bool, offline: bool) -> Iterator[None]:
    """Progress bars per ``show``; huggingface_hub's offline flag per the environment *now*.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import; sc_dta reads it at every call, so
    the hub's flag is set to match for the duration of the call.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    was_offline = constants.HF_HUB_OFFLINE
    if not show and not was_disabled:
        disable_progress_bars()
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was_offline
        if not show and not was_disabled:
            enable_progress_bars()


def _verify_snapshot(root: Path, files: Mapping[str, Mapping[str, Any]], name: str) -> None:
    for rel, info in files.items():
        path = root / rel
        if not path.is_file():
            continue  # not requested by allow_patterns
        size, sha = info.get("size"), info.get("sha256")
        if size is not None and path.stat().st_size != size:
            raise ValueError(f"{name}: {rel} in {root} has {path.stat().st_size} bytes, expected {size} (registry).")
        if sha is not None:
            found = _file_hash(path)
            if found != sha:
                raise ValueError(f"{name}: {rel} in {root} has sha256 {found}, expected {sha} (registry).")
    logger.info("Verified %s against the registry's file hashes.", name)


def hf_snapshot(
    repo_id_or_name: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_patterns: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    verify: bool = False,
    progress: bool | None = None,
) -> Path:
    """Local folder of a model repository at a pinned revision, downloading it once if needed.

    Parameters
    ----------
    repo_id_or_name
        A local directory (returned as is, no network), a model entry of the registry
        (``"enformer"``, ``"geneformer"``, ``"geneformer_v2_104m"``, or a folder name such as
        ``"Geneformer-V2-104M"``), or a Hugging Face repository id ``"owner/name"`` (optionally
        ``"owner/name@revision"``).
    revision
        Commit, branch or tag. Default: the registry's pinned commit; a repository without a pin
        uses ``"main"`` and warns that the result is not reproducible.
    allow_patterns
        Only download files matching these patterns. Default: the registry entry's
        ``allow_patterns`` (e.g. only the model folder of a Geneformer checkpoint), else everything.
    cache_dir
        Hugging Face cache folder. Default: the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``),
        shared with :mod:`transformers` so that ``from_pretrained(repo_id, revision=...)`` finds it.
    endpoint
        Hub endpoint (a mirror). Default: ``HF_ENDPOINT`` or https://huggingface.co.
    verify
        Check the sha256 and size of the files the registry lists for this entry.
    progress
        Show download progress bars. Default: ``dta.settings.progress``.

    Returns
    -------
    The snapshot folder; for entries with a ``subfolder`` (the Geneformer checkpoints) the folder
    of that model inside the snapshot, ready for ``from_pretrained``.

    Raises
    ------
    KeyError
        Unknown registry name (before any network access).
    FileNotFoundError
        A path that does not exist; or offline mode (``HF_HUB_OFFLINE=1`` / ``SC_DTA_OFFLINE=1``)
        and the snapshot is not cached.
    ConnectionError
        The hub could not be reached and nothing is cached.
    """
    text = os.fspath(repo_id_or_name)
    local = Path(text).expanduser()
    if local.is_dir():
        logger.debug("hf_snapshot: using local directory %s.", local)
        return local
    if isinstance(repo_id_or_name, os.PathLike) or _looks_like_path(text) or local.exists():
        state = "is not a directory" if local.exists() else "does not exist"
        raise FileNotFoundError(f"repo_id_or_name={text!r} looks like a local path, but it {state}.")

    spec = _model_spec(text, revision, allow_patterns)
    offline = is_offline()

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    label = spec["name"] if spec["entry"] is None else f"{spec['name']} ({spec['repo_id']})"
    where = f"{spec['repo_id']}@{spec['revision']}"
    show = settings.progress if progress is None else bool(progress)
    if not offline:
        size = spec["entry"].get("size") if spec["entry"] else None
        logger.info("Fetching %s at revision %s (%s).", label, spec["revision"], _human(size))
    try:
        with _hf_session(show=show, offline=offline):
            root = Path(
                snapshot_download(
                    spec["repo_id"],
                    revision=spec["revision"],
                    allow_patterns=spec["allow_patterns"],
                    cache_dir=None if cache_dir is None else os.fspath(Path(cache_dir).expanduser()),
                    local_files_only=offline,
                    endpoint=endpoint,
                )
            )
    except LocalEntryNotFoundError as e:
        if offline:
            raise FileNotFoundError(
                f"{label} at revision {spec['revision']} is not in the Hugging Face cache "
                f"({cache_dir or 'default HF cache'}) and {_offline_var()}=1 forbids downloading it. Run "
                f"`dta.datasets.prefetch([{spec['name']!r}])` on a machine with internet access and copy the cache, "
                "or pass a local directory instead."
            ) from e
        raise ConnectionError(f"Could not download {where} and it is not cached: {e}") from e

    path = root / spec["subfolder"] if spec["subfolder"] else root
    if not path.is_dir():
        raise FileNotFoundError(
            f"The snapshot of {where} at {root} has no folder {spec['subfolder']!r}"
            + (" (offline: only files downloaded earlier are available)." if offline else ".")
        )
    if verify and spec["files"]:
        _verify_snapshot(root, spec["files"], label)
    return path


# --------------------------------------------------------------------------------------------------
# Prefetch
# --------------------------------------------------------------------------------------------------


def prefetch(
    names: str | Sequence[str] | None = None,
    *,
    models: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    hf_cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    endpoint: str | None = None,
    verify: bool = True,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Download registry files and model repositories ahead of time (e.g. before going offline).

    Run it on a machine with internet access, then copy ``dta.settings.cache_dir`` (and the
    Hugging Face cache) to the offline cluster and set ``HF_HUB_OFFLINE=1`` there:
    :func:`fetch` and :func:`hf_snapshot` then find everything without network access.

    Parameters
    ----------
    names
        Registry names: files (``"hg38_chr8"``), model repositories (``"enformer"``,
        ``"geneformer_v2_104m"``) or groups (``"hg38"``, ``"geneformer_v2_dictionaries"``,
        ``"default"``). Default: the ``"default"`` group (hg38, GENCODE v44, the Geneformer V2
        dictionaries, Enformer and Geneformer V2-104M).
    models
        More model repositories: registry names or ``"owner/name[@revision]"`` Hugging Face ids.
    cache_dir
        Data cache for files (see :func:`fetch`).
    hf_cache_dir
        Hugging Face cache for model repositories (see :func:`hf_snapshot`).
    base_url
        Mirror for files (see :func:`fetch`).
    endpoint
        Hugging Face endpoint (mirror) for model repositories (see :func:`hf_snapshot`).
    verify
        Check the sha256 of model files the registry lists (files are always hash-checked).
    progress
        Progress bars. Default: ``dta.settings.progress``.

    Returns
    -------
    ``{name: local path}`` for every item.

    Raises
    ------
    KeyError
        An unknown name (checked for all names before anything is downloaded).
    RuntimeError
        Some items failed; the message lists each with its error (the others are cached).
    """
    from sc_dta._utils import progress as progress_bar

    names = ["default"] if names is None else [names] if isinstance(names, str) else list(names)
    extra = [] if models is None else [models] if isinstance(models, str) else list(models)
    items: list[tuple[str, str]] = []  # (kind, name)
    for name in [*names, *extra]:
        if "/" in name:
            items.append(("repo", name))
            continue
        for member in _registry.expand([name]):
            kind = _registry.resolve(member)["kind"]
            if (kind, member) not in items:
                items.append((kind, member))
    entries = _registry._entries()
    total = sum(entries[n].get("size") or 0 for k, n in items if k != "repo")
    logger.info("Prefetching %d items (about %s).", len(items), _human(total))
    if is_offline():
        logger.warning("prefetch: %s=1, so only items already cached can be found.", _offline_var())

    show = settings.progress if progress is None else bool(progress)
    results: dict[str, Path] = {}
    failures: dict[str, Exception] = {}
    if progress is None:
        bar = progress_bar(items, total=len(items), desc="prefetch")
    else:
        from tqdm.auto import tqdm

        bar = iter(tqdm(items, total=len(items), desc="prefetch", disable=not show))
    for i, (kind, name) in enumerate(bar, start=1):
        size = entries[name].get("size") if kind != "repo" else None
        logger.info("prefetch %d/%d: %s (%s)", i, len(items), name, _human(size))
        try:
            if kind == "file":
                results[name] = fetch(name, cache_dir=cache_dir, progress=progress, base_url=base_url)
            else:
                results[name] = hf_snapshot(
                    name, cache_dir=hf_cache_dir, endpoint=endpoint, verify=verify, progress=progress
                )
        except (OSError, ValueError) as e:  # ConnectionError and FileNotFoundError are OSErrors
            logger.error("prefetch: %s failed: %s", name, e)
            failures[name] = e
    if failures:
        detail = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in failures.items())
        raise RuntimeError(
            f"prefetch: {len(failures)} of {len(items)} items failed ({len(results)} are cached): {detail}"
        )
    logger.info("prefetch: %d items ready.", len(results))
    return results
