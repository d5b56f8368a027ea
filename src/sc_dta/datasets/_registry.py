"""The data and model registry (``registry.yaml``): loading, validation and name look-up."""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import urlparse

__all__ = ["registry"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SECTIONS = ("files", "models", "groups")
_COMMON_TEXT = ("licence", "citation", "description")
_KIND_LABELS = {"file": "data file", "model": "model repository", "group": "group"}


def registry() -> dict[str, dict[str, Any]]:
    """Every entry of the data and model registry, by name.

    File entries (``kind == "file"``) carry ``url``, ``filename`` (path inside the cache),
    ``sha256`` (64 hex digits, or None with ``sha256_reason``), ``size`` in bytes
    (``size_approximate`` says whether it is an estimate), ``licence``, ``citation`` and
    ``description``. Model entries (``kind == "model"``) carry ``repo_id``, the pinned ``revision``
    (a 40-hex commit), an optional ``subfolder`` and the default ``allow_patterns``.
    Group entries (``kind == "group"``) list ``members`` that :func:`~sc_dta.datasets.prefetch`
    expands.

    Returns
    -------
    A fresh copy of the registry: ``{name: entry}``, each entry with ``name`` and ``kind`` keys.
    Changing it does not change what :func:`~sc_dta.datasets.fetch` downloads.
    """
    return copy.deepcopy(_entries())


@functools.cache
def _entries() -> dict[str, dict[str, Any]]:
    """Load and validate the registry once (internal and mutable: use :func:`registry` outside)."""
    import yaml

    text = resources.files(__package__).joinpath("registry.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    return _validate(raw, source="registry.yaml")


def _validate(raw: Any, *, source: str = "registry") -> dict[str, dict[str, Any]]:
    """Check the structure of a parsed registry and flatten it to ``{name: entry}``."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}.")
    entries: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        block = raw.get(section) or {}
        if not isinstance(block, Mapping):
            raise ValueError(f"{source}: section {section!r} must be a mapping of name -> entry.")
        for name, entry in block.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"{source}: entry name {name!r} must be an identifier (letters, digits, '_').")
            if name in entries:
                raise ValueError(f"{source}: entry name {name!r} is defined twice.")
            kind = section[:-1]
            if kind == "group":
                entries[name] = {"name": name, "kind": "group", "members": _check_group(name, entry, source)}
                continue
            if not isinstance(entry, Mapping):
                raise ValueError(f"{source}: entry {name!r} must be a mapping, got {type(entry).__name__}.")
            entry = {**entry, "name": name, "kind": kind}
            (_check_file if kind == "file" else _check_model)(entry, source)
            entries[name] = entry

    # Aliases (e.g. "Geneformer-V2-104M") must not collide with entry names or each other.
    seen: dict[str, str] = {}
    for name, entry in entries.items():
        for alias in entry.get("aliases", ()):
            key = alias.lower()
            if key in seen or key in {n.lower() for n in entries if n != name}:
                raise ValueError(f"{source}: alias {alias!r} of {name!r} collides with another name or alias.")
            seen[key] = name
    # Groups may only name existing entries (or other groups defined anywhere in the file).
    for name, entry in entries.items():
        if entry["kind"] == "group":
            missing = [m for m in entry["members"] if m not in entries]
            if missing:
                raise ValueError(f"{source}: group {name!r} names unknown entries {missing}.")
    _expand_group_cycles(entries, source)
    return entries


def _check_common(entry: Mapping[str, Any], source: str) -> None:
    name = entry["name"]
    for field in _COMMON_TEXT:
        value = entry.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: entry {name!r} needs a non-empty {field!r}.")
    size = entry.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"{source}: entry {name!r} has size={size!r}; expected a positive number of bytes.")
    if not isinstance(entry.get("size_approximate", False), bool):
        raise ValueError(f"{source}: entry {name!r}: size_approximate must be true or false.")


def _check_file(entry: dict[str, Any], source: str) -> None:
    name = entry["name"]
    _check_common(entry, source)
    url = entry.get("url")
    if not isinstance(url, str) or urlparse(url).scheme not in {"http", "https", "ftp"} or not urlparse(url).netloc:
        raise ValueError(f"{source}: entry {name!r} has url={url!r}; expected an http(s) or ftp URL.")
    if entry.get("size") is None:
        raise ValueError(f"{source}: entry {name!r} needs a size in bytes (set size_approximate: true if unsure).")
    filename = entry.setdefault("filename", urlparse(url).path.rsplit("/", 1)[-1])
    if (
        not isinstance(filename, str)
        or not filename
        or filename.startswith("/")
        or any(part in {"", ".", ".."} for part in filename.split("/"))
    ):
        raise ValueError(f"{source}: entry {name!r} has filename={filename!r}; expected a relative path.")
    sha256 = entry.get("sha256", "missing")
    if sha256 == "missing":
        raise ValueError(f"{source}: entry {name!r} needs sha256 (64 hex digits, or null with sha256_reason).")
    if sha256 is None:
        reason = entry.get("sha256_reason")
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"{source}: entry {name!r} has sha256: null but no sha256_reason saying why.")
    elif not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise ValueError(f"{source}: entry {name!r} has sha256={sha256!r}; expected 64 lower-case hex digits.")
    md5 = entry.get("md5")
    if md5 is not None and (not isinstance(md5, str) or not _HEX32.match(md5)):
        raise ValueError(f"{source}: entry {name!r} has md5={md5!r}; expected 32 lower-case hex digits.")


def _check_model(entry: dict[str, Any], source: str) -> None:
    name = entry["name"]
    _check_common(entry, source)
    repo_id = entry.get("repo_id")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{source}: model {name!r} has repo_id={repo_id!r}; expected 'owner/name'.")
    revision = entry.get("revision", "missing")
    if revision is None:
        branch, reason = entry.get("revision_branch"), entry.get("revision_reason")
        if not isinstance(branch, str) or not branch or not isinstance(reason, str) or not reason.strip():
            raise ValueError(
                f"{source}: model {name!r} has revision: null; it then needs revision_branch and revision_reason."
            )
    elif not isinstance(revision, str) or not _HEX40.match(revision):
        raise ValueError(f"{source}: model {name!r} has revision={revision!r}; expected a 40-hex commit (or null).")
    subfolder = entry.get("subfolder")
    if subfolder is not None and (not isinstance(subfolder, str) or not subfolder or subfolder.startswith("/")):
        raise ValueError(f"{source}: model {name!r} has subfolder={subfolder!r}; expected a relative folder name.")
    patterns = entry.get("allow_patterns")
    if patterns is not None and (not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns)):
        raise ValueError(f"{source}: model {name!r}: allow_patterns must be a list of strings or null.")
    aliases = entry.setdefault("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ValueError(f"{source}: model {name!r}: aliases must be a list of names.")
    files = entry.setdefault("files", {})
    if not isinstance(files, Mapping):
        raise ValueError(f"{source}: model {name!r}: files must map repository paths to {{sha256, size}}.")
    for path, info in files.items():
        sha = (info or {}).get("sha256")
        if sha is not None and not (isinstance(sha, str) and _HEX64.match(sha)):
            raise ValueError(f"{source}: model {name!r}: files[{path!r}].sha256={sha!r} is not 64 hex digits.")


def _check_group(name: str, members: Any, source: str) -> list[str]:
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise ValueError(f"{source}: group {name!r} must be a non-empty list of entry names.")
    return list(members)


def _expand_group_cycles(entries: Mapping[str, Mapping[str, Any]], source: str) -> None:
    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"{source}: group {path[0]!r} contains itself via {' -> '.join((*path, name))}.")
        if entries[name]["kind"] == "group":
            for member in entries[name]["members"]:
                visit(member, (*path, name))

    for name, entry in entries.items():
        if entry["kind"] == "group":
            visit(name, ())


def resolve(name: str, *, kinds: Iterable[str] = ("file", "model", "group")) -> dict[str, Any]:
    """Return the entry called ``name`` (exact name, or a model alias, case-insensitive).

    Raises
    ------
    KeyError
        When no entry of one of ``kinds`` has that name; the message lists close names.
    """
    kinds = tuple(kinds)
    if not isinstance(name, str):
        raise TypeError(f"Registry names are strings, got {type(name).__name__}: {name!r}.")
    entries = _entries()
    entry = entries.get(name)
    if entry is None:
        lowered = name.lower()
        for candidate in entries.values():
            if candidate["name"].lower() == lowered or lowered in (a.lower() for a in candidate.get("aliases", ())):
                entry = candidate
                break
    if entry is not None and entry["kind"] in kinds:
        return entry
    known = [n for n, e in entries.items() if e["kind"] in kinds]
    known += [a for e in entries.values() if e["kind"] in kinds for a in e.get("aliases", ())]
    labels = [_KIND_LABELS.get(k, k) for k in kinds]
    what = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]
    if entry is not None:
        raise KeyError(f"{name!r} is a {_KIND_LABELS[entry['kind']]} of the sc_dta registry, not a {what}.")
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise KeyError(
        f"{name!r} is not a {what} of the sc_dta registry.{hint} "
        f"Known names: {', '.join(sorted(n for n, e in entries.items() if e['kind'] in kinds))}."
    )


def expand(names: Iterable[str]) -> list[str]:
    """Registry names of ``names`` with groups replaced by their members, in order and without repeats.

    Raises
    ------
    KeyError
        For any unknown name (before anything is downloaded).
    """
    out: list[str] = []
    for name in names:
        entry = resolve(name)
        members = expand(entry["members"]) if entry["kind"] == "group" else [entry["name"]]
        out.extend(m for m in members if m not in out)
    return out


def known_hash(entry: Mapping[str, Any]) -> str | None:
    """Return the pooch hash string of a file entry: ``"sha256:..."``, ``"md5:..."`` or None (not checked)."""
    if entry.get("sha256"):
        return f"sha256:{entry['sha256']}"
    if entry.get("md5"):
        return f"md5:{entry['md5']}"
    return None


def pinned_revision(repo_id: str) -> str | None:
    """Return the pinned commit of ``repo_id`` if a registry model entry pins one, else None."""
    for entry in _entries().values():
        if entry["kind"] == "model" and entry["repo_id"].lower() == repo_id.lower() and entry.get("revision"):
            return entry["revision"]
    return None
